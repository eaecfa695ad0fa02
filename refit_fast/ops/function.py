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


# ----------------------------------------------------------------------------------------------
# The same core as a custom op, for torch.compile: dynamo sees one opaque op (no graph break on the
# checks' host read or the data-dependent number of trained tokens), AOTAutograd its backward.
# ----------------------------------------------------------------------------------------------
_DTYPES = {"": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def dtype_name(dtype) -> str:
    """The op's spelling of an optional dtype ("" for None)."""
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def _op_inputs(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, denominator, standardize, eps,
               ignore_index, reduction, normalize, shift, validate, impl, chunk_bytes, fp32_weight_grad, compute,
               scale, softcap, z_loss, smoothing):
    from refit_fast.ops.validation import prepare_inputs
    from refit_fast.ops.weighted_ce_torch import Head

    compute_dtype = _DTYPES[compute]
    opts = CEOptions(chunk_bytes=chunk_bytes, fp32_weight_grad=None if fp32_weight_grad < 0 else bool(fp32_weight_grad),
                     head=Head(scale, softcap, z_loss, smoothing))
    p = prepare_inputs(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize, groups=groups,
                       eps=eps, reward_stats=None if stats is None else (stats[0], stats[1]),
                       ignore_index=ignore_index, reduction=reduction, normalize=normalize or None, impl=impl,
                       denominator=denominator, shift=shift, validate=validate, autocast_dtype=compute_dtype)
    if p.compute_dtype is not None:
        opts = CEOptions(opts.chunk_bytes, opts.fp32_weight_grad, p.compute_dtype, opts.head)
    return p, opts


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


@torch.library.custom_op("refit_fast::weighted_ce", mutates_args=())
def weighted_ce_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    seq_ids: torch.Tensor | None, rewards: torch.Tensor | None, groups: torch.Tensor | None,
    stats: torch.Tensor | None, denominator: torch.Tensor | None, standardize: str, eps: float,
    ignore_index: int, reduction: str, normalize: str, shift: bool, validate: bool, impl: str,
    chunk_bytes: int, fp32_weight_grad: int, compute: str, scale: float, softcap: float, z_loss: float,
    smoothing: float, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weighted_ce as one op: (loss, dh, dW, db); with reduction "sum"/"mean" the gradients (for a
    unit upstream gradient) come out of the forward, empty where not needed; with "none" all three
    are empty and the backward recomputes. String/number arguments spell weighted_ce's options
    (normalize "" = the default; fp32_weight_grad -1 = the default; compute "" = the inputs' dtype)."""
    p, opts = _op_inputs(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, denominator, standardize,
                         eps, ignore_index, reduction, normalize, shift, validate, impl, chunk_bytes,
                         fp32_weight_grad, compute, scale, softcap, z_loss, smoothing)
    N = p.hidden.shape[0]
    if reduction == "none":
        loss_v, *_ = fused_linear_ce(p.hidden, p.weight, p.bias, p.labels_v, p.idx_v, p.w_v, p.denom, (False,) * 3,
                                     p.impl, opts)
        loss = torch.zeros(N, dtype=loss_v.dtype, device=hidden.device).index_copy_(0, p.idx_v, loss_v)
        return loss.reshape(p.lead), _empty(hidden), _empty(weight), _empty(hidden)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    coef = 1.0 / p.denom
    loss_v, dh, dW, db = fused_linear_ce(p.hidden, p.weight, p.bias, p.labels_v, p.idx_v, p.w_v, coef, need, p.impl,
                                         opts)
    loss = loss_v.sum() * coef
    return (loss, _empty(hidden) if dh is None else dh.reshape(hidden.shape),
            _empty(weight) if dW is None else dW, _empty(hidden) if db is None else db)


def _acc_dtype(hidden, compute):
    return torch.float64 if (_DTYPES[compute] or hidden.dtype) == torch.float64 else torch.float32


@weighted_ce_op.register_fake
def _weighted_ce_fake(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, denominator, standardize, eps,
                      ignore_index, reduction, normalize, shift, validate, impl, chunk_bytes, fp32_weight_grad,
                      compute, scale, softcap, z_loss, smoothing, need_hidden, need_weight, need_bias):
    acc = _acc_dtype(hidden, compute)
    if reduction == "none":
        return (hidden.new_empty(labels.shape, dtype=acc), _empty(hidden), _empty(weight), _empty(hidden))
    return (hidden.new_empty((), dtype=acc),
            torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if (need_bias and bias is not None) else _empty(hidden))


@torch.library.custom_op("refit_fast::weighted_ce_backward", mutates_args=())
def weighted_ce_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    seq_ids: torch.Tensor | None, rewards: torch.Tensor | None, groups: torch.Tensor | None,
    stats: torch.Tensor | None, grad: torch.Tensor, standardize: str, eps: float, ignore_index: int, shift: bool,
    impl: str, chunk_bytes: int, fp32_weight_grad: int, compute: str, scale: float, softcap: float, z_loss: float,
    smoothing: float, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of weighted_ce_op with reduction "none": the chunks recomputed with the
    per-token upstream gradient `grad` (labels' shape). (dh, dW, db), empty where not needed."""
    p, opts = _op_inputs(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, None, standardize, eps,
                         ignore_index, "none", "", shift, False, impl, chunk_bytes, fp32_weight_grad, compute, scale,
                         softcap, z_loss, smoothing)
    coef = grad.reshape(-1).to(p.w_v.dtype).index_select(0, p.idx_v)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    _, dh, dW, db = fused_linear_ce(p.hidden, p.weight, p.bias, p.labels_v, p.idx_v, p.w_v, coef, need, p.impl, opts)
    return (_empty(hidden) if dh is None else dh.reshape(hidden.shape), _empty(weight) if dW is None else dW,
            _empty(hidden) if db is None else db)


@weighted_ce_backward_op.register_fake
def _weighted_ce_backward_fake(hidden, weight, bias, labels, seq_ids, rewards, groups, stats, grad, standardize, eps,
                               ignore_index, shift, impl, chunk_bytes, fp32_weight_grad, compute, scale, softcap,
                               z_loss, smoothing, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else _empty(hidden),
            torch.empty_like(weight) if need_weight else _empty(weight),
            torch.empty_like(bias) if (need_bias and bias is not None) else _empty(hidden))


_OP_ARGS = ("hidden", "weight", "bias", "labels", "seq_ids", "rewards", "groups", "stats", "denominator",
            "standardize", "eps", "ignore_index", "reduction", "normalize", "shift", "validate", "impl",
            "chunk_bytes", "fp32_weight_grad", "compute", "scale", "softcap", "z_loss", "smoothing",
            "need_hidden", "need_weight", "need_bias")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_OP_ARGS, inputs))
    ctx.args = {k: v for k, v in a.items() if not isinstance(v, torch.Tensor) and v is not None}
    ctx.has_bias = a["bias"] is not None
    if a["reduction"] == "none":
        ctx.save_for_backward(a["hidden"], a["weight"], a["bias"], a["labels"], a["seq_ids"], a["rewards"],
                              a["groups"], a["stats"])
    else:
        ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    a = ctx.args
    if a["reduction"] == "none":
        hidden, weight, bias, labels, seq_ids, rewards, groups, stats = ctx.saved_tensors
        dh, dW, db = weighted_ce_backward_op(
            hidden, weight, bias, labels, seq_ids, rewards, groups, stats, grad_loss, a["standardize"], a["eps"],
            a["ignore_index"], a["shift"], a["impl"], a["chunk_bytes"], a["fp32_weight_grad"], a["compute"],
            a["scale"], a["softcap"], a["z_loss"], a["smoothing"], a["need_hidden"], a["need_weight"], a["need_bias"])
    else:
        dh, dW, db = ctx.saved_tensors
        # out of place (a traced backward cannot scale the saved gradients in place): one gradient-sized
        # temporary each, where the eager Function scales in place
        dh, dW, db = (t * grad_loss for t in (dh, dW, db))
    grads = [dh if a["need_hidden"] else None, dW if a["need_weight"] else None,
             db if (a["need_bias"] and ctx.has_bias) else None]
    return tuple(grads) + (None,) * (len(_OP_ARGS) - 3)


weighted_ce_op.register_autograd(_backward, setup_context=_setup_context)
