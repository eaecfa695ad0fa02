"""The Triton kernels of weighted_ce with their launchers.

Two kernels: `_token_weight_kernel` (the per-token reward weight, with the reward standardization in
float64) and `_ce_rows_kernel` (per row of a sub-chunk: log-sum-exp, weighted loss, softmax gradient
into the staging block). Their plain-PyTorch statements are in weighted_ce_torch.py
(`token_weights_torch`, `ce_rows_torch`); the chunk plan and the driver that calls them are in
chunking.py.

Launch arguments are whole tensors plus row offsets (never slices), and the offsets are not
specialized, so every launch of a kernel for one dtype and vocabulary compiles to the same variant
(torch allocations are 16-byte aligned; the row stride is V). `ce_rows_launch` and
`token_weights_launch` build the exact arguments of a launch, so tests/compile_kernels.py compiles
the variants that run from them.
"""
from __future__ import annotations

import os

import torch

try:  # triton is a Linux dependency; the torch path works without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
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
    def _tanh(x):
        # 1 - 2 / (e^{2x} + 1): exact limits (+-1) at +-inf, portable (compiled and interpreted)
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _head(z, scale, cap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
        # the head's transform of raw logits (weighted_ce_torch.Head): scale, then softcap
        if SCALE:
            z = z * scale
        if SOFTCAP:
            z = cap * _tanh(z / cap)
        return z

    @triton.jit(do_not_specialize=["z_row0", "g_row0", "t_row0"])
    def _ce_rows_kernel(
        logits_ptr, grad_ptr, labels_ptr, w_ptr, coef_ptr, loss_ptr, z_row0, g_row0, t_row0, V,
        scale, cap, z_loss, smoothing,
        COEF_PER_ROW: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
        SCALE: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ZLOSS: tl.constexpr = False,
        SMOOTH: tl.constexpr = False,
    ):
        """One program per row r of a sub-chunk (rows of stride V everywhere):

        logits row z_row0 + r of `logits_ptr` (fp32), gradient row g_row0 + r of `grad_ptr` (the
        staging block, its dtype), token t_row0 + r of labels / w / coef / loss. Pass 1 keeps a
        running max and sum of exponentials per lane ([BLOCK_V] vectors) and reduces them once per
        row; pass 2 writes g = w * coef * (softmax - onehot). `grad_ptr` may alias `logits_ptr`
        (fp32 staging): each element is read before the same lane overwrites it.

        SCALE / SOFTCAP / ZLOSS / SMOOTH: the non-plain head of weighted_ce_torch.Head (logit scale,
        tanh softcap, z-loss, label smoothing), each compiled in only when used."""
        r = tl.program_id(0).to(tl.int64)
        zrow = logits_ptr + (z_row0 + r) * V
        t = t_row0 + r
        lanes = tl.arange(0, BLOCK_V)
        m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        zs_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            vmask = offs < V
            z = tl.load(zrow + offs, mask=vmask, other=float("-inf")).to(tl.float32)
            if SCALE or SOFTCAP:
                z = tl.where(vmask, _head(z, scale, cap, SCALE, SOFTCAP), float("-inf"))
            if SMOOTH:
                zs_vec += tl.where(vmask, z, 0.0)
            m_new = tl.maximum(m_vec, z)
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no element yet: no -inf - -inf
            s_vec = s_vec * tl.exp(m_vec - base) + tl.exp(z - base)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
        label = tl.load(labels_ptr + t)
        target = tl.load(zrow + label).to(tl.float32)
        w = tl.load(w_ptr + t)
        if SCALE or SOFTCAP or ZLOSS or SMOOTH:
            target = _head(target, scale, cap, SCALE, SOFTCAP)
            if SMOOTH:
                nll = lse - (1.0 - smoothing) * target - (smoothing / V) * tl.sum(zs_vec, axis=0)
            else:
                nll = lse - target
            loss = w * nll
            if ZLOSS:
                loss += z_loss * lse * lse
            tl.store(loss_ptr + t, loss)
        else:
            tl.store(loss_ptr + t, w * (lse - target))
        if COMPUTE_GRAD:
            if COEF_PER_ROW:
                coef = tl.load(coef_ptr + t)
            else:
                coef = tl.load(coef_ptr)
            scale_w = w * coef
            if SCALE:
                coef_s = coef * scale  # d z' / d z = scale, folded into the coefficients
            else:
                coef_s = coef
            c_p = coef_s * w  # on softmax
            if ZLOSS:
                c_p += coef_s * 2.0 * z_loss * lse
            c_y = coef_s * w  # on the label
            if SMOOTH:
                c_y = c_y * (1.0 - smoothing)
            c_all = coef_s * w * (smoothing / V)  # on every class (SMOOTH)
            grow = grad_ptr + (g_row0 + r) * V
            for start in range(0, V, BLOCK_V):
                offs = start + lanes
                vmask = offs < V
                z = tl.load(zrow + offs, mask=vmask, other=0.0).to(tl.float32)
                if SCALE or SOFTCAP or ZLOSS or SMOOTH:
                    z = _head(z, scale, cap, SCALE, SOFTCAP)
                    g = c_p * tl.exp(z - lse) - tl.where(offs == label, c_y, 0.0)
                    if SMOOTH:
                        g -= c_all
                    if SOFTCAP:
                        tz = z / cap
                        g = g * (1.0 - tz * tz)
                else:
                    g = (tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)) * scale_w
                tl.store(grow + offs, g.to(grow.dtype.element_ty), mask=vmask)


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
        return 32, min(triton.next_power_of_2(n_rewards), 32)  # 32 x 32 float64 tiles: no spills (sm_90)
    return 1024, min(triton.next_power_of_2(n_rewards), 4096)


