"""weighted_ce's ecosystem options (issue #15 item 3): the token mean without seq_ids, `shift`,
`denominator`, the head options (`softcap`, `logit_scale`, `z_loss`, `label_smoothing`) in both
implementations with exact gradients, `validate=False`, and torch.compile(fullgraph=True).

Each is checked against the float64 materializing reference (which writes them out plainly) and,
where PyTorch has the same thing, against PyTorch itself."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from refit_fast import WeightedCELoss, weighted_ce
from refit_fast.ops.reference import weighted_ce_reference
from test_weighted_ce import IMPLS, assert_close, fresh_seed, make_case, run_both

# head options that change the logits or the loss, alone and together
HEADS = {
    "softcap": dict(softcap=2.5),
    "logit_scale": dict(logit_scale=0.6),
    "z_loss": dict(z_loss=0.05),
    "label_smoothing": dict(label_smoothing=0.15),
    "all": dict(softcap=4.0, logit_scale=1.7, z_loss=1e-2, label_smoothing=0.3),
}
BUDGET = 4 * 517 * 4 + 3  # 4 rows per sub-chunk: many chunks, the last ragged


def _scale(case, **kw):
    """Size of the terms the scalar loss adds up (standardized rewards cancel; see test_weighted_ce)."""
    terms = weighted_ce_reference(case["hidden"], case["weight"], case["labels"], case["seq_ids"], case["rewards"],
                                  bias=case["bias"], standardize=True, reduction="none", **kw)
    return terms.abs().sum().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("reduction,normalize", [("mean", "sequence"), ("mean", "token"), ("sum", "sequence"),
                                                 ("none", "sequence")])
def test_head_options_match_reference_fp32(impl, head, reduction, normalize):
    seed = fresh_seed()
    case = make_case(seed, bias=(head == "all"))
    case["hidden"] = case["hidden"] * 3  # logits of a few units: the softcap bends them
    ours, truth, g_ours, g_truth = run_both(case, impl, reduction, normalize, "swift", chunk_bytes=BUDGET,
                                            **HEADS[head])
    assert ours.shape == truth.shape
    assert_close(ours, truth, 1e-5, f"loss ({head})", seed, scale=_scale(case, **HEADS[head]) / 10)
    for name, a, b in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_truth):
        assert_close(a, b, 1e-5, f"{name} ({head})", seed)


@pytest.mark.parametrize("head", list(HEADS))
def test_head_options_exact_in_float64(head):
    seed = fresh_seed()
    case = make_case(seed, N=53, D=11, V=131, B=3, dtype=torch.float64, bias=True)
    case["hidden"] = case["hidden"] * 4
    for reduction in ("mean", "none"):
        ours, truth, g_ours, g_truth = run_both(case, "torch", reduction, "sequence", "refit",
                                                chunk_bytes=3 * 131 * 8, **HEADS[head])
        assert_close(ours, truth, 1e-12, f"loss ({head}, {reduction})", seed)
        for a, b in zip(g_ours, g_truth):
            assert_close(a, b, 1e-12, f"grad ({head}, {reduction})", seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_options_change_the_result(impl):
    """Each option really reaches the kernel: the loss and gradient differ from the plain head's."""
    seed = fresh_seed()
    case = make_case(seed, N=41, D=13, V=97, B=3)
    case["hidden"] = case["hidden"] * 3
    plain, _, (g_plain, *_), _ = run_both(case, impl, "mean", "token", "refit")
    for head, kw in HEADS.items():
        ours, _, (g, *_), _ = run_both(case, impl, "mean", "token", "refit", **kw)
        assert abs(float(ours) - float(plain)) > 1e-4 * abs(float(plain)), head
        assert (g - g_plain).abs().max() > 1e-4 * g_plain.abs().max(), head


