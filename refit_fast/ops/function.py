"""The autograd Function of weighted_ce: a thin layer over the chunked driver of chunking.py."""
from __future__ import annotations

import torch

from refit_fast.ops.chunking import CEOptions, fused_linear_ce


class WeightedCEFunction(torch.autograd.Function):
    """Differentiable core on validated, flattened inputs (use :func:`weighted_ce`, which validates).

    forward(hidden [N, D], weight [V, D], bias [V] or None, labels_v [Nv], idx_v [Nv], w_v [Nv],
    denom (0-dim fp32), reduction, impl, opts, grad_enabled) -> loss (0-dim, or [N] for "none").
    `opts` is the one options object (:class:`~refit_fast.ops.chunking.CEOptions`: the budget and
    the weight-gradient accumulator) that fixes the chunk plan.

    With reduction "sum"/"mean" the gradients are computed in the forward pass and the backward only
    scales them by the upstream gradient, in place, and not at all when it is 1 (one host read of
    that scalar); the gradients are handed over to autograd (no second [V, D] buffer), so a second
    backward through the same graph is refused with a RuntimeError. With "none" the backward
    recomputes the chunks with the per-token upstream gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels_v, idx_v, w_v, denom, reduction, impl, opts: CEOptions, grad_enabled):
        need = tuple(bool(grad_enabled and t is not None and t.requires_grad) for t in (hidden, weight, bias))
        ctx.reduction, ctx.need = reduction, need
        N = hidden.shape[0]
        if reduction == "none":
            # the upstream gradient differs per token: losses now, gradients recomputed in backward
            loss_v, *_ = fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, denom, (False,) * 3, impl, opts)
            ctx.save_for_backward(hidden, weight, bias, labels_v, idx_v, w_v)
            ctx.impl, ctx.opts = impl, opts
            return torch.zeros(N, dtype=loss_v.dtype, device=hidden.device).index_copy_(0, idx_v, loss_v)
        coef = 1.0 / denom  # "sum": denom is 1
        loss_v, dh, dW, db = fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, coef, need, impl, opts)
        # held as a plain attribute, not saved tensors: backward hands them over, so autograd's
        # gradient accumulation can take them as they are instead of copying [V, D]
        ctx.grads = [dh, dW, db]
        return loss_v.sum() * coef

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, labels_v, idx_v, w_v = ctx.saved_tensors
            coef = grad_out.reshape(-1).to(w_v.dtype).index_select(0, idx_v)
            _, dh, dW, db = fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, coef, ctx.need, ctx.impl, ctx.opts)
        else:
            if ctx.grads is None:
                raise RuntimeError("weighted_ce: a second backward through the same graph (retain_graph=True) is not "
                                   "supported with reduction 'sum'/'mean': the first one handed its gradients over")
            dh, dW, db = ctx.grads
            ctx.grads = None
            if bool(grad_out != 1):  # scale in place; g == 1 (loss.backward()) touches nothing
                g = grad_out.to(torch.float64 if grad_out.dtype == torch.float64 else torch.float32)
                for t in (dh, dW, db):
                    if t is not None:
                        t.mul_(g)
        return dh, dW, db, None, None, None, None, None, None, None, None
