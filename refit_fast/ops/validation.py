"""weighted_ce's argument checks and input preparation, apart from the public function.

:func:`prepare_inputs` checks every argument (each ValueError names it; all value checks share one
host sync), flattens the tokens, keeps the trained ones and computes their reward weights and the
normalizer: what :class:`~refit_fast.ops.function.WeightedCEFunction` takes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from refit_fast.ops import kernels as K
from refit_fast.ops.weighted_ce_torch import REWARD_LIMIT, Head, _as_eps, token_weights_torch


class Prepared(NamedTuple):
    """Validated, flattened inputs of WeightedCEFunction (hidden [N, D], weight, bias, the trained
    tokens' labels / indices / weights [Nv], the normalizer), the resolved impl, and the leading
    shape of hidden (the shape of a reduction="none" result), and under autocast the dtype the
    GEMMs take (None: the inputs' own dtype)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels_v: torch.Tensor
    idx_v: torch.Tensor
    w_v: torch.Tensor
    denom: torch.Tensor
    impl: str
    lead: torch.Size
    compute_dtype: torch.dtype | None  # under autocast: the dtype the inputs are rounded to inside


_REDUCTIONS = ("none", "sum", "mean")
_NORMALIZE = ("sequence", "token", "none")
_IMPLS = ("auto", "triton", "torch")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_stat(value, name, device):
    t = torch.as_tensor(value, device=device)
    if t.numel() != 1 or t.is_complex():
        raise ValueError(f"weighted_ce: reward_stats {name} must be one number, got shape {tuple(t.shape)}")
    return t.detach().reshape(()).to(torch.float64)


_STANDARDIZE = {"none": "none", "batch": "batch", "group": "group"}


def _standardize_mode(standardize) -> str:
    """True / "batch" -> "batch"; "group"; False / None / "none" -> "none"."""
    if standardize is None or standardize is False:
        return "none"
    if standardize is True:
        return "batch"
    if isinstance(standardize, str) and standardize in _STANDARDIZE:
        return standardize
    raise ValueError(f"weighted_ce: standardize must be True/'batch', 'group', or False/None/'none', got {standardize!r}")



def _positive(value, name, *, zero_ok=False, at_most=None):
    """A float from a Python number, or a ValueError naming the argument."""
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        v = float("nan")
    ok = math.isfinite(v) and (v >= 0 if zero_ok else v > 0) and (at_most is None or v <= at_most)
    if isinstance(value, (bool, str)) or not ok:
        bound = f"in [0, {at_most}]" if at_most is not None else (">= 0" if zero_ok else "> 0")
        raise ValueError(f"weighted_ce: {name} must be a finite number {bound}, got {value!r}")
    return v


def head_of(*, logit_scale=1.0, softcap=None, z_loss=0.0, label_smoothing=0.0) -> Head:
    """The checked :class:`~refit_fast.ops.weighted_ce_torch.Head` of weighted_ce's head options."""
    return Head(scale=_positive(logit_scale, "logit_scale"),
                softcap=0.0 if softcap is None else _positive(softcap, "softcap"),
                z_loss=_positive(z_loss, "z_loss", zero_ok=True),
                smoothing=_positive(label_smoothing, "label_smoothing", zero_ok=True, at_most=1.0))


def shift_labels(labels: torch.Tensor, seq_ids: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets along the last dim: position t gets ``labels[..., t + 1]``; the last position
    of a row, and with `seq_ids` the last position of every packed sequence, gets `ignore_index`.
    Copies only the labels (the hidden states stay where they are).

        >>> shift_labels(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 0, 0, 1, 1]))
        tensor([   6,    7, -100,    9, -100])
    """
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    if seq_ids is not None:
        out[..., :-1].masked_fill_(seq_ids[..., 1:] != seq_ids[..., :-1], ignore_index)
    return out


def prepare_inputs(hidden, weight, labels, seq_ids, rewards, *, bias, standardize, groups, eps, reward_stats,
                   ignore_index, reduction, normalize, impl, denominator=None, shift=False, validate=True,
                   autocast_dtype="auto") -> Prepared:
    """Check weighted_ce's arguments (see :func:`refit_fast.weighted_ce`) and prepare its inputs.

    autocast_dtype: "auto" reads the autocast state; None / a dtype states it (the compiled path,
    whose op runs outside the caller's autocast context)."""
    # ---- options ----
    if reduction not in _REDUCTIONS:
        raise ValueError(f"weighted_ce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if denominator is not None:
        if reduction != "mean":
            raise ValueError(f"weighted_ce: denominator is the normalizer of reduction='mean', got reduction={reduction!r}")
        if normalize is not None:
            raise ValueError("weighted_ce: give normalize or denominator, not both (denominator replaces the normalizer)")
    if normalize is None:
        normalize = "sequence" if seq_ids is not None else "token"
    if normalize not in _NORMALIZE:
        raise ValueError(f"weighted_ce: normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if not isinstance(shift, bool) or not isinstance(validate, bool):
        raise ValueError(f"weighted_ce: shift and validate must be True or False, got {shift!r}, {validate!r}")
    if impl not in _IMPLS:
        raise ValueError(f"weighted_ce: impl must be one of {_IMPLS}, got {impl!r}")
    eps = _as_eps(eps, "weighted_ce")
    mode = _standardize_mode(standardize)
    if mode != "none" and rewards is None:
        raise ValueError(f"weighted_ce: standardize={standardize!r} needs rewards")
    if reward_stats is not None and mode != "batch":
        raise ValueError("weighted_ce: reward_stats is only used with standardize=True/'batch'")
    if mode == "group" and groups is None:
        raise ValueError("weighted_ce: standardize='group' needs groups, the [B] group id of each conversation")
    if groups is not None and mode != "group":
        raise ValueError(f"weighted_ce: groups is only used with standardize='group', got standardize={standardize!r}")

    # ---- tensors: types, shapes, devices ----
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("weighted_ce: hidden, weight and labels must be torch tensors")
    device = hidden.device
    if hidden.dim() < 2:
        raise ValueError(f"weighted_ce: hidden must be [N, D] or [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weighted_ce: weight must be [V, D] with D={hidden.shape[-1]} (hidden's last dim), got {tuple(weight.shape)}")
    compute = None
    autocast = torch.is_autocast_enabled(device.type) if autocast_dtype == "auto" else autocast_dtype is not None
    if autocast:
        # follow autocast like F.linear would: the GEMMs see the inputs rounded to the autocast dtype.
        # The rounding happens inside (per staging block for hidden), so the gradients reach the
        # inputs in their own dtypes: an fp32 master weight gets the fp32 accumulator itself.
        compute = torch.get_autocast_dtype(device.type) if autocast_dtype == "auto" else autocast_dtype
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if t is not None and t.dtype not in _FLOATS:
                raise ValueError(f"weighted_ce: {name} must be a floating-point tensor, got {t.dtype}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"weighted_ce: bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")
        if all(t is None or t.dtype == compute for t in (hidden, weight, bias)):
            compute = None  # nothing to round
    else:
        if hidden.dtype not in _FLOATS:
            raise ValueError(f"weighted_ce: hidden must be float32/bfloat16/float16, got {hidden.dtype}")
        if weight.dtype != hidden.dtype:
            raise ValueError(f"weighted_ce: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} (cast one, or use autocast)")
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
            raise ValueError(f"weighted_ce: bias must be [V]={weight.shape[0]} of dtype {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    cdt = compute or hidden.dtype  # the dtype the GEMMs take
    lead = hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"weighted_ce: labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(lead)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"weighted_ce: labels must be an integer tensor, got {labels.dtype}")
    if seq_ids is not None and not isinstance(seq_ids, torch.Tensor):  # a list / numpy array, like rewards
        try:
            seq_ids = torch.as_tensor(seq_ids, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"weighted_ce: seq_ids must be integers of shape {tuple(lead)}: {e}") from None
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("seq_ids", seq_ids)):
        if t is not None and t.device != device:
            raise ValueError(f"weighted_ce: {name} is on {t.device} but hidden is on {device}")
    if seq_ids is not None:
        if not isinstance(seq_ids, torch.Tensor) or seq_ids.shape != lead:
            raise ValueError(f"weighted_ce: seq_ids must be a tensor of shape {tuple(lead)}")
        if seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
            raise ValueError(f"weighted_ce: seq_ids must be an integer tensor, got {seq_ids.dtype}")
    if rewards is not None:
        if isinstance(rewards, torch.Tensor):
            if rewards.device != device:
                raise ValueError(f"weighted_ce: rewards is on {rewards.device} but hidden is on {device}")
        else:  # a list / numpy array of floats is data: bring it to the device
            rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
        if not rewards.is_floating_point():
            rewards = rewards.float()
        rewards = rewards.detach().reshape(-1)
    if groups is not None:
        if not isinstance(groups, torch.Tensor):
            raise ValueError(f"weighted_ce: groups must be a [B] integer tensor, got {type(groups).__name__}")
        if groups.dim() != 1 or groups.numel() != rewards.numel():
            raise ValueError(f"weighted_ce: groups must have shape [B]=({rewards.numel()},) like rewards, got {tuple(groups.shape)}")
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(f"weighted_ce: groups must be an integer tensor, got {groups.dtype}")
        if groups.device != device:
            raise ValueError(f"weighted_ce: groups is on {groups.device} but hidden is on {device}")
        groups = groups.detach() if groups.dtype == torch.int64 else groups.detach().long()

    if denominator is not None:
        if isinstance(denominator, torch.Tensor):
            if denominator.numel() != 1 or denominator.is_complex() or denominator.dtype == torch.bool:
                raise ValueError(f"weighted_ce: denominator must be one number, got a tensor of shape {tuple(denominator.shape)}")
            denominator = denominator.detach().reshape(()).to(device=device, dtype=torch.float64)
        else:
            denominator = torch.tensor(_positive(denominator, "denominator"), dtype=torch.float64, device=device)

    # ---- impl ----
    if impl == "auto":
        impl = "triton" if (device.type == "cuda" and K.HAS_TRITON) else "torch"
    if impl == "triton":
        if not K.HAS_TRITON:
            raise ValueError("weighted_ce: impl='triton' needs the triton package (pip install triton)")
        if cdt == torch.float64:
            raise ValueError("weighted_ce: impl='triton' computes in fp32; use impl='torch' for float64")
        if device.type != "cuda" and not K._interpreting():
            raise ValueError("weighted_ce: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret on CPU); use impl='torch'")

    # ---- flatten; conversation of each token ----
    D = hidden.shape[-1]
    V = weight.shape[0]
    h2 = hidden.reshape(-1, D)
    y = (shift_labels(labels, seq_ids, ignore_index) if shift else labels).reshape(-1)
    if seq_ids is None:
        if hidden.dim() == 3:
            sid = torch.arange(lead[0], device=device)[:, None].expand(lead).reshape(-1)
            n_conv = lead[0]
        else:
            sid = torch.zeros_like(y)
            n_conv = 1
    else:
        sid = seq_ids.reshape(-1)
        n_conv = rewards.numel() if rewards is not None else None

    # ---- value checks: one host sync for all of them ----
    valid = y != ignore_index
    if not validate:  # only what the shapes need: the trained-token count (and the conversation count)
        return _prepare_unchecked(h2, weight, bias, y, valid, sid, seq_ids, rewards, n_conv, mode, eps, reward_stats,
                                  groups, reduction, normalize, denominator, impl, lead, compute, cdt)
    checks = [valid.sum(), (valid & ((y < 0) | (y >= V))).any()]
    if seq_ids is not None:
        checks += [(valid & (sid < 0)).any(), torch.where(valid, sid, -1).max() if sid.numel() else torch.tensor(-1, device=device)]
    if rewards is not None:
        checks.append((~torch.isfinite(rewards)).any())
        # only float64 rewards can be this large; the float64 sums of squared deviations stay finite
        checks.append((rewards.abs() > REWARD_LIMIT).any() if rewards.dtype == torch.float64 else torch.tensor(False, device=device))
    if groups is not None:
        checks.append((groups < 0).any() if groups.numel() else torch.tensor(False, device=device))
    if reward_stats is not None:
        if not isinstance(reward_stats, (tuple, list)) or len(reward_stats) != 2:
            raise ValueError("weighted_ce: reward_stats must be a (mean, std) pair")
        stats = (_as_stat(reward_stats[0], "mean", device), _as_stat(reward_stats[1], "std", device))
        checks += [(~torch.isfinite(stats[0])) | (~torch.isfinite(stats[1])), stats[1] < 0]
    else:
        stats = None
    if denominator is not None:
        checks.append((~torch.isfinite(denominator)) | (denominator <= 0))
    vals = torch.stack([c.to(torch.int64).reshape(()) for c in checks]).tolist()
    n_valid, bad_label = vals[0], vals[1]
    if bad_label:
        bad = y[valid & ((y < 0) | (y >= V))][0].item()
        raise ValueError(f"weighted_ce: label {bad} is outside [0, V={V}) and is not ignore_index={ignore_index}")
    pos = 2
    if seq_ids is not None:
        neg, sid_max = vals[pos], vals[pos + 1]
        pos += 2
        if n_conv is None:
            n_conv = sid_max + 1
        if neg or sid_max >= n_conv:
            bad = sid[valid & ((sid < 0) | (sid >= n_conv))][0].item()
            raise ValueError(f"weighted_ce: seq_ids value {bad} on a trained token is outside [0, B={n_conv}) (B = len(rewards))")
    if rewards is not None:
        if rewards.numel() != n_conv:
            raise ValueError(f"weighted_ce: rewards has {rewards.numel()} entries but there are {n_conv} conversations")
        if vals[pos]:
            raise ValueError("weighted_ce: rewards contain NaN or inf")
        if vals[pos + 1]:
            raise ValueError(f"weighted_ce: rewards must be at most {REWARD_LIMIT:g} in magnitude")
        pos += 2
    if groups is not None:
        if vals[pos]:
            bad = groups[groups < 0][0].item()
            raise ValueError(f"weighted_ce: groups value {bad} is negative (group ids must be >= 0)")
        pos += 1
    if stats is not None:
        if vals[pos]:
            raise ValueError("weighted_ce: reward_stats contain NaN or inf")
        if vals[pos + 1]:
            raise ValueError("weighted_ce: reward_stats std must be >= 0")
        pos += 2
    if denominator is not None and vals[pos]:
        raise ValueError(f"weighted_ce: denominator must be a finite number > 0, got {denominator.item()!r}")
    return _finish(h2, weight, bias, y, valid, sid, rewards, n_valid, n_conv, mode, eps, stats, groups, reduction,
                   normalize, denominator, impl, lead, compute, cdt)


def _prepare_unchecked(h2, weight, bias, y, valid, sid, seq_ids, rewards, n_conv, mode, eps, reward_stats, groups,
                       reduction, normalize, denominator, impl, lead, compute, cdt) -> Prepared:
    """prepare_inputs with validate=False: one host read (the counts), no value checks."""
    device = h2.device
    counts = [valid.sum()]
    if seq_ids is not None and n_conv is None:
        counts.append(torch.where(valid, sid, -1).max() if sid.numel() else torch.tensor(-1, device=device))
    vals = torch.stack([c.to(torch.int64).reshape(()) for c in counts]).tolist()
    if n_conv is None:
        n_conv = vals[1] + 1 if len(vals) > 1 else 1
    stats = None
    if reward_stats is not None:
        stats = (_as_stat(reward_stats[0], "mean", device), _as_stat(reward_stats[1], "std", device))
    return _finish(h2, weight, bias, y, valid, sid, rewards, vals[0], n_conv, mode, eps, stats, groups, reduction,
                   normalize, denominator, impl, lead, compute, cdt)


def _finish(h2, weight, bias, y, valid, sid, rewards, n_valid, n_conv, mode, eps, stats, groups, reduction,
            normalize, denominator, impl, lead, compute, cdt) -> Prepared:
    """The trained tokens, their weights and the normalizer (no further host sync)."""
    device = h2.device
    idx_v = torch.nonzero_static(valid, size=n_valid).reshape(-1) if n_valid else valid.new_zeros(0, dtype=torch.long)
    labels_v = y.index_select(0, idx_v).long()
    sid_v = sid.index_select(0, idx_v).long()
    if rewards is None:
        w_v = torch.ones(n_valid, dtype=torch.float32, device=device)
    else:
        weights_fn = K.token_weights_triton if impl == "triton" else token_weights_torch
        w_v = weights_fn(rewards, sid_v, standardize=mode, eps=eps, reward_stats=stats, groups=groups)
    w_v = w_v.to(torch.float64 if cdt == torch.float64 else torch.float32)  # rounded once
    if denominator is not None:
        denom = denominator.to(torch.float64 if cdt == torch.float64 else torch.float32)
    elif reduction == "mean" and normalize == "sequence":
        present = torch.zeros(max(n_conv, 1), dtype=torch.bool, device=device).index_fill_(0, sid_v, True)
        denom = present.sum().clamp_min(1).to(torch.float32)
    elif reduction == "mean" and normalize == "token":
        denom = torch.tensor(float(max(n_valid, 1)), device=device)
    else:
        denom = torch.tensor(1.0, device=device)
    if cdt == torch.float64:
        denom = denom.double()

    return Prepared(h2, weight, bias, labels_v, idx_v, w_v, denom, impl, lead, compute)
