"""The naive, materializing implementation of weighted_ce: the ground truth for the tests and the
"naive PyTorch" baseline of the benchmarks.

It builds the full [N, V] logits and lets autograd do the rest, so it shares no code with the
chunked implementations it checks. Pass float64 tensors to get the float64 truth.
"""
from __future__ import annotations

import torch


def weighted_ce_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    standardize=False,
    groups: torch.Tensor | None = None,
    eps: float = 1e-6,
    reward_stats=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str | None = None,
    denominator=None,
    shift: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Same contract as :func:`refit_fast.weighted_ce`, without validation, materializing the logits.

    standardize: False/None/"none", True/"batch" (statistics of all rewards, or `reward_stats`),
    "group" (statistics of each conversation's group, `groups` [B]): written out plainly below, a
    loop over the distinct groups; a set whose rewards are all equal (or a given std of 0) gives 0.

    Example::

        >>> h, W = torch.randn(6, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
        >>> y = torch.tensor([1, 2, -100, 3, 4, 5])
        >>> ref = weighted_ce_reference(h, W, y, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1.0, 0.5]))
        >>> from refit_fast.ops import weighted_ce
        >>> torch.allclose(ref, weighted_ce(h, W, y, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1.0, 0.5])))
        True
    """
    D = hidden.shape[-1]
    if normalize is None:
        normalize = "sequence" if seq_ids is not None else "token"
    if shift:  # written out: the next label of the same row and the same conversation, else ignored
        nxt = torch.full_like(labels, ignore_index)
        nxt[..., :-1] = labels[..., 1:]
        if seq_ids is not None:
            same = seq_ids[..., 1:] == seq_ids[..., :-1]
            nxt[..., :-1] = torch.where(same, nxt[..., :-1], torch.full_like(nxt[..., :-1], ignore_index))
        labels = nxt
    if seq_ids is None:
        if hidden.dim() == 3:  # [B, T, D]: each row is a conversation
            seq_ids = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand(hidden.shape[:2])
        else:
            seq_ids = torch.zeros(labels.shape, dtype=torch.long, device=hidden.device)
    h = hidden.reshape(-1, D)
    y = labels.reshape(-1)
    sid = seq_ids.reshape(-1)

    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    # upcast like a careful user would: the softmax in at least fp32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    valid = y != ignore_index
    nll = -logp.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    if label_smoothing:  # F.cross_entropy's smoothed target: label_smoothing / V on every class
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))

    if rewards is None:
        w = torch.ones_like(nll)
    else:
        r = torch.as_tensor(rewards, device=hidden.device).to(nll.dtype).reshape(-1)
        if standardize is True or standardize == "batch":
            if reward_stats is not None:
                mean, std = (torch.as_tensor(v, dtype=torch.float64, device=hidden.device) for v in reward_stats)
                r64 = r.double()
                r = torch.zeros_like(r) if std == 0 else ((r64 - mean) / (std + eps)).to(r.dtype)
            else:
                r = _standardized(r, eps)
        elif standardize == "group":
            out = torch.zeros_like(r)
            for g in torch.unique(groups).tolist():
                members = groups == g
                out[members] = _standardized(r[members], eps)
            r = out
        w = torch.where(valid, r[torch.where(valid, sid, 0)], torch.zeros_like(nll))
    per_token = w * nll
    if z_loss:  # not reward-weighted
        lse = torch.logsumexp(logits, dim=-1)
        per_token = per_token + torch.where(valid, z_loss * lse.square(), torch.zeros_like(lse))

    if reduction == "none":
        return per_token.reshape(labels.shape)
    total = per_token.sum()
    if denominator is not None:
        return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device).reshape(())
    if reduction == "sum" or normalize == "none":
        return total
    if normalize == "token":
        return total / valid.sum().clamp_min(1)
    n_conv = torch.unique(sid[valid]).numel()
    return total / max(n_conv, 1)


def _standardized(r: torch.Tensor, eps: float) -> torch.Tensor:
    """(r - mean) / (std + eps) over one set of rewards, in float64 (population std); all equal -> 0."""
    if bool((r == r[0]).all()):
        return torch.zeros_like(r)
    r64 = r.double()
    mean = r64.mean()
    std = ((r64 - mean) ** 2).mean().sqrt()
    return ((r64 - mean) / (std + eps)).to(r.dtype)
