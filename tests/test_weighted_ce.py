"""weighted_ce against the float64 materializing reference: loss and every gradient, both
implementations (the Triton kernels under the interpreter on CPU), odd sizes, fresh seeds."""
from __future__ import annotations

import os

import pytest
import torch

import importlib
from refit_fast import WeightedCELoss, chunk_budget, weighted_ce
from refit_fast.ops.reference import weighted_ce_reference

wce = importlib.import_module("refit_fast.ops.weighted_ce")  # the module (the package exports the function)
kernels = importlib.import_module("refit_fast.ops.kernels")
chunking = importlib.import_module("refit_fast.ops.chunking")

# Without the interpreter (a GPU machine) the Triton kernels run compiled in test_weighted_ce_gpu.py.
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]
# (reduction, normalize) pairs that mean different things
REDUCTIONS = [("none", "sequence"), ("sum", "sequence"), ("mean", "sequence"), ("mean", "token"), ("mean", "none")]
# objective -> (use rewards, standardize, give reward_stats)
OBJECTIVES = {"sft": (False, False, False), "refit": (True, False, False),
              "swift": (True, True, False), "swift_global_stats": (True, True, True)}


def fresh_seed() -> int:
    """A new seed every run (REFIT_TEST_SEED pins one to reproduce a failure)."""
    return int(os.environ.get("REFIT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def make_case(seed, N=97, D=37, V=517, B=5, dtype=torch.float32, ignore_frac=0.3, bias=False):
    """Random packed batch: B conversations of random lengths, some tokens untrained, -1 seq_ids on
    untrained padding at the end."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    seq_ids = torch.sort(torch.randint(0, B, (N,), generator=g)).values
    labels[-3:] = -100
    seq_ids[-3:] = -1  # padding
    rewards = torch.rand(B, generator=g, dtype=torch.float64) * 2 - 0.5
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, seq_ids=seq_ids, rewards=rewards,
                upstream=torch.randn(N, generator=g, dtype=torch.float64), dtype=dtype)


def run_both(case, impl, reduction="mean", normalize="sequence", objective="swift", chunk_bytes=None, **extra):
    """Our loss and gradients (in case['dtype']) and the float64 truth, for the same inputs."""
    use_rewards, standardize, with_stats = OBJECTIVES[objective]
    kw = dict(reduction=reduction, normalize=normalize, standardize=standardize, **extra)
    if with_stats:
        kw["reward_stats"] = (0.3, 0.7)
    rewards = case["rewards"] if use_rewards else None
    leaves64 = [t.clone().requires_grad_() for t in (case["hidden"], case["weight"], case["bias"]) if t is not None]
    leaves = [t.detach().to(case["dtype"]).requires_grad_() for t in leaves64]
    b64 = leaves64[2] if len(leaves64) == 3 else None
    b = leaves[2] if len(leaves) == 3 else None
    truth = weighted_ce_reference(leaves64[0], leaves64[1], case["labels"], case["seq_ids"], rewards, bias=b64, **kw)
    with chunk_budget(chunk_bytes):
        ours = weighted_ce(leaves[0], leaves[1], case["labels"], case["seq_ids"],
                           rewards.to(torch.float64 if case["dtype"] == torch.float64 else torch.float32) if rewards is not None else None, bias=b, impl=impl, **kw)
    up = case["upstream"] if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    g_truth = torch.autograd.grad(truth, leaves64, up)
    g_ours = torch.autograd.grad(ours, leaves, up.to(ours.dtype))
    return ours, truth, g_ours, g_truth


def loss_scale(case, reduction="mean", normalize="sequence", objective="swift"):
    """The size of the terms a scalar loss adds up: with standardized rewards they cancel, so the
    rounding error scales with sum |w_t l_t| / denominator, not with the (small) total."""
    use_rewards, standardize, with_stats = OBJECTIVES[objective]
    terms = weighted_ce_reference(case["hidden"], case["weight"], case["labels"], case["seq_ids"],
                                  case["rewards"] if use_rewards else None, bias=case["bias"], standardize=standardize,
                                  reward_stats=(0.3, 0.7) if with_stats else None, reduction="none")
    valid = case["labels"] != -100
    denom = 1
    if reduction == "mean" and normalize == "sequence":
        denom = torch.unique(case["seq_ids"][valid]).numel()
    elif reduction == "mean" and normalize == "token":
        denom = int(valid.sum())
    return terms.abs().sum().item() / max(denom, 1)


def assert_close(ours, truth, rtol, what, seed, scale=None):
    """Error relative to the size of the truth (an adaptive tolerance, so zeros don't make it vacuous)."""
    scale = max(scale or 0.0, truth.abs().max().item()) + 1e-30
    err = (ours.double() - truth).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} * {scale:.3e} (seed {seed})"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction,normalize", REDUCTIONS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_matches_reference_fp32(impl, reduction, normalize, objective):
    seed = fresh_seed()
    case = make_case(seed, bias=(objective == "refit"))
    # a budget of ~13 rows per chunk: several chunks and a ragged last one
    ours, truth, g_ours, g_truth = run_both(case, impl, reduction, normalize, objective, chunk_bytes=13 * 517 * 8 + 13 * 37 * 4)
    assert ours.dtype == torch.float32 and ours.shape == truth.shape
    assert_close(ours, truth, 1e-5, "loss", seed, scale=loss_scale(case, reduction, normalize, objective))
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_truth):
        assert_close(a, b, 1e-5, name, seed)


def test_torch_impl_in_float64_is_exact():
    seed = fresh_seed()
    case = make_case(seed, N=61, D=23, V=301, B=3, dtype=torch.float64, bias=True)
    for reduction, normalize in REDUCTIONS:
        ours, truth, g_ours, g_truth = run_both(case, "torch", reduction, normalize, "swift", chunk_bytes=7 * 301 * 16)
        assert ours.dtype == torch.float64
        assert_close(ours, truth, 1e-12, "loss", seed)
        for a, b in zip(g_ours, g_truth):
            assert_close(a, b, 1e-12, "grad", seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocab_spans_many_kernel_blocks(impl, monkeypatch):
    """V=1031 with 64-wide blocks: the online log-sum-exp crosses 17 blocks and a ragged tail."""
    monkeypatch.setattr(kernels, "_block_v", lambda V: 64)
    seed = fresh_seed()
    case = make_case(seed, N=29, D=17, V=1031, B=3)
    for reduction in ("mean", "none"):
        ours, truth, g_ours, g_truth = run_both(case, impl, reduction)
        assert_close(ours, truth, 1e-5, "loss", seed, scale=loss_scale(case, reduction))
        for a, b in zip(g_ours, g_truth):
            assert_close(a, b, 1e-5, "grad", seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, dtype):
    """Our error against the fp64 truth stays within PyTorch's own low-precision error plus a margin."""
    seed = fresh_seed()
    case = make_case(seed, N=83, D=64, V=389, dtype=dtype)
    for reduction in ("mean", "none"):
        ours, truth, g_ours, g_truth = run_both(case, impl, reduction, chunk_bytes=20 * 389 * 8)
        assert ours.dtype == torch.float32
        assert_close(ours, truth, 1e-2, "loss", seed, scale=loss_scale(case, reduction))
        for a, b in zip(g_ours, g_truth):
            assert_close(a, b, 2e-2, "grad", seed)
        # and no worse than the naive low-precision computation (+ margin)
        h = case["hidden"].to(dtype).requires_grad_()
        naive = weighted_ce_reference(h, case["weight"].to(dtype), case["labels"], case["seq_ids"], case["rewards"].float(),
                                      standardize=True, reduction=reduction)
        naive_err = (naive.double() - truth).abs().max().item()
        scale = max(loss_scale(case, reduction), truth.abs().max().item())
        assert (ours.double() - truth).abs().max().item() <= 2 * naive_err + 1e-3 * scale, seed


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_rows_are_conversations(impl):
    """[B, T, D] input without seq_ids: each row is a conversation; reduction='none' keeps [B, T]."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = 3, 11, 13, 97
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :4] = -100
    r = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    for reduction in ("none", "mean"):
        truth = weighted_ce_reference(h, W, y, None, r, standardize=True, reduction=reduction)
        ours = weighted_ce(h.float(), W.float(), y, None, r.float(), standardize=True, reduction=reduction, impl=impl)
        assert ours.shape == truth.shape == ((B, T) if reduction == "none" else ())
        scale = weighted_ce_reference(h, W, y, None, r, standardize=True, reduction="none").abs().sum().item()
        assert_close(ours, truth, 1e-5, reduction, seed, scale=scale / B)
    # the same tokens flattened with explicit seq_ids give the same loss
    flat = weighted_ce(h.float().reshape(-1, D), W.float(), y.reshape(-1), torch.arange(B).repeat_interleave(T),
                       r.float(), standardize=True, impl=impl)
    assert torch.allclose(flat, ours, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_labels_ignored(impl, reduction):
    h = torch.randn(9, 5, requires_grad=True)
    W = torch.randn(23, 5, requires_grad=True)
    y = torch.full((9,), -100)
    loss = weighted_ce(h, W, y, torch.zeros(9, dtype=torch.long), torch.tensor([0.5]), standardize=True,
                       reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_conversation_and_identical_rewards_give_zero_weights(impl):
    case = make_case(fresh_seed(), N=40, D=8, V=57, B=4)
    h = case["hidden"].float().requires_grad_()
    W = case["weight"].float().requires_grad_()
    one_conv = torch.where(case["labels"] != -100, 0, -1)
    for seq_ids, rewards in ((one_conv, torch.tensor([0.9])), (case["seq_ids"], torch.full((4,), 0.25)),
                             (case["seq_ids"], torch.full((4,), 1e6))):
        loss = weighted_ce(h, W, case["labels"], seq_ids, rewards, standardize=True, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(h.grad).all()
        assert h.grad.abs().max() == 0 and W.grad.abs().max() == 0
        h.grad = W.grad = None


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_normalization_counts_only_trained_conversations(impl):
    """A conversation with no trained token is not counted; a weight-0 one still is."""
    V, D = 31, 6
    h = torch.randn(6, D, dtype=torch.float64)
    W = torch.randn(V, D, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, -100, 5, 6])
    sid = torch.tensor([0, 0, 1, 1, 2, 2])
    r = torch.tensor([1.0, 1.0, 1.0])
    total = weighted_ce(h.float(), W.float(), y, sid, r, reduction="sum", impl=impl)
    mean = weighted_ce(h.float(), W.float(), y, sid, r, reduction="mean", impl=impl)
    assert torch.allclose(mean, total / 2)  # conversation 1 has no trained token
    tok = weighted_ce(h.float(), W.float(), y, sid, r, reduction="mean", normalize="token", impl=impl)
    assert torch.allclose(tok, total / 4)
    r0 = torch.tensor([1.0, 1.0, 0.0])  # conversation 2 trained with weight 0: still counted
    assert torch.allclose(weighted_ce(h.float(), W.float(), y, sid, r0, impl=impl) * 2,
                          weighted_ce(h.float(), W.float(), y, sid, r0, reduction="sum", impl=impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_global_reward_stats_split_batch(impl):
    """Swift over a step split into micro-batches: with the global (mean, std) passed as reward_stats,
    the micro-batch sums add up to the whole batch's sum."""
    seed = fresh_seed()
    case = make_case(seed, N=80, D=9, V=67, B=6, ignore_frac=0.2)
    h, W, y, sid, r = case["hidden"].float(), case["weight"].float(), case["labels"], case["seq_ids"], case["rewards"].float()
    whole = weighted_ce(h, W, y, sid, r, standardize=True, reduction="sum", impl=impl)
    stats = (r.mean(), r.std(unbiased=False))
    cut = int(((sid >= 0) & (sid < 3)).sum())  # conversations 0-2 | 3-5 (+ padding)
    parts = []
    for lo, hi, conv in ((0, cut, slice(0, 3)), (cut, len(y), slice(3, 6))):
        s = sid[lo:hi].clone()
        s[s >= 0] -= conv.start
        parts.append(weighted_ce(h[lo:hi], W, y[lo:hi], s, r[conv], standardize=True, reward_stats=stats,
                                 reduction="sum", impl=impl))
    assert torch.allclose(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5), seed


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_budget_does_not_change_the_result(impl):
    case = make_case(fresh_seed(), N=50, D=12, V=211)
    results = [run_both(case, impl, chunk_bytes=cb)[::2] for cb in (1, 9 * 211 * 8, 1 << 30)]
    for ours, grads in results[1:]:
        assert torch.allclose(ours, results[0][0], rtol=1e-6, atol=1e-7)
        for a, b in zip(grads, results[0][1]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_gradient_to_rewards_and_no_grad_mode():
    case = make_case(fresh_seed(), N=20, D=4, V=13, B=5)
    h = case["hidden"].float().requires_grad_()
    r = case["rewards"].float().requires_grad_()
    loss = weighted_ce(h, case["weight"].float(), case["labels"], case["seq_ids"], r, standardize=True)
    loss.backward()
    assert r.grad is None and h.grad is not None
    with torch.no_grad():
        again = weighted_ce(h, case["weight"].float(), case["labels"], case["seq_ids"], r, standardize=True)
    assert not again.requires_grad and torch.allclose(again, loss)


def test_autocast_casts_like_linear():
    h = torch.randn(12, 16)
    W = torch.randn(40, 16, requires_grad=True)  # fp32 master weight under bf16 autocast
    y = torch.randint(0, 40, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_ce(h, W, y)
    loss.backward()
    assert W.grad.dtype == torch.float32
    truth = weighted_ce_reference(h.double(), W.detach().double(), y)
    assert abs(loss.item() - truth.item()) < 2e-2 * truth.abs().item()


def test_module_matches_function():
    case = make_case(fresh_seed(), N=30, D=6, V=41)
    args = (case["hidden"].float(), case["weight"].float(), case["labels"], case["seq_ids"], case["rewards"].float())
    mod = WeightedCELoss(standardize=True, normalize="token", chunk_bytes=4096)
    assert torch.allclose(mod(*args), weighted_ce(*args, standardize=True, normalize="token"))
    assert "standardize=True" in repr(mod)


# ---- bad input: a clear ValueError, never a wrong number ----
def _valid_args():
    h = torch.randn(6, 4)
    W = torch.randn(10, 4)
    y = torch.tensor([1, 2, -100, 3, 4, -100])
    sid = torch.tensor([0, 0, 0, 1, 1, -1])  # -1: padding, untrained
    return h, W, y, sid, torch.tensor([1.0, 0.5])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mutate,match", [
    (lambda a: a[2].__setitem__(1, 10), r"label 10 is outside \[0, V=10\)"),
    (lambda a: a[2].__setitem__(1, -7), r"label -7 is outside"),
    (lambda a: a[3].__setitem__(4, 2), r"seq_ids value 2 on a trained token is outside \[0, B=2\)"),
    (lambda a: a[3].__setitem__(4, -1), r"seq_ids value -1 on a trained token"),
    (lambda a: a[4].__setitem__(0, float("nan")), "rewards contain NaN or inf"),
    (lambda a: a[4].__setitem__(1, float("inf")), "rewards contain NaN or inf"),
])
def test_bad_values(impl, mutate, match):
    args = list(_valid_args())
    mutate(args)
    with pytest.raises(ValueError, match=match):
        weighted_ce(*args, impl=impl)


@pytest.mark.parametrize("call,match", [
    (lambda h, W, y, s, r: weighted_ce(h, W[:, :3], y, s, r), "weight must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y[:5], s, r), "labels shape"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y.float(), s, r), "labels must be an integer"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s[:5], r), "seq_ids must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W.double(), y, s, r), "dtype"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, None, torch.ones(3)), "rewards has 3 entries but there are 1"),
    (lambda h, W, y, s, r: weighted_ce(h.reshape(2, 3, 4), W, y.reshape(2, 3), None, torch.ones(3)), "3 entries but there are 2"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, None, standardize=True), "needs rewards"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, reward_stats=(0.0, 1.0)), "only used with standardize"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize=True, reward_stats=(0.0, -1.0)), "std must be >= 0"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize=True, reward_stats=(float("nan"), 1.0)), "NaN"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, reduction="avg"), "reduction must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, normalize="batch"), "normalize must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, impl="cuda"), "impl must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, bias=torch.zeros(9)), "bias must be"),
    (lambda h, W, y, s, r: weighted_ce(h[0], W, y, s, r), "hidden must be"),
    (lambda h, W, y, s, r: weighted_ce(h.double(), W.double(), y, s, r, impl="triton"), "float64"),
    (lambda h, W, y, s, r: weighted_ce(h.to(torch.int32), W.to(torch.int32), y, s, r), "hidden must be float"),
    (lambda h, W, y, s, r: weighted_ce(h, W.to("meta"), y, s, r), "weight is on meta but hidden is on cpu"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r.to("meta")), "rewards is on meta"),
    # group standardization: every argument checked, named in the message
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group"), "needs groups"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, None, standardize="group", groups=torch.tensor([0, 0])), "needs rewards"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, groups=torch.tensor([0, 0])), "groups is only used with standardize='group'"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize=True, groups=torch.tensor([0, 0])), "groups is only used"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([0, 0, 1])), r"groups must have shape \[B\]=\(2,\)"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([[0, 0]])), "groups must have shape"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([0.0, 1.0])), "groups must be an integer"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([True, False])), "groups must be an integer"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([0, -2])), "groups value -2 is negative"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([0, 1]).to("meta")), "groups is on meta"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=[0, 1]), "groups must be a"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="group", groups=torch.tensor([0, 1]),
                                       reward_stats=(0.0, 1.0)), "reward_stats is only used with standardize=True"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize="groups"), "standardize must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize=1), "standardize must be"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r.double() * 1e200, standardize=True), "rewards must be at most 1e"),
    (lambda h, W, y, s, r: weighted_ce(h, W, y, s, r, standardize=True, eps=-1.0), "eps must be"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_valid_args())


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        weighted_ce(*_valid_args(), impl="triton")


