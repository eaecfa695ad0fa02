"""The chunk plan of weighted_ce and the chunked driver that follows it.

The plan is by rows (plan v2, issue #14). The trained rows (N of them) go through in *staging
blocks* of `stage_rows` rows; each block goes through in *sub-chunks* of `sub_rows` rows:

    for each staging block S (stage_rows rows, the last one ragged):
        for each sub-chunk c of S (sub_rows rows, the last one ragged):
            z = h_c @ W.T (+ b)            [sub_rows, V] fp32 logits  (fits the budget)
            row kernel: loss_c; G[c] = w * coef * (softmax(z) - onehot(y))   into the staging block
        dh_S  = G @ W                      one GEMM per block, M = stage_rows
        dW   += G.T @ h_S                  one in-place addmm per block, K = stage_rows

`G` [stage_rows, V] is the *staging block* in the GEMM dtype (bf16/fp16 for low-precision weights:
the BLAS writes fp32 logits from bf16 operands and the row kernel rounds the gradient once). With
an fp32 (or fp64) GEMM dtype (fp32 weights; bf16/fp16 on the CPU, whose GEMMs cannot write fp32
from bf16, so the weight is upcast once) the logits GEMM writes straight into the staging rows and
the row kernel works in place: no separate logits buffer, and a staging block is one sub-chunk
(the fp32 logits alive at once fit the budget).

The budget (:func:`refit_fast.chunk_budget`, default 256 MiB) bounds the fp32 logits of one
sub-chunk: ``sub_rows = budget // (V * 4)``, rounded down to a multiple of 128 when it is at least
128. A low-precision staging block holds up to 16 sub-chunks and is the smallest whole number of them
that reaches 2048 rows: ``stage_rows = sub_rows * min(16, ceil(2048 / sub_rows))``, so from 128
sub-chunk rows on (62.6 MiB of budget at V = 128256) the dh/dW GEMMs have K >= 2048 and a multiple
of 128, and a tiny budget still gives several staging blocks. Both are capped at the number of rows.

The weight gradient accumulates in fp32 (`dw_fp32`) by default for bf16/fp16 weights (one in-place
``addmm(..., out_dtype=float32)`` per block where torch has it); ``fp32_weight_grad=False`` keeps
it in the weight's dtype. fp32/fp64 weights accumulate in their own dtype (the gradient itself).

Under autocast an fp32 master weight is rounded to the autocast dtype inside (one [V, D] copy), and
the fp32 accumulator is its gradient: no second accumulator, no bf16 rounding of the gradient.

Default plans (bf16, 256 MiB budget; the same for N = 8192 and 32768: independent of N):

    head                        sub_rows  stage_rows  extra_bytes (bf16 weight / fp32 master under autocast)
    Llama-3 D=4096 V=128256        512       2048     2,923,931,648 = 2.72 GiB / 1,873,258,496 = 1.74 GiB
    Gemma-2 D=2304 V=256000        256       2048     3,690,938,368 = 3.44 GiB / 2,511,290,368 = 2.34 GiB

:func:`plan_chunks` is pure arithmetic (no tensors, no device; its defaults read the active
:func:`refit_fast.chunk_budget`), so a performance model can call it for any shape; the driver
(:func:`fused_linear_ce`) runs exactly the plan it returns.
"""
from __future__ import annotations

import contextvars
import math
import os
import warnings
from dataclasses import dataclass

import torch

from refit_fast.ops.kernels import ce_rows_triton
from refit_fast.ops.weighted_ce_torch import PLAIN, Head, ce_rows_torch

STAGE_ROWS = 2048  # rows a staging block reaches when the budget allows: K of the dh / dW GEMMs
STAGE_SUBS = 16  # at most this many sub-chunks per staging block (a tiny budget: several blocks)
ROW_ALIGN = 128  # sub-chunks of at least this many rows are a multiple of it (GEMM tiles)


@dataclass(frozen=True)
class CEOptions:
    """weighted_ce's chunking options (set with :func:`refit_fast.chunk_budget`).

    chunk_bytes: the fp32 logits of one sub-chunk (the budget); fp32_weight_grad: fp32 dW
    accumulator for bf16/fp16 weights (None: the default, on); compute_dtype: the dtype the GEMMs
    take when it is not the inputs' own (set by weighted_ce under autocast; the inputs are rounded
    to it inside and their gradients come back in their own dtypes); head: the logit transform and
    loss terms beyond plain cross-entropy (:class:`~refit_fast.ops.weighted_ce_torch.Head`: logit
    scale, softcap, z-loss, label smoothing; set per call by weighted_ce)."""

    chunk_bytes: int
    fp32_weight_grad: bool | None = None
    compute_dtype: torch.dtype | None = None
    head: Head = PLAIN