def token_weights_launch(rewards, seq_ids_valid, out, *, standardize, eps, stats, groups):
    """(grid, args, kwargs) of the one `_token_weight_kernel` launch of :func:`token_weights_triton`."""
    n = seq_ids_valid.numel()
    B = max(rewards.numel(), 1)
    grouped = standardize == "group"
    BLOCK_N, BLOCK_B = _weight_blocks(n, B, grouped)
    args = (rewards, rewards.numel(), stats if stats is not None else rewards,
            groups if grouped else seq_ids_valid, seq_ids_valid, out, n, float(eps))
    kwargs = dict(STANDARDIZE=standardize != "none", HAS_STATS=stats is not None, GROUPED=grouped,
                  BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, num_warps=4)
    return (triton.cdiv(n, BLOCK_N),), args, kwargs


def token_weights_triton(rewards, seq_ids_valid, *, standardize, eps, reward_stats, groups=None):
    """Triton twin of :func:`token_weights_torch` (fp32 out, float64 statistics), one launch."""
    n = seq_ids_valid.numel()
    out = torch.empty(n, dtype=torch.float32, device=seq_ids_valid.device)
    if n == 0:
        return out
    if rewards.dtype not in (torch.float32, torch.float64):  # bf16/fp16: not loadable when interpreted
        rewards = rewards.float()
    stats = None
    if standardize == "batch" and reward_stats is not None:
        stats = torch.stack([reward_stats[0], reward_stats[1]]).to(torch.float64)
    grid, args, kwargs = token_weights_launch(rewards, seq_ids_valid, out, standardize=standardize, eps=eps,
                                              stats=stats, groups=groups)
    _token_weight_kernel[grid](*args, **kwargs)
    return out


def ce_rows_launch(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head=(1.0, 0.0, 0.0, 0.0)):
    """(grid, args, kwargs) of the `_ce_rows_kernel` launch of :func:`ce_rows_triton`. `head`:
    (scale, softcap, z_loss, smoothing), a weighted_ce_torch.Head or a plain tuple."""
    V = zbuf.shape[1]
    compute_grad = grad is not None
    per_row = bool(compute_grad and coef.dim() == 1)
    scale, cap, z_loss, smoothing = (float(x) for x in head)
    args = (zbuf, grad if compute_grad else zbuf, labels_v, w_v, coef if compute_grad else w_v, loss_v,
            int(z0), int(g0), int(t0), V, scale, cap, z_loss, smoothing)
    kwargs = dict(COEF_PER_ROW=per_row, COMPUTE_GRAD=compute_grad, BLOCK_V=_block_v(V), num_warps=8)
    flags = dict(SCALE=scale != 1.0, SOFTCAP=cap != 0.0, ZLOSS=z_loss != 0.0, SMOOTH=smoothing != 0.0)
    kwargs.update({k: True for k, on in flags.items() if on})  # the plain head: the variant of before
    return (int(c),), args, kwargs


def ce_rows_triton(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head=(1.0, 0.0, 0.0, 0.0)):
    """Triton twin of :func:`ce_rows_torch` (same arguments, same results): rows z0..z0+c of the fp32
    logits `zbuf` [*, V] are tokens t0..t0+c of labels_v / w_v / loss_v [Nv] (and of coef when it is
    [Nv]; else a 0-dim tensor); their gradient goes to rows g0..g0+c of `grad` [*, V] (the
    staging block, may be zbuf itself) unless grad is None. Writes loss_v[t0:t0+c]."""
    if c == 0:
        return
    grid, args, kwargs = ce_rows_launch(zbuf, z0, grad, g0, c, labels_v, w_v, coef, loss_v, t0, head)
    _ce_rows_kernel[grid](*args, **kwargs)
