"""Reward standardization: `standardize_rewards` and weighted_ce's standardize="group" / "batch"
against plain float64 statements (the reference), both implementations (Triton under the
interpreter on CPU); the exactness cases (identical rewards, huge rewards, eps=0)."""
from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch

from refit_fast import WeightedCELoss, weighted_ce
from refit_fast.ops import standardize_rewards
from refit_fast.ops.reference import weighted_ce_reference

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]


def fresh_seed() -> int:
    """A new seed every run (REFIT_TEST_SEED pins one to reproduce a failure)."""
    return int(os.environ.get("REFIT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def plain_standardized(rewards, groups=None, eps=1e-6):
    """The rule written out with Python numbers (math.fsum), independent of torch reductions."""
    import math
    r = [float(x) for x in rewards.double().tolist()]
    gs = [0] * len(r) if groups is None else groups.tolist()
    out = [0.0] * len(r)
    for g in set(gs):
        idx = [i for i, x in enumerate(gs) if x == g]
        vals = [r[i] for i in idx]
        if all(v == vals[0] for v in vals):
            continue  # weight 0
        mean = math.fsum(vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals))
        for i in idx:
            out[i] = (r[i] - mean) / (std + eps)
    return torch.tensor(out, dtype=torch.float64)


def random_groups(g, sizes, n_ids=40):
    """Conversations in random order with group ids drawn from [0, n_ids) (not all used, unordered)."""
    ids = torch.randperm(n_ids, generator=g)[: len(sizes)]
    groups = torch.cat([torch.full((s,), int(i)) for s, i in zip(sizes, ids)])
    return groups[torch.randperm(groups.numel(), generator=g)]


# ---- standardize_rewards ----
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_standardize_rewards_matches_plain_float64(scale):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 5, 2, 1, 7, 3, 4]  # odd sizes, singletons
    groups = random_groups(g, sizes)
    r = ((torch.rand(groups.numel(), generator=g) * 2 - 0.5) * scale).float()
    r[groups == groups[0]] = 100.1 * scale  # one group of identical rewards
    for eps in (1e-6, 0.0):
        ours = standardize_rewards(r, groups, eps=eps)
        truth = plain_standardized(r, groups, eps)
        assert ours.dtype == torch.float64 and ours.shape == r.shape
        assert torch.allclose(ours, truth, rtol=1e-12, atol=1e-12), seed
        assert torch.all(ours[groups == groups[0]] == 0)
        for gid in groups.unique():  # weights sum to zero per group
            assert abs(ours[groups == gid].sum().item()) < 1e-9
        batch = standardize_rewards(r, eps=eps)
        assert torch.allclose(batch, plain_standardized(r, None, eps), rtol=1e-12, atol=1e-12), seed