def test_rewards_as_a_list_are_accepted():
    h, W, y, sid, r = _valid_args()
    assert torch.allclose(weighted_ce(h, W, y, sid, [1.0, 0.5]), weighted_ce(h, W, y, sid, r))


# ---- memory: the torch path stays inside its chunk plan ----
def test_torch_path_peak_memory_is_bounded_by_the_chunk_plan():
    from memtrack import PeakMemory

    N, D, V = 8192, 32, 32000
    budget = 16 << 20
    full_logits = N * V * 4
    assert full_logits >= 10**9  # what materializing would need: 1 GB
    g = torch.Generator().manual_seed(fresh_seed())
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    sid = torch.arange(N) // 100
    r = torch.rand(int(sid[-1]) + 1, generator=g)
    n_valid = int((y != -100).sum())
    plan = chunking.plan_chunks(n_valid, D, V, dtype=torch.float32, budget_bytes=budget)
    assert plan.n_stages >= 2 and plan.stage_rows == 2048 and plan.sub_rows == 128
    with chunk_budget(budget), PeakMemory() as mem:
        loss = weighted_ce(h, W, y, sid, r, standardize=True, impl="torch")
        loss.backward()
    grads = h.numel() * 4 + W.numel() * 4
    o_n = 64 * N  # a few O(N) index / weight / loss vectors
    assert mem.peak <= plan.extra_bytes + grads + o_n, f"peak {mem.peak / 2**20:.1f} MiB"
    assert mem.peak >= plan.stage_bytes  # the staging block is really there (the bound is not vacuous)
    assert mem.peak < full_logits / 3
    assert torch.isfinite(loss) and torch.isfinite(W.grad).all()
