"""The plain-PyTorch pieces of weighted_ce: the CPU fallback and the readable statement of what the
Triton kernels in weighted_ce.py compute.

The chunk loop itself (one [chunk, V] logits buffer at a time, matmuls by the BLAS) is shared with
the Triton path and lives in weighted_ce.py; the two paths differ only in the two functions below.
"""
from __future__ import annotations

import torch


def token_weights_torch(rewards, seq_ids_valid, *, standardize, eps, reward_stats):
    """Per-token reward weight w_t = r~[seq_ids_t] for the trained tokens, in fp32 (fp64 if rewards are).

    r~ are the rewards as given (Refit), or standardized with the batch statistics (Swift): mean and
    population std over all entries of `rewards`, unless `reward_stats=(mean, std)` is given.

        >>> token_weights_torch(torch.tensor([1.0, 3.0]), torch.tensor([0, 0, 1]),
        ...                     standardize=True, eps=0.0, reward_stats=None)
        tensor([-1., -1.,  1.])
    """
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if standardize:
        if reward_stats is not None:
            mean, std = reward_stats[0].to(r.dtype), reward_stats[1].to(r.dtype)
        else:
            mean = r.mean()
            std = (r - mean).square().mean().sqrt()  # population std (unbiased=False)
        r = (r - mean) / (std + eps)
    return r[seq_ids_valid]


def ce_rows_torch(logits, labels, w, coef, compute_grad, grad_dtype):
    """Loss and logits-gradient of one chunk of rows.

    logits: [c, V] fp32/fp64 (overwritten when compute_grad), labels: [c] in [0, V), w: [c] reward
    weights, coef: scalar tensor or [c] (the upstream/normalization factor of the gradient).
    Returns (w * nll [c], grad [c, V] in grad_dtype or None) with
    grad = w * coef * (softmax(logits) - onehot(labels)).

        >>> z = torch.tensor([[0.0, 0.0]])
        >>> ce_rows_torch(z, torch.tensor([1]), torch.ones(1), torch.tensor(1.0), True, torch.float32)
        (tensor([0.6931]), tensor([[ 0.5000, -0.5000]]))
    """
    lse = torch.logsumexp(logits, dim=1)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    loss = w * (lse - target)
    if not compute_grad:
        return loss, None
    scale = (w * coef).to(logits.dtype)
    # softmax * scale in place: the chunk's logits buffer becomes its gradient buffer
    logits.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    logits.scatter_add_(1, labels[:, None], -scale[:, None])
    grad = logits if grad_dtype == logits.dtype else logits.to(grad_dtype)
    return loss, grad