def test_standardize_rewards_sparse_ids_renumbered():
    """Group ids far beyond B (hashes) give the same result as small ids (sorted renumbering path)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g, [2, 3, 1, 4])
    r = torch.rand(groups.numel(), generator=g, dtype=torch.float64)
    huge = groups * 10**12 + 7
    assert torch.equal(standardize_rewards(r, huge), standardize_rewards(r, groups))
    assert torch.allclose(standardize_rewards(r, huge), plain_standardized(r, groups), rtol=1e-12, atol=1e-12)


# copies of 100.1 whose float64 mean is not 100.1 in any summation order (n = 3, 6, 12), and n = 7
TIES = (3, 6, 7, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_rewards_are_exactly_zero(dtype):
    """100.1 x n: a float mean of the copies is not always 100.1; the shift makes every deviation 0."""
    for n in TIES:
        r = torch.full((n,), 100.1, dtype=dtype)
        for eps in (1e-6, 0.0):
            assert torch.all(standardize_rewards(r, eps=eps) == 0)
            assert torch.all(standardize_rewards(r, torch.zeros(n, dtype=torch.long), eps=eps) == 0)
    r = torch.full((7,), 100.1, dtype=dtype)
    mixed = torch.cat([r, torch.tensor([0.0, 1.0], dtype=dtype)])
    out = standardize_rewards(mixed, torch.tensor([3, 3, 3, 3, 3, 3, 3, 1, 1]), eps=0.0)
    assert torch.all(out[:7] == 0) and torch.equal(out[7:], torch.tensor([-1.0, 1.0], dtype=torch.float64))


def test_zero_variance_with_eps_zero_is_zero_not_nan():
    assert torch.equal(standardize_rewards(torch.tensor([0.25]), eps=0.0), torch.zeros(1, dtype=torch.float64))
    out = standardize_rewards(torch.tensor([0.25, 0.25, 3.0]), torch.tensor([0, 0, 5]), eps=0.0)
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))
    # given statistics with std 0: weight 0 too
    assert torch.equal(standardize_rewards(torch.tensor([1.0, 2.0]), eps=0.0, stats=(1.5, 0.0)),
                       torch.zeros(2, dtype=torch.float64))
    assert standardize_rewards(torch.zeros(0)).shape == (0,)


def test_huge_rewards_match_float64():
    """Squared deviations of 1e20-1e30 rewards overflow float32; the float64 statistics are exact."""
    for r in (torch.tensor([1e20, 3e20, 2e20, 7e20]), torch.tensor([1e30, -2e30, 5e29, 1e30, 3e30])):
        ours = standardize_rewards(r)
        assert torch.allclose(ours, plain_standardized(r), rtol=1e-12, atol=0)
        assert ours.abs().min() > 0.1


def test_given_stats():
    r = torch.tensor([1.0, 3.0, 2.0])
    out = standardize_rewards(r, eps=0.0, stats=(torch.tensor(2.0), 0.5))
    assert torch.equal(out, torch.tensor([-2.0, 2.0, 0.0], dtype=torch.float64))


def test_standardize_rewards_at_dataset_scale():
    """A million conversations in groups of 3 (CPU float64): O(B), and each group standardized."""
    B = 1_000_002
    g = torch.Generator().manual_seed(fresh_seed())
    groups = torch.randperm(B, generator=g) // 3
    r = torch.rand(B, generator=g, dtype=torch.float64)
    out = standardize_rewards(r, groups, eps=0.0)
    sums = torch.zeros(B // 3, dtype=torch.float64).index_add_(0, groups, out)
    sq = torch.zeros(B // 3, dtype=torch.float64).index_add_(0, groups, out * out)
    assert sums.abs().max() < 1e-9 and torch.allclose(sq, torch.full_like(sq, 3.0))


@pytest.mark.parametrize("call,match", [
    (lambda r, g: standardize_rewards(r, g[:3]), "groups must have shape"),
    (lambda r, g: standardize_rewards(r, g.float()), "groups must be an integer"),
    (lambda r, g: standardize_rewards(r, g.bool()), "groups must be an integer"),
    (lambda r, g: standardize_rewards(r, g - 1), "groups must be >= 0"),
    (lambda r, g: standardize_rewards(r, g.to("meta")), "groups is on meta"),
    (lambda r, g: standardize_rewards(r, g.tolist()), "groups must be a"),
    (lambda r, g: standardize_rewards(r, g, stats=(0.0, 1.0)), "stats is only used without groups"),
    (lambda r, g: standardize_rewards(r, stats=(0.0, -1.0)), "std must be >= 0"),
    (lambda r, g: standardize_rewards(r, stats=(float("nan"), 1.0)), "stats contain NaN"),
    (lambda r, g: standardize_rewards(r, stats=(0.0,)), "stats must be a"),
    (lambda r, g: standardize_rewards(r, eps=-1e-6), "eps must be"),
    (lambda r, g: standardize_rewards(r.reshape(2, 2), g), "rewards must be a 1-D"),
    (lambda r, g: standardize_rewards(torch.tensor([1.0, float("inf")])), "rewards must be finite"),
    (lambda r, g: standardize_rewards(torch.tensor([1.0, 1e200], dtype=torch.float64)), "at most 1e"),
])
def test_standardize_rewards_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1]))


# ---- weighted_ce with standardize="group" ----
def group_case(seed, sizes, scale=1.0, rows=3, D=8, V=61, identical_group=True):
    """Conversations of random lengths whose tokens are scattered over `rows` packed rows (a group,
    even a conversation, at non-contiguous positions), the last row untrained, some padding."""
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g, sizes)
    B = groups.numel()
    lengths = torch.randint(2, 6, (B,), generator=g)
    sid = torch.repeat_interleave(torch.arange(B), lengths)
    T = -(-(sid.numel() + 3) // (rows - 1))
    pos = torch.randperm((rows - 1) * T, generator=g)
    seq_ids = torch.full((rows * T,), -1)
    seq_ids[pos[: sid.numel()]] = sid
    labels = torch.randint(0, V, (rows * T,), generator=g)
    labels[torch.rand(rows * T, generator=g) < 0.25] = -100
    labels[seq_ids < 0] = -100
    labels[(rows - 1) * T:] = -100  # an all-ignored row
    seq_ids[(rows - 1) * T:] = torch.randint(0, B, (T,), generator=g)
    rewards = ((torch.rand(B, generator=g) * 2 - 0.5) * scale).float()
    if identical_group:
        rewards[groups == groups[0]] = 100.1 * scale
    return dict(hidden=torch.randn(rows, T, D, generator=g, dtype=torch.float64),
                weight=torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5,
                bias=torch.randn(V, generator=g, dtype=torch.float64),
                labels=labels.reshape(rows, T), seq_ids=seq_ids.reshape(rows, T), rewards=rewards, groups=groups,
                upstream=torch.randn(rows, T, generator=g, dtype=torch.float64))


def compare(case, impl, seed, reduction="mean", normalize="sequence", rtol=1e-5, **kw):
    """Loss and gradients (hidden, weight, bias) of ours in fp32 against the float64 reference."""
    leaves64 = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    args = (case["labels"], case["seq_ids"])
    kw = dict(reduction=reduction, normalize=normalize, **kw)
    truth = weighted_ce_reference(leaves64[0], leaves64[1], *args, case["rewards"].double(), bias=leaves64[2], **kw)
    ours = weighted_ce(leaves[0], leaves[1], *args, case["rewards"], bias=leaves[2], impl=impl, **kw)
    up = case["upstream"] if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)
    g_truth = torch.autograd.grad(truth, leaves64, up)
    g_ours = torch.autograd.grad(ours, leaves, up.float())
    # the scale of the terms that cancel in the sum (standardized weights have both signs)
    terms = weighted_ce_reference(*[t.detach() for t in leaves64[:2]], *args, case["rewards"].double(),
                                  bias=leaves64[2].detach(), **dict(kw, reduction="none"))
    valid = case["labels"] != -100
    denom = {"sequence": torch.unique(case["seq_ids"][valid]).numel(), "token": int(valid.sum()), "none": 1}[normalize]
    scale = terms.abs().sum().item() / (max(denom, 1) if reduction == "mean" else 1)
    for name, a, b in zip(("loss", "d_hidden", "d_weight", "d_bias"), (ours, *g_ours), (truth, *g_truth)):
        ref = max(b.abs().max().item(), scale if name == "loss" else 0.0) + 1e-30
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * ref, f"{name}: error {err:.3e} > {rtol} * {ref:.3e} (seed {seed}, {impl})"
    return ours, truth, g_ours


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction,normalize", [("mean", "sequence"), ("none", "sequence"), ("sum", "sequence"),
                                                 ("mean", "token")])
def test_group_matches_reference(impl, reduction, normalize):
    seed = fresh_seed()
    case = group_case(seed, [3, 1, 5, 2, 1, 4])
    ours, _, g_ours = compare(case, impl, seed, reduction, normalize, standardize="group", groups=case["groups"])
    assert all(torch.isfinite(t).all() for t in (ours, *g_ours))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_huge_rewards_and_eps_zero(impl):
    """Rewards of 1e30 (distinct within each group but one): float64 statistics; eps=0 is safe."""
    seed = fresh_seed()
    case = group_case(seed, [3, 2, 1, 3], scale=1e30)
    _, truth, g_ours = compare(case, impl, seed, standardize="group", groups=case["groups"], eps=0.0)
    assert truth.abs() > 0 and g_ours[0].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_group_weights_of_tied_and_single_groups_are_zero(impl):
    """Only singleton groups and tied groups (float64 100.1 x3 and x6, whose plain float64 mean is
    not 100.1): loss and gradients exactly 0 (also eps=0, no NaN); one conversation alone likewise."""
    case = group_case(fresh_seed(), [1, 6, 1, 3, 1])
    sizes = torch.bincount(case["groups"])
    case["rewards"] = torch.where(sizes[case["groups"]] > 1, torch.tensor(100.1, dtype=torch.float64), -3.7)
    assert case["rewards"].dtype == torch.float64 and case["rewards"].max() == 100.1
    h = case["hidden"].float().requires_grad_()
    W = case["weight"].float().requires_grad_()
    for eps in (1e-6, 0.0):
        loss = weighted_ce(h, W, case["labels"], case["seq_ids"], case["rewards"], standardize="group",
                           groups=case["groups"], eps=eps, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(W.grad == 0)
        h.grad = W.grad = None
    y = torch.tensor([1, 2, -100, 3])
    one = weighted_ce(h[0, :4], W, y, torch.zeros(4, dtype=torch.long), torch.tensor([0.8]), standardize="group",
                      groups=torch.tensor([9]), eps=0.0, impl=impl, reduction="none")
    assert torch.equal(one, torch.zeros(4))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_all_tokens_ignored(impl):
    h = torch.randn(8, 5, requires_grad=True)
    W = torch.randn(17, 5, requires_grad=True)
    loss = weighted_ce(h, W, torch.full((8,), -100), torch.tensor([0, 0, 1, 1, 2, 2, 2, -1]),
                       torch.tensor([0.5, 0.1, 0.9]), standardize="group", groups=torch.tensor([1, 1, 0]), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(W.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_equals_batch_for_one_group_and_module(impl):
    """One group holding every conversation is the batch standardization; the module passes groups."""
    case = group_case(fresh_seed(), [4, 3], identical_group=False)
    args = (case["hidden"].float(), case["weight"].float(), case["labels"], case["seq_ids"], case["rewards"])
    B = case["rewards"].numel()
    grouped = weighted_ce(*args, standardize="group", groups=torch.full((B,), 6), impl=impl)
    assert torch.allclose(grouped, weighted_ce(*args, standardize=True, impl=impl), rtol=1e-6, atol=1e-7)
    mod = WeightedCELoss(standardize="group", impl=impl)
    assert torch.equal(mod(*args, groups=case["groups"]), weighted_ce(*args, standardize="group",
                                                                      groups=case["groups"], impl=impl))


# ---- batch standardization: exact statistics ----
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_identical_rewards_give_exactly_zero(impl):
    """100.1 x7 used to give weights of ~0.88 (float32 cancellation); now exactly 0 for any count,
    float32 or float64 rewards, also eps=0."""
    g = torch.Generator().manual_seed(fresh_seed())
    h = torch.randn(21, 6, generator=g, requires_grad=True)
    W = torch.randn(29, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (21,), generator=g)
    for n, dtype in itertools.product(TIES, (torch.float32, torch.float64)):
        for eps in (1e-6, 0.0):
            per_tok = weighted_ce(h, W, y, torch.arange(21) % n, torch.full((n,), 100.1, dtype=dtype),
                                  standardize=True, eps=eps, impl=impl, reduction="none")
            per_tok.sum().backward()
            assert torch.all(per_tok == 0) and torch.all(h.grad == 0) and torch.all(W.grad == 0), (n, dtype, eps)
            h.grad = W.grad = None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_batch_huge_rewards_match_reference(impl, scale):
    """Rewards >= 1e20 used to give loss 0 and zero gradients (squares overflow float32)."""
    seed = fresh_seed()
    case = group_case(seed, [3, 2, 2], scale=scale, identical_group=False)
    _, truth, g_ours = compare(case, impl, seed, standardize=True)
    assert truth.abs() > 0 and g_ours[1].abs().max() > 0
    compare(case, impl, seed, reduction="none", standardize=True, eps=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_spelling_and_given_stats_std_zero(impl):
    case = group_case(fresh_seed(), [2, 3], identical_group=False)
    h, W = case["hidden"].float().requires_grad_(), case["weight"].float()
    args = (case["labels"], case["seq_ids"], case["rewards"])
    a = weighted_ce(h, W, *args, standardize=True, impl=impl)
    (ga,) = torch.autograd.grad(a, h)
    b = weighted_ce(h, W, *args, standardize="batch", impl=impl)
    (gb,) = torch.autograd.grad(b, h)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    for off in (False, None, "none"):
        assert torch.equal(weighted_ce(h, W, *args, standardize=off, impl=impl), weighted_ce(h, W, *args, impl=impl))
    # a given std of 0 (all rewards equal where the statistics came from): weights 0, not (r - mean) / eps
    zero = weighted_ce(h, W, *args, standardize="batch", reward_stats=(0.3, 0.0), eps=0.0, impl=impl)
    assert zero.item() == 0.0


# ---- the Triton weight kernel across many blocks (as compiled: tiles much smaller than B) ----
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreted Triton on CPU tensors")
@pytest.mark.parametrize("mode", ["batch", "group"])
def test_weight_kernel_with_small_blocks(mode, monkeypatch):
    """BLOCK_N=16 tokens and BLOCK_B=8 rewards for 61 tokens of B=21 conversations: every program loops
    over three reward blocks with a ragged tail, the last token block is ragged too."""
    wce = importlib.import_module("refit_fast.ops.kernels")
    monkeypatch.setattr(wce, "_weight_blocks", lambda n, B, grouped: (16, 8))
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g, [5, 1, 3, 7, 2, 3])
    B = groups.numel()
    rewards = torch.rand(B, generator=g, dtype=torch.float64) * 1e30
    rewards[groups == groups[-1]] = 100.1
    sid = torch.randint(0, B, (61,), generator=g)
    ours = wce.token_weights_triton(rewards, sid, standardize=mode, eps=0.0, reward_stats=None, groups=groups)
    truth = plain_standardized(rewards, groups if mode == "group" else None, 0.0)[sid]
    assert torch.allclose(ours.double(), truth, rtol=1e-6, atol=1e-6), seed
    if mode == "group":
        assert torch.all(ours[groups[sid] == groups[-1]] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled Triton kernel)")
def test_group_on_cuda_matches_reference():
    """The compiled kernel (32x32 tiles, several reward blocks): float32 and float64 rewards, ties."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g, [3] * 40 + [1, 5, 2, 7], n_ids=200)
    B = groups.numel()
    N, D, V = 2000, 32, 1000
    sid = torch.randint(0, B, (N,), generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    for rewards in (torch.rand(B, generator=g), torch.rand(B, generator=g, dtype=torch.float64) * 1e30):
        rewards[groups == groups[0]] = 100.1
        truth = weighted_ce_reference(h, W, y, sid, rewards.double(), standardize="group", groups=groups,
                                      reduction="none")
        ours = weighted_ce(h.float().cuda(), W.float().cuda(), y.cuda(), sid.cuda(), rewards.cuda(),
                           standardize="group", groups=groups.cuda(), reduction="none", impl="triton")
        assert torch.allclose(ours.cpu().double(), truth, rtol=1e-4, atol=1e-4), seed
        assert torch.all(ours.cpu()[groups[sid] == groups[0]] == 0)