@pytest.mark.parametrize("impl", IMPLS)
def test_token_mean_without_seq_ids_is_f_cross_entropy(impl):
    """Without seq_ids, "mean" is the token mean, as F.cross_entropy, Liger and CCE: 2-D and 3-D
    inputs, with label smoothing (PyTorch's own) and a softcap written out by hand."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = 3, 13, 17, 211
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < 0.3] = -100
    y[1] = -100  # an all-ignored row
    for kw, ls, cap in ((dict(), 0.0, None), (dict(label_smoothing=0.2), 0.2, None), (dict(softcap=3.0), 0.0, 3.0)):
        logits = h @ W.T
        if cap:
            logits = cap * torch.tanh(logits / cap)
        truth = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), label_smoothing=ls)
        for hh, yy in ((h, y), (h.reshape(-1, D), y.reshape(-1))):
            ours = weighted_ce(hh.float(), W.float(), yy, impl=impl, **kw)
            assert_close(ours, truth, 1e-5, f"token mean {kw} {tuple(hh.shape)}", seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_shift_is_hf_s_next_token_loss(impl):
    """shift=True on unshifted labels == the loss on logits[:, :-1] and labels[:, 1:] (HF's causal-LM
    loss), and packed with seq_ids it never trains across a conversation boundary."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = 2, 9, 7, 61
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # a prompt
    truth = F.cross_entropy((h[:, :-1] @ W.T).reshape(-1, V), labels[:, 1:].reshape(-1))
    hf, Wf = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    ours = weighted_ce(hf, Wf, labels, shift=True, impl=impl)
    assert_close(ours, truth, 1e-5, "shifted loss", seed)
    g_truth = torch.autograd.grad(truth, (h, W))
    g_ours = torch.autograd.grad(ours, (hf, Wf))
    for a, b in zip(g_ours, g_truth):
        assert_close(a, b, 1e-5, "shifted grad", seed)
    assert g_ours[0][:, -1].abs().max() == 0  # the last position predicts nothing

    # packed: two conversations in one row; position 4 (last of conversation 0) predicts nothing
    seq_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    flat_h, flat_y = hf[0].detach().requires_grad_(), labels[0].clone()
    flat_y[5] = 7  # a trained first token of conversation 1: the boundary must still not train it
    r = torch.tensor([1.0, 0.5])
    ours = weighted_ce(flat_h, Wf, flat_y, seq_ids, r, shift=True, reduction="none", impl=impl)
    ref = weighted_ce_reference(flat_h.double(), Wf.double(), flat_y, seq_ids, r.double(), shift=True,
                                reduction="none")
    assert ours[4] == 0 and ours[8] == 0
    assert_close(ours, ref, 1e-5, "packed shift", seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_denominator_replaces_the_normalizer(impl):
    seed = fresh_seed()
    case = make_case(seed, N=45, D=9, V=77, B=3)
    total = run_both(case, impl, "sum", "sequence", "refit")[0]
    for d in (7, 123.5, torch.tensor(11.0), torch.tensor([3], dtype=torch.int64)):
        ours, truth, g_ours, g_truth = run_both(case, impl, "mean", None, "refit", denominator=d)
        assert_close(ours, total / float(torch.as_tensor(d).reshape(())), 1e-6, f"denominator {d}", seed)
        assert_close(ours, truth, 1e-5, f"denominator {d}", seed)
        for a, b in zip(g_ours, g_truth):
            assert_close(a, b, 1e-5, "denominator grad", seed)


def test_gradient_accumulation_with_num_items_in_batch():
    """Two micro-batches, each divided by the tokens of both (HF's num_items_in_batch), add up to
    the token mean of the whole batch, loss and gradients."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    N, D, V = 40, 8, 50
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.4] = -100
    y[:10] = -100  # micro-batches with different token counts
    whole = weighted_ce(h, W, y)
    gw = torch.autograd.grad(whole, (h, W))
    n_items = (y != -100).sum()
    parts = weighted_ce(h[:20], W, y[:20], denominator=n_items) + weighted_ce(h[20:], W, y[20:], denominator=n_items)
    gp = torch.autograd.grad(parts, (h, W))
    assert torch.allclose(parts, whole, rtol=1e-6)
    for a, b in zip(gp, gw):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_cases_with_head_options(impl):
    """All tokens ignored; one conversation with identical rewards under Swift (weight 0: only the
    z-loss is left, unweighted); huge logits under a softcap stay finite."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    D, V = 6, 29
    W = torch.randn(V, D, generator=g, requires_grad=True)
    h = torch.randn(10, D, generator=g, requires_grad=True)
    kw = HEADS["all"]
    none = torch.full((10,), -100)
    out = weighted_ce(h, W, none, impl=impl, **kw)
    assert float(out) == 0.0
    y = torch.randint(0, V, (10,), generator=g)
    sid = torch.zeros(10, dtype=torch.long)
    swift = weighted_ce(h, W, y, sid, torch.tensor([0.4]), standardize=True, impl=impl, z_loss=0.1, reduction="sum")
    lse = torch.logsumexp(h @ W.T, -1)
    assert torch.allclose(swift, 0.1 * lse.square().sum(), rtol=1e-5)
    zero = weighted_ce(h, W, y, sid, torch.tensor([0.4]), standardize=True, impl=impl)
    assert float(zero) == 0.0
    big = (h * 1e4).detach().requires_grad_()
    capped = weighted_ce(big, W, y, impl=impl, softcap=5.0)
    (gb,) = torch.autograd.grad(capped, (big,))
    assert torch.isfinite(capped) and torch.isfinite(gb).all()
    ref = weighted_ce_reference(big.detach().double(), W.detach().double(), y, softcap=5.0)
    assert_close(capped, ref, 1e-5, "huge logits under softcap", seed)


@pytest.mark.parametrize("call,match", [
    (lambda a: weighted_ce(*a, softcap=0.0), "softcap must be"),
    (lambda a: weighted_ce(*a, softcap=-2.0), "softcap must be"),
    (lambda a: weighted_ce(*a, softcap=float("nan")), "softcap must be"),
    (lambda a: weighted_ce(*a, logit_scale=0), "logit_scale must be"),
    (lambda a: weighted_ce(*a, z_loss=-1e-4), "z_loss must be"),
    (lambda a: weighted_ce(*a, label_smoothing=1.5), "label_smoothing must be"),
    (lambda a: weighted_ce(*a, label_smoothing="0.1"), "label_smoothing must be"),
    (lambda a: weighted_ce(*a, denominator=0), "denominator must be"),
    (lambda a: weighted_ce(*a, denominator=float("inf")), "denominator must be"),
    (lambda a: weighted_ce(*a, denominator=torch.tensor(-3.0)), "denominator must be"),
    (lambda a: weighted_ce(*a, denominator=torch.ones(2)), "denominator must be one number"),
    (lambda a: weighted_ce(*a, denominator=4, reduction="sum"), "denominator is the normalizer"),
    (lambda a: weighted_ce(*a, denominator=4, normalize="token"), "not both"),
    (lambda a: weighted_ce(*a, shift="yes"), "shift and validate"),
    (lambda a: weighted_ce(*a, validate=None), "shift and validate"),
])
def test_bad_options_are_refused(call, match):
    args = (torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, -100, 4]))
    with pytest.raises(ValueError, match=match):
        call(args)


