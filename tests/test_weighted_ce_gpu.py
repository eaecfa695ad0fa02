"""The compiled Triton kernels on a real GPU against the float64 reference (skipped without CUDA).

Shapes are Llama-3's scaled down (D 4096 -> 512, V 128256 -> 16411, odd on purpose). Run on the GPU
machine with: python -m pytest -q tests/test_weighted_ce_gpu.py
"""
from __future__ import annotations

import os

import pytest
import torch

from refit_fast import chunk_budget, weighted_ce
from refit_fast.ops.chunking import plan_chunks
from refit_fast.ops.reference import weighted_ce_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _case(seed, N=1531, D=512, V=16411, B=7, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.4] = -100
    sid = torch.sort(torch.randint(0, B, (N,), generator=g)).values
    r = torch.rand(B, generator=g, dtype=torch.float64)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    return h, W, b, y, sid, r, up


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1.5e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("standardize", [False, True])
def test_triton_matches_float64_reference(dtype, tol, reduction, standardize):
    # fp32 tolerance allows TF32 in the BLAS matmuls (torch's default may enable it)
    seed = int.from_bytes(os.urandom(4), "little")
    h, W, b, y, sid, r, up = _case(seed, dtype=dtype)
    leaves64 = [t.clone().requires_grad_() for t in (h, W, b)]
    truth = weighted_ce_reference(*leaves64[:2], y, sid, r, bias=leaves64[2], standardize=standardize, reduction=reduction)
    g_truth = torch.autograd.grad(truth, leaves64, up if reduction == "none" else torch.tensor(1.0, dtype=torch.float64))

    leaves = [t.to("cuda", dtype).requires_grad_() for t in (h, W, b)]
    with chunk_budget(64 << 20):  # several chunks at this size
        ours = weighted_ce(*leaves[:2], y.cuda(), sid.cuda(), r.cuda().float(), bias=leaves[2],
                           standardize=standardize, reduction=reduction, impl="triton")
    g_ours = torch.autograd.grad(ours, leaves, (up if reduction == "none" else torch.tensor(1.0)).cuda().float())
    assert ours.dtype == torch.float32
    assert _rel(ours, truth) < tol, f"loss (seed {seed})"
    for name, a, t in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_truth):
        assert torch.isfinite(a).all()
        assert _rel(a, t) < tol, f"{name} (seed {seed})"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_head_options_compiled_match_float64_reference(dtype, tol, reduction):
    """softcap / logit_scale / z_loss / label_smoothing compiled for real (the interpreter runs them
    in test_weighted_ce_api.py), with shift and torch.compile's custom op on the GPU too."""
    seed = int.from_bytes(os.urandom(4), "little")
    h, W, b, y, sid, r, up = _case(seed, dtype=dtype)
    h = h * 4  # logits of a few units: the softcap bends them
    kw = dict(softcap=5.0, logit_scale=1.3, z_loss=1e-3, label_smoothing=0.1, shift=True, standardize=True,
              reduction=reduction)
    leaves64 = [t.clone().requires_grad_() for t in (h, W, b)]
    truth = weighted_ce_reference(*leaves64[:2], y, sid, r, bias=leaves64[2], **kw)
    g_truth = torch.autograd.grad(truth, leaves64, up if reduction == "none" else torch.tensor(1.0, dtype=torch.float64))
    for compiled in (False, True):
        leaves = [t.to("cuda", dtype).requires_grad_() for t in (h, W, b)]
        fn = lambda *a: weighted_ce(*a[:2], y.cuda(), sid.cuda(), r.cuda().float(), bias=a[2], impl="triton", **kw)  # noqa: E731
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True)
        with chunk_budget(64 << 20):
            ours = fn(*leaves)
        g_ours = torch.autograd.grad(ours, leaves, (up if reduction == "none" else torch.tensor(1.0)).cuda().float())
        assert _rel(ours, truth) < tol, f"loss (compiled={compiled}, seed {seed})"
        for name, a, t in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_truth):
            assert _rel(a, t) < tol, f"{name} (compiled={compiled}, seed {seed})"


def test_triton_equals_torch_path_on_gpu():
    seed = int.from_bytes(os.urandom(4), "little")
    h, W, b, y, sid, r, _ = _case(seed, dtype=torch.float32)
    args = (h.cuda().float(), W.cuda().float(), y.cuda(), sid.cuda(), r.cuda().float())
    a = weighted_ce(*args, standardize=True, impl="triton")
    t = weighted_ce(*args, standardize=True, impl="torch")
    assert torch.allclose(a, t, rtol=1e-4), seed


def test_fp32_weight_grad_accumulation_is_closer():
    """With many chunks, an fp32 weight-gradient accumulator is at least as accurate as bf16 adds."""
    seed = int.from_bytes(os.urandom(4), "little")
    h, W, b, y, sid, r, _ = _case(seed, N=4099, D=256, V=8191)
    W64 = W.clone().requires_grad_()
    truth = torch.autograd.grad(weighted_ce_reference(h, W64, y, sid, r), W64)[0]
    errs = []
    for fp32 in (False, True):
        Wc = W.to("cuda", torch.bfloat16).requires_grad_()
        with chunk_budget(8 << 20, fp32_weight_grad=fp32):
            loss = weighted_ce(h.to("cuda", torch.bfloat16), Wc, y.cuda(), sid.cuda(), r.cuda().float(), impl="triton")
        loss.backward()
        errs.append(_rel(Wc.grad, truth))
    assert errs[1] <= errs[0] * 1.05 + 1e-4 and errs[1] < 1e-2, errs


def test_extra_memory_is_bounded_by_the_budget():
    N, D, V = 16384, 1024, 32011
    budget = 128 << 20
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    # Warm up first: run alone (or first), the measured call would also count the cuBLAS workspace made
    # at the process's first matmul and anything Triton allocates while compiling/autotuning its kernels.
    with chunk_budget(budget):
        weighted_ce(h, W, y, impl="triton").backward()
    h.grad = W.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with chunk_budget(budget):
        weighted_ce(h, W, y, impl="triton").backward()
        planned = plan_chunks(N, D, V, dtype=torch.bfloat16).extra_bytes  # staging block, fp32 dW included
    torch.cuda.synchronize()
    grads = h.numel() * 2 + W.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - grads
    full_logits = N * V * 4
    assert extra <= planned + 64 * N + (4 << 20), f"extra {extra / 2**20:.1f} MiB"
    assert extra < full_logits / 4  # the plan: 0.39 GB here, the fp32 dW accumulator included (full logits: 2.1 GB)