def _env_fp32_weight_grad() -> bool | None:
    value = os.environ.get("REFIT_FAST_FP32_WEIGHT_GRAD")
    return None if value is None else value != "0"


DEFAULT_OPTIONS = CEOptions(
    chunk_bytes=int(float(os.environ.get("REFIT_FAST_CHUNK_MB", "256")) * 2**20),
    fp32_weight_grad=_env_fp32_weight_grad(),
)
OPTIONS: contextvars.ContextVar[CEOptions] = contextvars.ContextVar("refit_fast_ce_options", default=DEFAULT_OPTIONS)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ChunkPlan:
    """How weighted_ce goes through `n_rows` trained rows (see the module docstring).

    sub_rows: rows per logits GEMM + row-kernel sub-chunk; stage_rows: rows per staging block (K of
    the dW addmm, M of the dh GEMM); n_stages, n_subs: staging blocks and sub-chunks in all (the last
    of each may be ragged); dw_fp32: the weight gradient accumulates in fp32 (for an fp64 weight:
    in fp64); gemm_dtype: the dtype the GEMM operands run in (the staging block's dtype);
    extra_bytes: the planned extra memory beyond inputs and gradients, with every gradient wanted
    (the sum of the parts below); O(N) vectors (indices, weights, losses: about 40 bytes per token)
    come on top.

    Parts: logits_bytes (fp32 logits of one sub-chunk; 0 when they live in the staging block),
    stage_bytes (the staging block), rows_bytes (the block's gathered hidden rows and its dh rows,
    fp32 copies of them when the GEMMs are upcast), dw_bytes (an fp32 dW accumulator beside a
    low-precision weight gradient), weight_bytes (an upcast copy of the weight, only where the GEMMs
    cannot take bf16/fp16 operands with fp32 output, i.e. the CPU), vector_bytes ([V] bias copy and
    bias-gradient accumulator).
    """

    n_rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    gemm_dtype: torch.dtype
    budget_bytes: int
    sub_rows: int
    stage_rows: int
    n_stages: int
    n_subs: int
    dw_fp32: bool
    logits_bytes: int
    stage_bytes: int
    rows_bytes: int
    dw_bytes: int
    weight_bytes: int
    vector_bytes: int
    extra_bytes: int

    @property
    def subs_per_stage(self) -> int:
        """Sub-chunks in a full staging block."""
        return math.ceil(self.stage_rows / self.sub_rows)


