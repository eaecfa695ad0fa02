"""weighted_ce: fused linear + cross-entropy with per-conversation reward weights (Refit / Swift).

Layout: the Triton kernels with their launchers, then the chunked driver shared by both
implementations, then the `torch.autograd.Function`, then the public, validated `weighted_ce`.
The plain-PyTorch counterparts of the two kernels are in weighted_ce_torch.py; the naive
materializing reference is in reference.py.

Algorithm (both implementations). Only trained tokens (label != ignore_index) are computed at all:
conversation data leaves user/system/tool tokens untrained, so this skips a large share of the
work. The trained tokens are processed in chunks of `c` rows; for each chunk

    z  = h_c @ W.T (+ b)                    [c, V] fp32, the only vocab-sized buffer (BLAS matmul)
    l  = logsumexp(z) - z[y];  loss = w * l (row kernel, one program per row, two passes over V)
    g  = w * coef * (softmax(z) - onehot(y)) written in place / in the compute dtype (same kernel)
    dh_c = g @ W,  dW += g.T @ h_c,  db += g.sum(0)                          (BLAS matmuls)

With reduction "sum"/"mean" the upstream gradient is a scalar, so the gradients are computed in the
forward pass (6*N*D*V FLOPs in all, no recomputation) and only scaled in backward. With reduction
"none" the upstream gradient differs per token, so the forward computes losses only and the
backward recomputes the chunks with coef = upstream gradient (8*N*D*V FLOPs).

Reward weights (before the chunks, one small kernel): w = r~[seq_ids] per trained token, with r~
the rewards as given (Refit) or standardized (Swift) by the batch statistics (`standardize=True`),
given statistics (`reward_stats`) or per-group statistics (`standardize="group"`, `groups` [B]:
the prompt of each conversation). Statistics are float64, each set shifted by one of its members
before the sums (identical rewards -> weight exactly 0; no overflow for huge rewards); a set with
std 0 gives weight 0. The rule is stated once in plain PyTorch as `standardize_rewards`.

Memory beyond inputs and gradients: one chunk (bounded by `chunk_budget`, independent of N), O(N)
vectors, and, for bf16/fp16 weights with `fp32_weight_grad=True`, an fp32 [V, D] accumulator.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, replace

import torch

from refit_fast.ops.weighted_ce_torch import REWARD_LIMIT, _as_eps, ce_rows_torch, token_weights_torch

try:  # triton is a Linux dependency; the torch path works without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _token_weight_kernel(
        rewards_ptr, n_rewards, stats_ptr, groups_ptr, seq_ptr, out_ptr, n_tokens, eps,
        STANDARDIZE: tl.constexpr, HAS_STATS: tl.constexpr, GROUPED: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """out[t] = r~[seq[t]] (fp32) for a block of BLOCK_N tokens, statistics in float64.

        STANDARDIZE without stats or groups: every program recomputes the batch statistics of all
        B rewards (two passes over them, shifted by rewards[0]), O(B) per program. GROUPED: each
        token's own group statistics, from two passes over all B rewards comparing group ids in
        [BLOCK_N, BLOCK_B] tiles, shifted by the token's own conversation reward (a member of its
        group): O(BLOCK_N * B) per program, O(N * B) in all, fine for B up to a few thousand. Either
        way one launch and no host sync; a set whose std is 0 gives exactly 0 (never NaN)."""
        pid = tl.program_id(0)
        offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = offs < n_tokens
        sid = tl.load(seq_ptr + offs, mask=tmask, other=0)
        r = tl.load(rewards_ptr + sid, mask=tmask, other=0.0).to(tl.float64)
        if STANDARDIZE:
            if HAS_STATS:
                dev = r - tl.load(stats_ptr).to(tl.float64)
                std = tl.load(stats_ptr + 1).to(tl.float64)
            elif GROUPED:
                g = tl.load(groups_ptr + sid, mask=tmask, other=-1)
                # pass 1: count and sum of d_j = r_j - r_i over the members j of token t's group
                cnt = tl.zeros([BLOCK_N], dtype=tl.float64)
                s1 = tl.zeros([BLOCK_N], dtype=tl.float64)
                for start in range(0, n_rewards, BLOCK_B):
                    b = start + tl.arange(0, BLOCK_B)
                    bmask = b < n_rewards
                    rb = tl.load(rewards_ptr + b, mask=bmask, other=0.0).to(tl.float64)
                    gb = tl.load(groups_ptr + b, mask=bmask, other=-1)
                    same = (g[:, None] == gb[None, :]) & bmask[None, :]
                    cnt += tl.sum(tl.where(same, 1.0, 0.0).to(tl.float64), axis=1)
                    s1 += tl.sum(tl.where(same, rb[None, :] - r[:, None], 0.0), axis=1)
                cnt = tl.maximum(cnt, 1.0)
                mean_d = s1 / cnt
                # pass 2: population variance from the deviations
                s2 = tl.zeros([BLOCK_N], dtype=tl.float64)
                for start in range(0, n_rewards, BLOCK_B):
                    b = start + tl.arange(0, BLOCK_B)
                    bmask = b < n_rewards
                    rb = tl.load(rewards_ptr + b, mask=bmask, other=0.0).to(tl.float64)
                    gb = tl.load(groups_ptr + b, mask=bmask, other=-1)
                    same = (g[:, None] == gb[None, :]) & bmask[None, :]
                    e = rb[None, :] - r[:, None] - mean_d[:, None]
                    s2 += tl.sum(tl.where(same, e * e, 0.0), axis=1)
                std = tl.sqrt(s2 / cnt)
                dev = -mean_d
            else:
                shift = tl.load(rewards_ptr).to(tl.float64)
                acc = tl.zeros([BLOCK_B], dtype=tl.float64)
                for start in range(0, n_rewards, BLOCK_B):
                    b = start + tl.arange(0, BLOCK_B)
                    rb = tl.load(rewards_ptr + b, mask=b < n_rewards, other=0.0).to(tl.float64)
                    acc += tl.where(b < n_rewards, rb - shift, 0.0)
                mean_d = tl.sum(acc, axis=0) / n_rewards
                acc2 = tl.zeros([BLOCK_B], dtype=tl.float64)
                for start in range(0, n_rewards, BLOCK_B):
                    b = start + tl.arange(0, BLOCK_B)
                    rb = tl.load(rewards_ptr + b, mask=b < n_rewards, other=0.0).to(tl.float64)
                    e = tl.where(b < n_rewards, rb - shift - mean_d, 0.0)
                    acc2 += e * e
                std = tl.sqrt(tl.sum(acc2, axis=0) / n_rewards)
                dev = (r - shift) - mean_d
            zero = std == 0.0
            r = tl.where(zero, 0.0, dev / tl.where(zero, 1.0, std + eps))  # no 0/0 even in masked lanes
        tl.store(out_ptr + offs, r.to(tl.float32), mask=tmask)

    @triton.jit
    def _ce_rows_kernel(
        logits_ptr, stride_z, grad_ptr, stride_g, labels_ptr, w_ptr, coef_ptr, loss_ptr, V,
        COEF_PER_ROW: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row of the chunk: log-sum-exp and weighted loss, then (optionally) the
        scaled softmax gradient. `grad_ptr` may alias `logits_ptr` (fp32 compute): each element is
        read before it is overwritten by the same lane."""
        row = tl.program_id(0).to(tl.int64)
        zrow = logits_ptr + row * stride_z
        # pass 1: running max and sum of exponentials, one scalar pair per row (no NaN from -inf lanes)
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(zrow + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        label = tl.load(labels_ptr + row)
        target = tl.load(zrow + label).to(tl.float32)
        w = tl.load(w_ptr + row)
        tl.store(loss_ptr + row, w * (lse - target))
        if COMPUTE_GRAD:
            if COEF_PER_ROW:
                coef = tl.load(coef_ptr + row)
            else:
                coef = tl.load(coef_ptr)
            scale = w * coef
            grow = grad_ptr + row * stride_g
            # pass 2: g = scale * (softmax - onehot), stored in the compute dtype
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                vmask = offs < V
                z = tl.load(zrow + offs, mask=vmask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
                tl.store(grow + offs, (g * scale).to(grow.dtype.element_ty), mask=vmask)


def _block_v(V: int) -> int:
    # The interpreter's cost is grid x loop trips, so it wants the largest block; compiled, 4096
    # fp32 per program streams well with 8 warps (to be tuned on the GPU, see benchmarks/NOTES.md).
    cap = 16384 if _interpreting() else 4096
    return min(triton.next_power_of_2(V), cap)


def _weight_blocks(n_tokens: int, n_rewards: int, grouped: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_B) of _token_weight_kernel. Grouped, the kernel holds [BLOCK_N, BLOCK_B]
    float64 tiles: small when compiled (registers), large when interpreted (cost = grid x trips)."""
    if grouped:
        if _interpreting():
            return min(triton.next_power_of_2(n_tokens), 1024), min(triton.next_power_of_2(n_rewards), 256)
        return 64, min(triton.next_power_of_2(n_rewards), 64)
    return 1024, min(triton.next_power_of_2(n_rewards), 4096)


def token_weights_triton(rewards, seq_ids_valid, *, standardize, eps, reward_stats, groups=None):
    """Triton twin of :func:`token_weights_torch` (fp32 out, float64 statistics), one launch."""
    n = seq_ids_valid.numel()
    out = torch.empty(n, dtype=torch.float32, device=seq_ids_valid.device)
    if n == 0:
        return out
    if rewards.dtype not in (torch.float32, torch.float64):  # bf16/fp16: not loadable when interpreted
        rewards = rewards.float()
    B = max(rewards.numel(), 1)
    grouped = standardize == "group"
    stats = None
    if standardize == "batch" and reward_stats is not None:
        stats = torch.stack([reward_stats[0], reward_stats[1]]).to(torch.float64)
    BLOCK_N, BLOCK_B = _weight_blocks(n, B, grouped)
    _token_weight_kernel[(triton.cdiv(n, BLOCK_N),)](
        rewards, rewards.numel(), stats if stats is not None else rewards,
        groups if grouped else seq_ids_valid, seq_ids_valid, out, n, float(eps),
        STANDARDIZE=standardize != "none", HAS_STATS=stats is not None, GROUPED=grouped,
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N,
    )
    return out


def ce_rows_triton(logits, labels, w, coef, compute_grad, grad_dtype):
    """Triton twin of :func:`ce_rows_torch`: same arguments, same results."""
    c, V = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss, None
    if compute_grad:
        grad = logits if grad_dtype == logits.dtype else torch.empty((c, V), dtype=grad_dtype, device=logits.device)
        coef = coef.to(torch.float32)
    else:
        grad, coef = logits, w  # unused placeholders
    _ce_rows_kernel[(c,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, w.to(torch.float32), coef, loss, V,
        COEF_PER_ROW=bool(compute_grad and coef.dim() == 1), COMPUTE_GRAD=bool(compute_grad),
        BLOCK_V=_block_v(V), num_warps=8,
    )
    return loss, (grad if compute_grad else None)


# ----------------------------------------------------------------------------------------------
# Options: the caller's memory budget
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    chunk_bytes: int
    fp32_weight_grad: bool


_DEFAULT = _Options(
    chunk_bytes=int(float(os.environ.get("REFIT_FAST_CHUNK_MB", "256")) * 2**20),
    fp32_weight_grad=os.environ.get("REFIT_FAST_FP32_WEIGHT_GRAD", "0") == "1",
)
_OPTIONS: contextvars.ContextVar[_Options] = contextvars.ContextVar("refit_fast_ce_options", default=_DEFAULT)


@contextlib.contextmanager
def chunk_budget(nbytes: int | None = None, *, fp32_weight_grad: bool | None = None):
    """Set weighted_ce's memory budget for the code inside the `with` block.

    nbytes: the most bytes of vocab-sized chunk buffers alive at once (default 256 MiB, or the
        environment variable REFIT_FAST_CHUNK_MB). The extra memory of weighted_ce is this budget
        plus O(N) vectors, whatever the number of tokens N.
    fp32_weight_grad: accumulate the lm_head weight gradient over chunks in an fp32 [V, D] buffer
        when the weight is bf16/fp16 (more accurate over many chunks, costs V*D*4 bytes). Default
        off (REFIT_FAST_FP32_WEIGHT_GRAD=1 turns it on). fp32 weights always accumulate in fp32.

        >>> hidden, weight, labels = torch.randn(5, 8), torch.randn(13, 8), torch.tensor([1, 2, -100, 3, 4])
        >>> with chunk_budget(64 << 20):
        ...     loss = weighted_ce(hidden, weight, labels)
        >>> bool(torch.isfinite(loss))
        True
    """
    opts = _OPTIONS.get()
    if nbytes is not None:
        if int(nbytes) < 1:
            raise ValueError(f"chunk_budget: nbytes must be >= 1, got {nbytes}")
        opts = replace(opts, chunk_bytes=int(nbytes))
    if fp32_weight_grad is not None:
        opts = replace(opts, fp32_weight_grad=bool(fp32_weight_grad))
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


# ----------------------------------------------------------------------------------------------
# The chunked driver (shared by both implementations)
# ----------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK: dict = {}  # what the installed torch supports, per device type


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b with fp32 output from bf16/fp16 inputs (fp32 accumulation, no rounding of the result),
    where the installed torch has it (CUDA, torch >= 2.8); None elsewhere."""
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE_OK[key] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    return None


def _mm_out_fp32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has `mm(..., out_dtype=fp32)` on `device`; probed once per device type
    with a 1x1 product, so the chunk loop never pays for the probe."""
    if device.type not in _MM_OUT_DTYPE_OK:
        one = torch.ones((1, 1), dtype=dtype, device=device)
        _mm_out_fp32(one, one)  # records the answer
    return _MM_OUT_DTYPE_OK[device.type]


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 accumulator and bf16/fp16 operands: one in-place cuBLAS GEMM with
    beta=1 where torch has `out_dtype` (CUDA); else a product in fp32 added on (a [V, D] temporary)."""
    key = ("addmm", a.device.type)
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _MM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    part = _mm_out_fp32(a, b)
    acc.add_(part if part is not None else a.to(acc.dtype) @ b.to(acc.dtype))


def _chunk_rows(budget: int, V: int, D: int, acc_bytes: int, grad_bytes: int, h_bytes: int, impl: str) -> int:
    # bytes per chunk row: the fp32 logits, the torch path's logsumexp temporary, a separate
    # low-precision gradient buffer, and the gathered hidden row
    per_row = V * acc_bytes + (V * acc_bytes if impl == "torch" else 0) + V * grad_bytes + D * h_bytes
    return max(1, budget // per_row)


def _fused_linear_ce(h, W, b, labels_v, idx_v, w_v, coef, need, impl, opts):
    """Chunked loss (and gradients) over the trained rows `idx_v` of h [N, D].

    Returns (loss_v [Nv] fp32: w * nll per trained token, dh [N, D] or None, dW [V, D] or None,
    db [V] or None). `need` = (hidden, weight, bias) gradient flags; `coef` is a 0-dim tensor
    (same factor for every row) or [Nv] (per-row upstream gradient).
    """
    ce_rows = ce_rows_triton if impl == "triton" else ce_rows_torch
    N, D = h.shape
    V = W.shape[0]
    Nv = idx_v.numel()
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    compute_grad = any(need)

    # Low-precision inputs: on CUDA the BLAS writes fp32 logits from bf16 operands; elsewhere (CPU,
    # or an old torch) the weight is upcast once and the whole chunk pass runs in fp32.
    lowp = h.dtype != acc
    out_dtype_mm = lowp and _mm_out_fp32_supported(h.device, h.dtype)
    W_c = W.to(acc) if (lowp and not out_dtype_mm) else W
    b_c = b.to(acc) if b is not None else None
    grad_dtype = h.dtype if out_dtype_mm else acc

    loss_v = torch.empty(Nv, dtype=acc, device=h.device)
    dh = torch.zeros_like(h) if need[0] else None
    if need[1]:
        wacc = acc if (W_c.dtype == acc or opts.fp32_weight_grad) else W.dtype
        dW = torch.zeros((V, D), dtype=wacc, device=W.device)
    else:
        dW = None
    db = torch.zeros(V, dtype=acc, device=h.device) if need[2] else None

    c = _chunk_rows(opts.chunk_bytes, V, D, torch.finfo(acc).bits // 8,
                    (torch.finfo(grad_dtype).bits // 8) if (compute_grad and grad_dtype != acc) else 0,
                    h.element_size(), impl)
    for start in range(0, Nv, c):
        rows = idx_v[start:start + c]
        hc = h.index_select(0, rows)
        if out_dtype_mm:
            z = _mm_out_fp32(hc, W_c.T)
            hc_mm = hc
        else:
            hc_mm = hc.to(acc)
            z = hc_mm @ W_c.T
        if b_c is not None:
            z += b_c
        coef_c = coef[start:start + c] if coef.dim() == 1 else coef
        loss_c, g = ce_rows(z, labels_v[start:start + c], w_v[start:start + c], coef_c, compute_grad, grad_dtype)
        loss_v[start:start + c] = loss_c
        if compute_grad:
            if dh is not None:
                dh.index_copy_(0, rows, (g @ W_c).to(h.dtype))
            if dW is not None:
                if dW.dtype == g.dtype:
                    dW.addmm_(g.T, hc_mm)
                else:  # fp32 accumulator for a bf16/fp16 weight
                    _addmm_fp32_(dW, g.T, hc_mm)
            if db is not None:
                db += g.sum(0, dtype=acc)
        del z, g, hc, hc_mm  # free this chunk before the next one is allocated
    return (loss_v, dh,
            dW.to(W.dtype) if dW is not None else None,
            db.to(b.dtype) if db is not None else None)


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------
class WeightedCEFunction(torch.autograd.Function):
    """Differentiable core on validated, flattened inputs (use :func:`weighted_ce`, which validates).

    forward(hidden [N, D], weight [V, D], bias [V] or None, labels_v [Nv], idx_v [Nv], w_v [Nv],
    denom (0-dim fp32), reduction, impl, opts, grad_enabled) -> loss (0-dim, or [N] for "none").
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels_v, idx_v, w_v, denom, reduction, impl, opts, grad_enabled):
        need = tuple(bool(grad_enabled and t is not None and t.requires_grad) for t in (hidden, weight, bias))
        ctx.reduction, ctx.need = reduction, need
        N = hidden.shape[0]
        if reduction == "none":
            # the upstream gradient differs per token: losses now, gradients recomputed in backward
            loss_v, *_ = _fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, denom, (False,) * 3, impl, opts)
            ctx.save_for_backward(hidden, weight, bias, labels_v, idx_v, w_v)
            ctx.impl, ctx.opts = impl, opts
            return torch.zeros(N, dtype=loss_v.dtype, device=hidden.device).index_copy_(0, idx_v, loss_v)
        coef = 1.0 / denom  # "sum": denom is 1
        loss_v, dh, dW, db = _fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, coef, need, impl, opts)
        ctx.save_for_backward(dh, dW, db)
        return loss_v.sum() * coef

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, labels_v, idx_v, w_v = ctx.saved_tensors
            coef = grad_out.reshape(-1).to(w_v.dtype).index_select(0, idx_v)
            _, dh, dW, db = _fused_linear_ce(hidden, weight, bias, labels_v, idx_v, w_v, coef, ctx.need, ctx.impl, ctx.opts)
        else:
            dh, dW, db = ctx.saved_tensors
            g = grad_out.to(torch.float64 if grad_out.dtype == torch.float64 else torch.float32)
            dh = (dh * g).to(dh.dtype) if dh is not None else None
            dW = (dW * g).to(dW.dtype) if dW is not None else None
            db = (db * g).to(db.dtype) if db is not None else None
        return dh, dW, db, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------
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


def weighted_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    standardize: bool | str | None = False,
    groups: torch.Tensor | None = None,
    eps: float = 1e-6,
    reward_stats=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "sequence",
    impl: str = "auto",
) -> torch.Tensor:
    """Reward-weighted cross-entropy of the linear head `hidden @ weight.T (+ bias)`, without ever
    building the [N, V] logits.

    Per token t:  l_t = -log softmax(hidden_t @ weight.T + bias)[labels_t]  (0 where ignored) and
    w_t = r~[seq_ids_t], where r~ is, per conversation i,

    - ``standardize=False`` (or None / "none"): r_i as given (Refit); w_t = 1 without rewards
      (SFT / plain NLL);
    - ``standardize=True`` (or "batch"): (r_i - mean) / (std + eps) with the mean and population
      std of all entries of `rewards` (Swift with batch statistics), or of ``reward_stats=(mean,
      std)`` when given (e.g. statistics all-reduced over ranks and micro-batches);
    - ``standardize="group"``: (r_i - mean_g) / (std_g + eps) with the mean and population std of
      the rewards of conversation i's group g = groups[i] (the paper's Swift, when the batch holds
      whole groups: the m conversations logged for each prompt, GRPO-style).

    The statistics are computed inside the loss, in float64, shifted by a member of each set so
    that identical rewards give deviations of exactly 0 (see :func:`standardize_rewards`, the same
    rule as a public function). A set whose std is 0 (one member, identical rewards, or a given std
    of 0) gives weight exactly 0, also with eps=0, never NaN. The Triton path computes them in the
    same launch that gathers the per-token weights, with no host sync; with groups it compares the
    group ids of all B conversations for every trained token, O(N_trained * B) (negligible next to
    the 6*N*D*V matmul work for B up to a few thousand).

    Args:
        hidden: [N, D] or [..., D] (e.g. [B, T, D]) fp32/bf16/fp16 (fp64 with impl="torch").
        weight: [V, D] the output embedding (lm_head.weight), same dtype and device as hidden.
        labels: hidden.shape[:-1] integer targets, already aligned with hidden (shifted by the
            caller/packer); ``ignore_index`` marks untrained positions.
        seq_ids: hidden.shape[:-1] integers, the conversation of each token, in [0, B) on trained
            tokens (ignored tokens may hold anything, e.g. -1 on padding). None: each row of a
            [B, T, D] input is a conversation; any other shape is one conversation. A list or
            array is moved to hidden's device, like rewards.
        rewards: [B] one finite reward per conversation (|r| <= 1e100; no gradient flows to it).
        bias: optional [V] output bias.
        standardize: False / None / "none", True / "batch", or "group" (above).
        groups: [B] integer tensor on hidden's device, only with ``standardize="group"``: the
            group (prompt) of each conversation, ids >= 0, e.g. in [0, n_groups); ids need not be
            sorted or all used, and a group's conversations may lie anywhere in the packed rows.
        eps: >= 0, added to the std in the standardization.
        reward_stats: (mean, std) numbers to standardize with instead of the batch's own (only
            with ``standardize=True``/"batch").
        reduction: "none" -> w_t * l_t per token, shape hidden.shape[:-1] (0 on ignored tokens;
            the backward is exact for any upstream gradient); "sum"; "mean" -> sum divided by the
            number of conversations with at least one trained token (normalize="sequence", the
            paper's objective), by the number of trained tokens ("token"), or by 1 ("none").
        impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch), or
            "auto" (triton on CUDA, torch elsewhere).

    Returns:
        fp32 tensor (fp64 for fp64 inputs): a scalar, or per-token losses for reduction="none". Gradients flow to hidden,
        weight and bias. Memory beyond inputs and gradients is bounded by :func:`chunk_budget`.

    Raises:
        ValueError: labels outside [0, V) other than ignore_index, seq_ids outside [0, B) on trained
            tokens, non-finite rewards, groups missing with "group" or given without it, groups of
            the wrong shape/dtype/device or with negative ids, shape/dtype/device mismatches,
            unknown options (each message names the argument).

    Example::

        >>> import torch
        >>> from refit_fast import weighted_ce
        >>> hidden = torch.randn(7, 16, requires_grad=True)       # 7 packed tokens, D=16
        >>> weight = torch.randn(50, 16, requires_grad=True)      # V=50
        >>> labels = torch.tensor([3, 9, -100, -100, 4, 4, 11])   # -100: not trained
        >>> seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])         # two conversations
        >>> rewards = torch.tensor([1.0, 0.2])
        >>> loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, standardize=True)
        >>> loss.backward()

    Swift with per-prompt statistics: 4 conversations, two prompts with two plays each::

        >>> seq_ids = torch.tensor([0, 0, 1, 2, 2, 3, 3])
        >>> rewards = torch.tensor([0.9, 0.1, 0.5, 0.5])          # prompt 1's plays tie: weight 0
        >>> groups = torch.tensor([0, 0, 1, 1])
        >>> loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, standardize="group", groups=groups)
    """
    # ---- options ----
    if reduction not in _REDUCTIONS:
        raise ValueError(f"weighted_ce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"weighted_ce: normalize must be one of {_NORMALIZE}, got {normalize!r}")
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
    if torch.is_autocast_enabled(device.type):  # follow autocast like F.linear would
        dt = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"weighted_ce: hidden must be float32/bfloat16/float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weighted_ce: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype} (cast one, or use autocast)")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"weighted_ce: bias must be [V]={weight.shape[0]} of dtype {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
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

    # ---- impl ----
    if impl == "auto":
        impl = "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError("weighted_ce: impl='triton' needs the triton package (pip install triton)")
        if hidden.dtype == torch.float64:
            raise ValueError("weighted_ce: impl='triton' computes in fp32; use impl='torch' for float64")
        if device.type != "cuda" and not _interpreting():
            raise ValueError("weighted_ce: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to interpret on CPU); use impl='torch'")

    # ---- flatten; conversation of each token ----
    D = hidden.shape[-1]
    V = weight.shape[0]
    h2 = hidden.reshape(-1, D)
    y = labels.reshape(-1)
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

    # ---- trained tokens, their weights and the normalizer (no further host sync) ----
    idx_v = torch.nonzero_static(valid, size=n_valid).reshape(-1) if n_valid else valid.new_zeros(0, dtype=torch.long)
    labels_v = y.index_select(0, idx_v).long()
    sid_v = sid.index_select(0, idx_v).long()
    if rewards is None:
        w_v = torch.ones(n_valid, dtype=torch.float32, device=device)
    else:
        weights_fn = token_weights_triton if impl == "triton" else token_weights_torch
        w_v = weights_fn(rewards, sid_v, standardize=mode, eps=eps, reward_stats=stats, groups=groups)
    w_v = w_v.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)  # rounded once
    if reduction == "mean" and normalize == "sequence":
        present = torch.zeros(max(n_conv, 1), dtype=torch.bool, device=device).index_fill_(0, sid_v, True)
        denom = present.sum().clamp_min(1).to(torch.float32)
    elif reduction == "mean" and normalize == "token":
        denom = torch.tensor(float(max(n_valid, 1)), device=device)
    else:
        denom = torch.tensor(1.0, device=device)
    if hidden.dtype == torch.float64:
        denom = denom.double()

    out = WeightedCEFunction.apply(
        h2, weight, bias, labels_v, idx_v, w_v, denom, reduction, impl, _OPTIONS.get(), torch.is_grad_enabled()
    )
    if reduction == "none":
        return out.reshape(lead)
    return out


class WeightedCELoss(torch.nn.Module):
    """Module form of :func:`weighted_ce` with the options fixed at construction.

        >>> hidden, weight = torch.randn(6, 8), torch.randn(13, 8)           # e.g. model.lm_head.weight
        >>> labels, seq_ids = torch.tensor([1, 2, -100, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> rewards, groups = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
        >>> loss_fn = WeightedCELoss(standardize=True, chunk_bytes=64 << 20)
        >>> loss = loss_fn(hidden, weight, labels, seq_ids, rewards)
        >>> swift = WeightedCELoss(standardize="group")             # per-prompt statistics
        >>> loss = swift(hidden, weight, labels, seq_ids, rewards, groups=groups)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, *, standardize=False, eps=1e-6, ignore_index=-100, reduction="mean",
                 normalize="sequence", impl="auto", chunk_bytes=None, fp32_weight_grad=None):
        super().__init__()
        self.kwargs = dict(standardize=standardize, eps=eps, ignore_index=ignore_index,
                           reduction=reduction, normalize=normalize, impl=impl)
        self.chunk_bytes, self.fp32_weight_grad = chunk_bytes, fp32_weight_grad

    def forward(self, hidden, weight, labels, seq_ids=None, rewards=None, *, bias=None, groups=None,
                reward_stats=None):
        """See :func:`weighted_ce`; `groups` [B] is needed with ``standardize="group"``."""
        with chunk_budget(self.chunk_bytes, fp32_weight_grad=self.fp32_weight_grad):
            return weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, groups=groups,
                               reward_stats=reward_stats, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
