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
an fp32 (or fp64) GEMM dtype the logits GEMM writes straight into the staging rows and the row
kernel works in place, so there is no separate logits buffer.

The budget (:func:`refit_fast.chunk_budget`, default 256 MiB) bounds the fp32 logits of one
sub-chunk: ``sub_rows = budget // (V * 4)``, rounded down to a multiple of 128 when it is at least
128. A staging block holds up to 16 sub-chunks and is the smallest whole number of them that reaches
2048 rows: ``stage_rows = sub_rows * min(16, ceil(2048 / sub_rows))``, so from 128 sub-chunk rows
on (62.6 MiB of budget at V = 128256) the dh/dW GEMMs have K >= 2048 and a multiple of 128, and a
tiny budget still gives several staging blocks. Both are capped at the number of rows.

The weight gradient accumulates in fp32 (`dw_fp32`) by default for bf16/fp16 weights (one in-place
``addmm(..., out_dtype=float32)`` per block where torch has it); ``fp32_weight_grad=False`` keeps
it in the weight's dtype. fp32/fp64 weights accumulate in their own dtype (the gradient itself).

:func:`plan_chunks` is pure arithmetic (no tensors, no device), so a performance model can call it
for any shape; the driver (:func:`fused_linear_ce`) runs exactly the plan it returns.
"""
from __future__ import annotations

import contextvars
import math
import os
from dataclasses import dataclass

import torch

STAGE_ROWS = 2048  # rows a staging block reaches when the budget allows: K of the dh / dW GEMMs
STAGE_SUBS = 16  # at most this many sub-chunks per staging block (a tiny budget: several blocks)
ROW_ALIGN = 128  # sub-chunks of at least this many rows are a multiple of it (GEMM tiles)


@dataclass(frozen=True)
class CEOptions:
    """weighted_ce's chunking options (set with :func:`refit_fast.chunk_budget`).

    chunk_bytes: the fp32 logits of one sub-chunk (the budget); fp32_weight_grad: fp32 dW
    accumulator for bf16/fp16 weights (None: the default, on)."""

    chunk_bytes: int
    fp32_weight_grad: bool | None = None


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
                fp32_weight_grad: bool | None = None, gemm_dtype: torch.dtype | None = None) -> ChunkPlan:
    """The chunk plan for `n_rows` trained rows of width `hidden` and a vocabulary of `vocab`.

    dtype: the dtype of hidden and weight (float32, bfloat16, float16, float64). budget_bytes: the
    fp32 logits of one sub-chunk (None: the active :func:`refit_fast.chunk_budget`, default 256 MiB).
    fp32_weight_grad: fp32 dW accumulator for bf16/fp16 (None: the active chunk_budget's choice,
    default True). gemm_dtype: the dtype the GEMMs run in, `dtype` (default: bf16/fp16 operands with
    fp32 output, the CUDA path) or float32 (the CPU path, which upcasts the weight once).

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

    # rows: sub-chunks whose logits fit the budget, staging blocks of up to STAGE_SUBS of them
    sub = max(1, budget // (vocab * _size(acc)))
    if sub >= ROW_ALIGN:
        sub -= sub % ROW_ALIGN
    stage = sub * min(STAGE_SUBS, math.ceil(STAGE_ROWS / sub))
    rows = max(n_rows, 1)
    sub, stage = min(sub, rows), min(stage, rows)
    n_stages = math.ceil(n_rows / stage)
    n_subs = (n_rows // stage) * math.ceil(stage / sub) + math.ceil((n_rows % stage) / sub)

    # memory
    g_size, h_size = _size(gemm), _size(dtype)
    dw_fp32 = (not lowp) or gemm == acc or fp32_weight_grad is None or bool(fp32_weight_grad)
    logits_bytes = sub * vocab * _size(acc) if gemm != acc else 0
    stage_bytes = stage * vocab * g_size
    rows_bytes = stage * hidden * (h_size + g_size) + (stage * hidden * g_size if gemm != dtype else 0)
    dw_bytes = vocab * hidden * _size(acc) if (lowp and dw_fp32) else 0
    weight_bytes = vocab * hidden * g_size if gemm != dtype else 0
    vector_bytes = 2 * vocab * _size(acc)
    extra = logits_bytes + stage_bytes + rows_bytes + dw_bytes + weight_bytes + vector_bytes
    return ChunkPlan(n_rows=n_rows, hidden=hidden, vocab=vocab, dtype=dtype, gemm_dtype=gemm, budget_bytes=budget,
                     sub_rows=sub, stage_rows=stage, n_stages=n_stages, n_subs=n_subs, dw_fp32=dw_fp32,
                     logits_bytes=logits_bytes, stage_bytes=stage_bytes, rows_bytes=rows_bytes, dw_bytes=dw_bytes,
                     weight_bytes=weight_bytes, vector_bytes=vector_bytes, extra_bytes=extra)