@pytest.mark.parametrize("impl", IMPLS)
def test_validate_false_skips_only_the_checks(impl):
    seed = fresh_seed()
    case = make_case(seed, N=39, D=7, V=83, B=3)
    results = []
    for validate in (True, False):
        h, W = (case[k].float().requires_grad_() for k in ("hidden", "weight"))
        loss = weighted_ce(h, W, case["labels"], case["seq_ids"], case["rewards"].float(), standardize="group",
                           groups=torch.tensor([0, 1, 1]), validate=validate, impl=impl)
        results.append((loss, *torch.autograd.grad(loss, (h, W))))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    h, W = torch.randn(3, 4), torch.randn(6, 4)
    bad = torch.tensor([0, 9, 1])  # label 9 outside V = 6
    with pytest.raises(ValueError, match="outside"):
        weighted_ce(h, W, bad, impl=impl)
    sid = torch.tensor([0, 0, 5])  # a seq_id past len(rewards): refused only when validating
    with pytest.raises(ValueError, match="seq_ids value"):
        weighted_ce(h, W, torch.tensor([0, 1, 2]), sid, torch.ones(2), impl=impl)
    with pytest.raises(ValueError, match="shape"):  # shapes are checked either way
        weighted_ce(h, W, torch.tensor([0, 1]), validate=False, impl=impl)


