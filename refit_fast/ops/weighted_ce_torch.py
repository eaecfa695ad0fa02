"""The plain-PyTorch pieces of weighted_ce: the CPU fallback and the readable statement of what the
Triton kernels in weighted_ce.py compute.

The chunk loop itself (the plan of chunking.py, matmuls by the BLAS) is shared with the Triton path
and lives in chunking.py; the two paths differ only in the per-token weights and the per-row loss
below (the kernels of kernels.py). :func:`standardize_rewards` is the one statement of Swift's reward
standardization, shared by weighted_ce's torch path and by callers that standardize a whole
dataset's rewards once (the trainer).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

# |rewards| above this could overflow the float64 sum of squared deviations of millions of rewards
REWARD_LIMIT = 1e100


def standardize_rewards(rewards, groups=None, *, eps: float = 1e-6, stats=None) -> torch.Tensor:
    """Swift's standardized rewards ``(r_i - mean) / (std + eps)``, computed in float64.

    The statistics are the mean and the *population* std (divide by n) of

    - all entries of `rewards` (``groups=None``, the batch statistics), or the given
      ``stats=(mean, std)`` (e.g. statistics of a whole dataset, or all-reduced over ranks);
    - with `groups`, the rewards of conversation i's own group (prompt): the m conversations logged
      for the same context, as in the paper.

    Exactness: every set is shifted by one of its members (its first, in index order) before the
    sums, so a set of identical rewards (e.g. seven copies of 100.1) has deviations of exactly 0,
    and the float64 sums do not overflow for rewards up to 1e100 in magnitude (float32 rewards of
    1e20-1e30 are exact). A set whose std is 0 (identical rewards, one member, or a given std of 0)
    gives weight exactly 0, also with eps=0; never NaN.

    Args:
        rewards: [B] real numbers (tensor, list or array), finite, ``|r| <= 1e100``.
        groups: None, or [B] integer tensor on rewards' device, >= 0: the group (prompt) of each
            conversation. Ids need not be consecutive or sorted; each distinct id is one group.
        eps: >= 0, added to the std.
        stats: (mean, std) numbers to use instead of the batch's own (only with ``groups=None``);
            std >= 0.

    Returns:
        [B] float64 tensor on rewards' device.

    Cost: O(B) (index_add / scatter over the groups); group ids larger than 4 B + 1024 are first
    renumbered with a sort (``torch.unique``), O(B log B). On a CUDA tensor the checks and the group
    count read back to the host.

    Raises:
        ValueError: naming the argument, for a wrong shape, dtype or device, non-finite or too large
            rewards, negative group ids, bad stats or eps.

    Example::

        >>> standardize_rewards(torch.tensor([1.0, 3.0, 0.5, 0.5, 7.0]), torch.tensor([4, 4, 0, 0, 2]))
        tensor([-1.0000,  1.0000,  0.0000,  0.0000,  0.0000], dtype=torch.float64)
        >>> standardize_rewards(torch.tensor([1.0, 3.0]), eps=0.0)
        tensor([-1.,  1.], dtype=torch.float64)
        >>> standardize_rewards(torch.tensor([1.0, 3.0]), eps=0.0, stats=(2.0, 2.0))
        tensor([-0.5000,  0.5000], dtype=torch.float64)
    """
    name = "standardize_rewards"
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{name}: rewards must be a 1-D [B] tensor, got shape {tuple(rewards.shape)}")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise ValueError(f"{name}: rewards must be real numbers, got {rewards.dtype}")
    r = rewards.detach().to(torch.float64)
    eps = _as_eps(eps, name)
    if r.numel() and bool(((~torch.isfinite(r)) | (r.abs() > REWARD_LIMIT)).any()):
        raise ValueError(f"{name}: rewards must be finite and at most {REWARD_LIMIT:g} in magnitude")
    if groups is not None:
        if stats is not None:
            raise ValueError(f"{name}: stats is only used without groups (batch statistics)")
        if not isinstance(groups, torch.Tensor):
            raise ValueError(f"{name}: groups must be a [B] integer tensor, got {type(groups).__name__}")
        if groups.shape != r.shape:
            raise ValueError(f"{name}: groups must have shape [B]={tuple(r.shape)} like rewards, got {tuple(groups.shape)}")
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(f"{name}: groups must be an integer tensor, got {groups.dtype}")
        if groups.device != r.device:
            raise ValueError(f"{name}: groups is on {groups.device} but rewards is on {r.device}")
        if groups.numel() and bool((groups < 0).any()):
            raise ValueError(f"{name}: groups must be >= 0")
    if stats is not None:
        stats = _check_stats(stats, r.device, name)
    return _standardize(r, groups, eps, stats)


def _as_eps(eps, name: str) -> float:
    """eps as a Python float, or a ValueError unless it is one finite number >= 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}") from None
    if isinstance(eps, (bool, str)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
    return value


def _check_stats(stats, device, name):
    if not isinstance(stats, (tuple, list)) or len(stats) != 2:
        raise ValueError(f"{name}: stats must be a (mean, std) pair")
    out = []
    for what, v in zip(("mean", "std"), stats):
        t = torch.as_tensor(v, device=device) if not isinstance(v, torch.Tensor) else v.detach().to(device)
        if t.numel() != 1 or t.is_complex():
            raise ValueError(f"{name}: stats {what} must be one number, got shape {tuple(t.shape)}")
        out.append(t.reshape(()).to(torch.float64))
    if not bool(torch.isfinite(out[0]) & torch.isfinite(out[1])):
        raise ValueError(f"{name}: stats contain NaN or inf")
    if bool(out[1] < 0):
        raise ValueError(f"{name}: stats std must be >= 0")
    return tuple(out)


def _dense_ids(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group ids as indices into [0, n_groups): the ids themselves when they are small, else their
    rank among the distinct ids."""
    B = groups.numel()
    top = int(groups.max()) + 1 if B else 0
    if top <= 4 * B + 1024:
        return groups.long(), top
    uniq, inverse = torch.unique(groups, return_inverse=True)
    return inverse.reshape(-1), uniq.numel()


def _standardize(r: torch.Tensor, groups, eps: float, stats) -> torch.Tensor:
    """standardize_rewards without the checks: r [B] float64, groups [B] ids >= 0 or None,
    stats a (mean, std) pair of float64 0-dim tensors or None."""
    B = r.numel()
    if stats is not None:
        mean, std = stats
        dev = r - mean
    elif B == 0:
        return r.clone()
    elif groups is None:
        d = r - r[0]  # the shift: identical rewards give d == 0 exactly
        dev = d - d.mean()
        std = dev.square().mean().sqrt()  # population std
    else:
        gid, n = _dense_ids(groups)
        first = torch.full((n,), B, dtype=torch.long, device=r.device).scatter_reduce_(
            0, gid, torch.arange(B, device=r.device), "amin")  # each group's first member
        d = r - r[first.clamp_max(B - 1)[gid]]
        count = torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, gid, torch.ones_like(r))
        count = count.clamp_min(1)  # ids that no conversation uses
        mean_d = torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, gid, d) / count
        dev = d - mean_d[gid]
        var = torch.zeros(n, dtype=torch.float64, device=r.device).index_add_(0, gid, dev.square()) / count
        std = var.sqrt()[gid]
    out = dev / (std + eps)
    return torch.where(std == 0, torch.zeros_like(out), out)


def token_weights_torch(rewards, seq_ids_valid, *, standardize, eps, reward_stats, groups=None):
    """Per-token reward weight w_t = r~[seq_ids_t] for the trained tokens [Nv]: the rewards as given
    (standardize="none", Refit; fp32, or fp64 if rewards are) or standardized in float64 (returned
    as float64; the caller rounds once): "batch" (statistics of all entries of `rewards`, or
    `reward_stats` = (mean, std) float64 0-dim tensors) or "group" (per-group statistics of
    `groups` [B] ids >= 0), by :func:`standardize_rewards`'s rule.

        >>> token_weights_torch(torch.tensor([1.0, 3.0]), torch.tensor([0, 0, 1]),
        ...                     standardize="batch", eps=0.0, reward_stats=None)
        tensor([-1., -1.,  1.], dtype=torch.float64)
    """
    if standardize == "none":
        r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    else:
        r = _standardize(rewards.to(torch.float64), groups if standardize == "group" else None, eps,
                         reward_stats if standardize == "batch" else None)
    return r[seq_ids_valid]


class Head(NamedTuple):
    """What the head does to the logits and what the loss adds, beyond plain cross-entropy (all
    off by default). For each trained row, with z = hidden @ weight.T (+ bias):

        z' = scale * z;   zc = softcap * tanh(z' / softcap)  (softcap > 0; else zc = z')
        loss = w * ((1 - ls) * (lse - zc[y]) + ls * (lse - mean_j zc_j)) + z_loss * lse^2

    with lse = logsumexp(zc), w the token's reward weight and ls the label smoothing (the smoothed
    target puts ls / V on every class, as ``F.cross_entropy(label_smoothing=ls)``). The z-loss term
    (PaLM's ``z_loss * log(Z)^2``) is not reward-weighted: a negative Swift weight would otherwise
    reward a growing normalizer."""

    scale: float = 1.0
    softcap: float = 0.0
    z_loss: float = 0.0
    smoothing: float = 0.0

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and not self.softcap and not self.z_loss and not self.smoothing


PLAIN = Head()
_HEAD_BLOCK = 32  # rows per temporary in the softcap path: an O(32 V) scratch, not O(sub-chunk)


def ce_rows_torch(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head: Head = PLAIN):
    """Loss and logits-gradient of one sub-chunk of c rows (the statement of `_ce_rows_kernel`).

    Rows z0..z0+c of the logits `zbuf` [*, V] (fp32/fp64, overwritten) are tokens t0..t0+c of
    labels_v [Nv] (in [0, V)), w_v [Nv] (reward weights) and loss_v [Nv] (written: w * nll, or the
    :class:`Head`'s loss); coef is a 0-dim tensor or [Nv] (the upstream/normalization factor, per
    row). Unless grad is None, rows g0..g0+c of `grad` [*, V] (the staging block; may be zbuf
    itself) get coef * dloss/dz in grad's dtype: w * coef * (softmax - onehot(label)) for the plain
    head. No [c, V] temporary (a softcap head uses [32, V] scratch).

        >>> z, loss = torch.tensor([[0.0, 0.0]]), torch.empty(1)
        >>> ce_rows_torch(z, 0, z, 0, 1, torch.tensor([1]), torch.ones(1), torch.tensor(1.0), loss, 0)
        >>> loss, z
        (tensor([0.6931]), tensor([[ 0.5000, -0.5000]]))
    """
    if not head.plain:
        return _ce_rows_head(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head)
    z = zbuf[z0:z0 + c]
    y = labels_v[t0:t0 + c, None]
    w = w_v[t0:t0 + c]
    target = z.gather(1, y).squeeze(1)
    m = z.amax(1)
    z.sub_(m[:, None]).exp_()  # exp(z - m) in place: the logits are not needed after this
    s = z.sum(1)
    loss_v[t0:t0 + c] = w * (m + s.log() - target)
    if grad is None:
        return
    scale = w * (coef[t0:t0 + c] if coef.dim() == 1 else coef)
    g = grad[g0:g0 + c]
    if g.data_ptr() == z.data_ptr() and g.dtype == z.dtype:
        g.mul_((scale / s).to(g.dtype)[:, None])
    else:
        torch.mul(z, (scale / s)[:, None], out=g)
    g.scatter_add_(1, y, -scale.to(g.dtype)[:, None])


def _ce_rows_head(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head: Head):
    """ce_rows_torch for a non-plain :class:`Head` (scale, softcap, z-loss, label smoothing)."""
    z = zbuf[z0:z0 + c]
    V = z.shape[1]
    y = labels_v[t0:t0 + c, None]
    w = w_v[t0:t0 + c]
    if head.scale != 1.0:
        z.mul_(head.scale)
    cap = head.softcap
    if cap:
        z.div_(cap).tanh_().mul_(cap)  # the capped logits, kept: the gradient needs them
    target = z.gather(1, y).squeeze(1)
    m = z.amax(1)
    zsum = z.sum(1) if head.smoothing else None
    if cap:
        s = torch.empty_like(m)
        for r0 in range(0, c, _HEAD_BLOCK):
            s[r0:r0 + _HEAD_BLOCK] = (z[r0:r0 + _HEAD_BLOCK] - m[r0:r0 + _HEAD_BLOCK, None]).exp_().sum(1)
    else:
        z.sub_(m[:, None]).exp_()  # exp(z - m) in place
        s = z.sum(1)
    lse = m + s.log()
    ls = head.smoothing
    nll = lse - target if not ls else lse - (1.0 - ls) * target - (ls / V) * zsum
    loss = w * nll
    if head.z_loss:
        loss = loss + head.z_loss * lse.square()
    loss_v[t0:t0 + c] = loss
    if grad is None:
        return
    cr = (coef[t0:t0 + c] if coef.dim() == 1 else coef) * head.scale  # d z' / d z = scale, folded in
    a = cr * (w + 2.0 * head.z_loss * lse) if head.z_loss else cr * w   # on softmax
    b = cr * w * (1.0 - ls)                                              # on the label
    d = cr * w * (ls / V) if ls else None                                # on every class
    g = grad[g0:g0 + c]
    if not cap:
        if g.data_ptr() == z.data_ptr() and g.dtype == z.dtype:
            g.mul_((a / s).to(g.dtype)[:, None])
        else:
            torch.mul(z, (a / s)[:, None], out=g)
        if d is not None:
            g.sub_(d.to(g.dtype)[:, None])
        g.scatter_add_(1, y, -b.to(g.dtype)[:, None])
        return
    # softcap: d zc / d z' = 1 - (zc / cap)^2, from the kept capped logits, in blocks of rows
    for r0 in range(0, c, _HEAD_BLOCK):
        r1 = min(c, r0 + _HEAD_BLOCK)
        zb = z[r0:r1]
        gb = (zb - m[r0:r1, None]).exp_().mul_((a[r0:r1] / s[r0:r1])[:, None])
        if d is not None:
            gb.sub_(d[r0:r1, None])
        gb.scatter_add_(1, y[r0:r1], -b[r0:r1, None])
        gb.mul_(1.0 - (zb / cap).square_())
        g[r0:r1] = gb