def plan_chunks(n_rows: int, hidden: int, vocab: int, *, dtype: torch.dtype, budget_bytes: int | None = None,
                fp32_weight_grad: bool | None = None, gemm_dtype: torch.dtype | None = None,
                weight_dtype: torch.dtype | None = None) -> ChunkPlan:
    """The chunk plan for `n_rows` trained rows of width `hidden` and a vocabulary of `vocab`.

    dtype: the dtype of hidden and weight (float32, bfloat16, float16, float64). budget_bytes: the
    fp32 logits of one sub-chunk (None: the active :func:`refit_fast.chunk_budget`, default 256 MiB).
    fp32_weight_grad: fp32 dW accumulator for bf16/fp16 (None: the active chunk_budget's choice,
    default True). gemm_dtype: the dtype the GEMMs run in, `dtype` (default: bf16/fp16 operands with
    fp32 output, the CUDA path) or float32 (the CPU path, which upcasts the weight once).
    weight_dtype: the weight's own dtype when it is not `dtype` (an fp32 master weight under
    autocast: it is rounded to `dtype` inside, and the fp32 accumulator is its gradient).

        >>> p = plan_chunks(8192, 4096, 128256, dtype=torch.bfloat16, budget_bytes=256 << 20)
        >>> (p.sub_rows, p.stage_rows, p.n_stages, p.dw_fp32)
        (512, 2048, 4, True)
        >>> round(p.extra_bytes / 2**30, 2)
        2.72
    """
    n_rows, hidden, vocab = int(n_rows), int(hidden), int(vocab)
    if n_rows < 0 or hidden < 1 or vocab < 1:
        raise ValueError(f"plan_chunks: need n_rows >= 0, hidden >= 1, vocab >= 1, got {n_rows}, {hidden}, {vocab}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"plan_chunks: dtype must be float32/bfloat16/float16/float64, got {dtype}")
    opts = OPTIONS.get()
    budget = opts.chunk_bytes if budget_bytes is None else int(budget_bytes)
    if budget < 1:
        raise ValueError(f"plan_chunks: budget_bytes must be >= 1, got {budget_bytes}")
    if fp32_weight_grad is None:
        fp32_weight_grad = opts.fp32_weight_grad
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gemm = dtype if gemm_dtype is None else gemm_dtype
    if gemm not in (dtype, acc):
        raise ValueError(f"plan_chunks: gemm_dtype must be {dtype} or {acc}, got {gemm_dtype}")
    lowp = dtype != acc
    wdt = dtype if weight_dtype is None else weight_dtype

    # rows: sub-chunks whose logits fit the budget, staging blocks of up to STAGE_SUBS of them
    sub = max(1, budget // (vocab * _size(acc)))
    if sub >= ROW_ALIGN:
        sub -= sub % ROW_ALIGN
    # low precision: a bf16/fp16 staging block of up to STAGE_SUBS sub-chunks; fp32/fp64 GEMMs
    # (fp32 weights, the CPU): the logits are the staging block, so it is one sub-chunk
    stage = sub * min(STAGE_SUBS, math.ceil(STAGE_ROWS / sub)) if gemm != acc else sub
    rows = max(n_rows, 1)
    sub, stage = min(sub, rows), min(stage, rows)
    n_stages = math.ceil(n_rows / stage)
    n_subs = (n_rows // stage) * math.ceil(stage / sub) + math.ceil((n_rows % stage) / sub)

    # memory
    g_size, h_size = _size(gemm), _size(dtype)
    dw_fp32 = (not lowp) or gemm == acc or wdt == acc or fp32_weight_grad is None or bool(fp32_weight_grad)
    logits_bytes = sub * vocab * _size(acc) if gemm != acc else 0
    stage_bytes = stage * vocab * g_size
    rows_bytes = stage * hidden * (h_size + g_size) + (stage * hidden * (g_size + h_size) if gemm != dtype else 0)
    dw_bytes = vocab * hidden * _size(acc) if (lowp and dw_fp32 and wdt != acc) else 0
    weight_bytes = vocab * hidden * g_size if (gemm != dtype or wdt != dtype) else 0  # a rounded / upcast copy
    vector_bytes = 2 * vocab * _size(acc)
    extra = logits_bytes + stage_bytes + rows_bytes + dw_bytes + weight_bytes + vector_bytes
    return ChunkPlan(n_rows=n_rows, hidden=hidden, vocab=vocab, dtype=dtype, gemm_dtype=gemm, budget_bytes=budget,
                     sub_rows=sub, stage_rows=stage, n_stages=n_stages, n_subs=n_subs, dw_fp32=dw_fp32,
                     logits_bytes=logits_bytes, stage_bytes=stage_bytes, rows_bytes=rows_bytes, dw_bytes=dw_bytes,
                     weight_bytes=weight_bytes, vector_bytes=vector_bytes, extra_bytes=extra)


# ----------------------------------------------------------------------------------------------
# GEMMs with fp32 output from bf16/fp16 operands
# ----------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK: dict = {}  # what the installed torch supports, per (op, device type)
_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def mm_out_fp32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has `mm(..., out_dtype=float32)` for `dtype` operands on `device` (CUDA,
    torch >= 2.8); probed once per device type with a 1x1 product, never inside the chunk loop."""
    key = ("mm", device.type, dtype)
    if key not in _MM_OUT_DTYPE_OK:
        one = torch.ones((1, 1), dtype=dtype, device=device)
        try:
            ok = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE_OK[key] = ok
    return _MM_OUT_DTYPE_OK[key]


def _mm_fp32_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, fp32 `out` from bf16/fp16 operands (fp32 accumulation, one rounding)."""
    key = ("mm_out", a.device.type)
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            _MM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    _warn_once(key[0], "weighted_ce: this torch has mm(out_dtype=float32) but not into a given buffer; "
                       "each sub-chunk's logits are copied once (a second fp32 logits buffer)")
    out.copy_(torch.mm(a, b, out_dtype=torch.float32))


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 accumulator and bf16/fp16 operands: one in-place GEMM with beta=1
    where torch has ``addmm(..., out_dtype=float32)``; elsewhere (warned once) a product in the
    operands' dtype added on, which makes a [V, D] temporary and rounds each block's product."""
    key = ("addmm", a.device.type)
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _MM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    _warn_once(key[0], "weighted_ce: this torch has no addmm(out_dtype=float32, out=...): the fp32 weight "
                       "gradient adds a low-precision product per staging block (a [V, D] temporary)")
    acc.add_(a @ b)


# ----------------------------------------------------------------------------------------------
# The chunked driver (shared by both implementations)
# ----------------------------------------------------------------------------------------------
def _round(t: torch.Tensor, compute: torch.dtype, gemm: torch.dtype) -> torch.Tensor:
    """t rounded to the compute dtype (autocast's rounding), then in the GEMM dtype."""
    if t.dtype != compute:
        t = t.to(compute)
    return t if t.dtype == gemm else t.to(gemm)


def fused_linear_ce(h, W, b, labels_v, idx_v, w_v, coef, need, impl, opts: CEOptions):
    """Loss (and gradients) over the trained rows `idx_v` of h [N, D], by :func:`plan_chunks`.

    Returns (loss_v [Nv]: w * nll per trained token, fp32 or fp64; dh [N, D], dW [V, D], db [V] in
    the inputs' dtypes, or None). `need` = (hidden, weight, bias) gradient flags; `coef` is a 0-dim
    tensor (the same factor for every row) or [Nv] (per-row upstream gradient). The GEMMs run
    outside autocast with explicit dtypes: fp32 logits whatever the autocast state.
    """
    ce_rows = ce_rows_triton if impl == "triton" else ce_rows_torch
    N, D = h.shape
    V = W.shape[0]
    Nv = idx_v.numel()
    dev = h.device
    cd = opts.compute_dtype or h.dtype  # the dtype the GEMMs take (autocast: the inputs rounded to it)
    acc = torch.float64 if cd == torch.float64 else torch.float32
    lowp = cd != acc
    compute_grad = any(need)
    with torch.autocast(dev.type, enabled=False):
        # bf16/fp16: on CUDA the BLAS writes fp32 logits from the bf16 operands; elsewhere (CPU, an
        # old torch) the weight is upcast once and every GEMM runs in fp32
        gemm = cd if (lowp and mm_out_fp32_supported(dev, cd)) else acc
        plan = plan_chunks(Nv, D, V, dtype=cd, budget_bytes=opts.chunk_bytes, fp32_weight_grad=opts.fp32_weight_grad,
                           gemm_dtype=gemm, weight_dtype=W.dtype)
        W_g = _round(W, cd, gemm)
        b_acc = _round(b, cd, acc) if b is not None else None
        w_acc = w_v.to(acc)
        coef = coef.to(acc)
        loss_v = torch.empty(Nv, dtype=acc, device=dev)
        dh = torch.zeros_like(h) if need[0] else None
        dW = torch.zeros((V, D), dtype=acc if plan.dw_fp32 else W.dtype, device=dev) if need[1] else None
        dh_fp32 = dh is not None and dh.dtype == acc and gemm != acc  # an fp32 hidden under autocast
        db = torch.zeros(V, dtype=acc, device=dev) if need[2] else None
        # the buffers of the plan: the staging block, and the fp32 logits unless they live in it
        stage = torch.empty((plan.stage_rows, V), dtype=gemm, device=dev) if (compute_grad and Nv) else None
        in_place = stage is not None and gemm == acc
        zbuf = None if (in_place or not Nv) else torch.empty((plan.sub_rows, V), dtype=acc, device=dev)
        for s0 in range(0, Nv, plan.stage_rows):
            sn = min(plan.stage_rows, Nv - s0)
            rows = idx_v[s0:s0 + sn]
            hs = h.index_select(0, rows)
            hs_g = _round(hs, cd, gemm)
            for c0 in range(0, sn, plan.sub_rows):
                cn = min(plan.sub_rows, sn - c0)
                zb, z0 = (stage, c0) if in_place else (zbuf, 0)
                z = zb[z0:z0 + cn]
                if gemm == acc:
                    torch.mm(hs_g[c0:c0 + cn], W_g.T, out=z)
                else:
                    _mm_fp32_into(hs_g[c0:c0 + cn], W_g.T, z)
                if b_acc is not None:
                    z += b_acc
                ce_rows(zb, z0, stage, c0, cn, labels_v, w_acc, coef, loss_v, s0 + c0, opts.head)
            if compute_grad:
                G = stage[:sn]
                if dh is not None:
                    dh_s = torch.mm(G, W_g, out_dtype=acc) if dh_fp32 else G @ W_g
                    dh.index_copy_(0, rows, dh_s if dh_s.dtype == h.dtype else dh_s.to(h.dtype))
                    del dh_s
                if dW is not None:
                    if dW.dtype == gemm:
                        dW.addmm_(G.T, hs_g)
                    else:  # the fp32 accumulator of a bf16/fp16 weight
                        _addmm_fp32_(dW, G.T, hs_g)
                if db is not None:
                    db += G.sum(0, dtype=acc)
                del G
            del hs, hs_g
        del stage, zbuf
        if dW is not None and dW.dtype != W.dtype:
            dW = dW.to(W.dtype)
        if db is not None and db.dtype != b.dtype:
            db = db.to(b.dtype)
    return loss_v, dh, dW, db