def test_module_takes_the_new_options():
    seed = fresh_seed()
    case = make_case(seed, N=31, D=5, V=47, B=2)
    h, W = case["hidden"].float(), case["weight"].float()
    mod = WeightedCELoss(standardize=True, softcap=3.0, z_loss=1e-3, label_smoothing=0.1, chunk_bytes=4096)
    args = (h, W, case["labels"], case["seq_ids"], case["rewards"].float())
    assert torch.allclose(mod(*args, denominator=5.0),
                          weighted_ce(*args, standardize=True, softcap=3.0, z_loss=1e-3, label_smoothing=0.1,
                                      denominator=5.0))
    assert "softcap=3.0" in repr(mod)


# ---- torch.compile ---------------------------------------------------------------------------
def _compile_case(seed, reduction):
    g = torch.Generator().manual_seed(seed)
    N, D, V, B = 43, 10, 71, 4
    h = torch.randn(N, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    sid = torch.sort(torch.randint(0, B, (N,), generator=g)).values
    r, groups = torch.rand(B, generator=g), torch.tensor([0, 0, 1, 1])

    def step(h, W, b, y, sid, r):
        out = weighted_ce(h, W, y, sid, r, bias=b, standardize="group", groups=groups, shift=True, softcap=3.0,
                          z_loss=1e-3, label_smoothing=0.1, reduction=reduction,
                          denominator=torch.tensor(9.0) if reduction == "mean" else None)
        return out.sum() * 2 if reduction == "none" else out * 2

    return step, (h, W, b, y, sid, r)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiles_fullgraph(reduction):
    """fullgraph=True (no graph break: the checks' host read and the data-dependent token count are
    inside one custom op), the same loss and gradients as eager; aot_eager traces the backward."""
    seed = fresh_seed()
    step, args = _compile_case(seed, reduction)
    leaves = args[:3]
    eager = step(*args)
    g_eager = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    g_out = torch.autograd.grad(out, leaves)
    assert torch.allclose(out, eager, rtol=1e-6)
    for a, b in zip(g_out, g_eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    explain = torch._dynamo.explain(step)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compiled_errors_name_the_argument():
    torch._dynamo.reset()
    f = torch.compile(lambda h, W, y: weighted_ce(h, W, y), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="outside"):
        f(torch.randn(3, 4), torch.randn(6, 4), torch.tensor([0, 9, 1]))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiles_with_inductor():
    """The default backend: the whole training step of a tiny model compiled around weighted_ce."""
    seed = fresh_seed()
    step, args = _compile_case(seed, "mean")
    eager = step(*args)
    g_eager = torch.autograd.grad(eager, args[:3])
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(*args)
    g_out = torch.autograd.grad(out, args[:3])
    assert torch.allclose(out, eager, rtol=1e-6)
    for a, b in zip(g_out, g_eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_module_compiles_fullgraph_with_its_own_budget():
    seed = fresh_seed()
    step, (h, W, b, y, sid, r) = _compile_case(seed, "mean")
    mod = WeightedCELoss(standardize=True, softcap=3.0, label_smoothing=0.1, chunk_bytes=4 * 71 * 4)
    eager = mod(h, W, y, sid, r, bias=b)
    g_eager = torch.autograd.grad(eager, (h, W, b))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: mod(*a[:5], bias=a[5]), fullgraph=True, backend="aot_eager")
    out = compiled(h, W, y, sid, r, b)
    g_out = torch.autograd.grad(out, (h, W, b))
    assert torch.allclose(out, eager, rtol=1e-6)
    for x, z in zip(g_out, g_eager):
        assert torch.allclose(x, z, rtol=1e-5, atol=1e-7)
