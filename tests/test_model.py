"""The model body on packed rows: packing must change nothing.

A packed row of several conversations (plus a padding tail) must give, token for token, the same
log-probs and the same parameter gradients as each conversation run alone through the unmodified model.
Checked for every attention backend this machine has, on tiny Llama and Qwen2 models with GQA.
"""
import pytest
import torch

# transformers 5.x renames gradient_checkpointing_enable; the old name is what many users call, so test it.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

from refit_fast.model import (
    ATTN_IMPLEMENTATION,
    BACKENDS,
    BackendUnavailableError,
    PackedAttentionMeta,
    PreparedAttention,
    attention_backend,
    available_backends,
    block_causal_mask,
    build_model_from_config,
    check_backend_name,
    concat_cu_seqlens,
    enable_checkpointing,
    load_model,
    output_embedding,
    packed_hidden_states,
    prepare_model,
    resolve_backend,
    tiny_config,
    unprepare_model,
    varlen_attention_forward,
)
from refit_fast.model import attention as attn_mod
from refit_fast.model import body as body_mod

LENGTHS = [7, 13, 5, 11]  # odd lengths, so no segment lines up with anything
PAD = 3
ATOL = 1e-5
CUDA = torch.cuda.is_available()


def make_row(lengths=LENGTHS, pad=PAD, vocab=128, seed=0, device="cpu"):
    """A packed row like the packer's: input_ids, restarting position_ids, int32 cu_seqlens, max_seqlen."""
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    segs = lengths + ([pad] if pad else [])
    ids = torch.cat(convs + ([torch.zeros(pad, dtype=torch.long)] if pad else []))
    pos = torch.cat([torch.arange(n) for n in segs])
    cu = torch.tensor([0] + segs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return convs, ids.to(device), pos.to(device), cu.to(device), max(segs)


def make_model(model_type, tied=False, **kw):
    return build_model_from_config(tiny_config(model_type, tie_word_embeddings=tied), attn_backend=None, **kw)


def logprobs(hidden, model):
    """Per-token log-probs [N, V] from hidden states and the output embedding (only in tests: builds logits)."""
    weight, bias = output_embedding(model)
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits, dim=-1)


def reference_logprobs(model, convs):
    """Each conversation alone through the unmodified HF model."""
    out = []
    for c in convs:
        logits = model(input_ids=c[None].to(model.device), use_cache=False).logits[0]
        out.append(torch.log_softmax(logits.float(), dim=-1))
    return out


def next_token_loss(lp, tokens):
    """-sum log p(token t+1 | ..t) over one conversation."""
    return -lp[:-1].gather(1, tokens[1:, None].to(lp.device)).sum()


# Backends reachable through prepare_model on this machine, plus HF's own paths as a cross-check
# (ENV-NOTES: eager/sdpa keep packed conversations apart only with use_cache=False and no mask).
OURS = ["auto"] + [b for b in ("flash", "torch_varlen", "sdpa") if b in available_backends("cpu")]
HF_CROSSCHECK = ["eager", "sdpa"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", OURS)
@pytest.mark.parametrize("tied", [False, True])
def test_packed_equals_separate_logprobs_and_grads(model_type, backend, tied):
    convs, ids, pos, cu, max_len = make_row()
    model = make_model(model_type, tied=tied)
    model.train()  # dropout is 0 in these configs; train mode must not change the masking

    ref = reference_logprobs(model, convs)
    ref_loss = sum(next_token_loss(lp, c) for lp, c in zip(ref, convs))
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    prepare_model(model, backend)
    hidden = packed_hidden_states(model, ids, pos, cu, max_len)
    assert hidden.shape == (ids.numel(), model.config.hidden_size)
    lp = logprobs(hidden, model)
    loss = 0
    for i, c in enumerate(convs):
        seg = lp[int(cu[i]): int(cu[i + 1])]
        torch.testing.assert_close(seg, ref[i], atol=ATOL, rtol=0)
        loss = loss + next_token_loss(seg, c)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=ATOL, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=ATOL, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    if tied:
        assert output_embedding(model)[0] is model.get_input_embeddings().weight


@pytest.mark.parametrize("impl", HF_CROSSCHECK)
def test_hf_default_attention_with_restarting_positions_agrees(impl):
    """Cross-check: HF's own eager/sdpa detect packing from restarting position_ids (use_cache=False)."""
    convs, ids, pos, cu, max_len = make_row()
    model = make_model("qwen2")
    model.set_attn_implementation(impl)
    ref = reference_logprobs(model, convs)
    hidden = model.model(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state[0]
    lp = logprobs(hidden, model)
    for i in range(len(convs)):
        torch.testing.assert_close(lp[int(cu[i]): int(cu[i + 1])], ref[i], atol=ATOL, rtol=0)
    # ...and our path gives the same hidden states.
    prepare_model(model, "sdpa")
    torch.testing.assert_close(packed_hidden_states(model, ids, pos, cu, max_len), hidden, atol=ATOL, rtol=0)


def test_gradient_checkpointing_matches_and_builds_mask_once(monkeypatch):
    convs, ids, pos, cu, max_len = make_row()
    model = build_model_from_config(tiny_config("llama", num_hidden_layers=3), attn_backend="sdpa")
    model.train()
    weight, _ = output_embedding(model)

    def run():
        model.zero_grad(set_to_none=True)
        h = packed_hidden_states(model, ids, pos, cu, max_len)
        (h.square().mean() + logprobs(h, model)[:, 0].sum()).backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    h0, g0 = run()
    calls = []
    real = attn_mod.block_causal_mask
    monkeypatch.setattr(attn_mod, "block_causal_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    h1, g1 = run()
    # 3 layers, forward + checkpoint recomputation: still one mask.
    assert len(calls) == 1
    torch.testing.assert_close(h1, h0, atol=ATOL, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=ATOL, rtol=1e-4)
    for kwargs in ({"use_reentrant": True}, None):  # None: the library default
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        h2, g2 = run()
        for n in g0:
            torch.testing.assert_close(g2[n], g0[n], atol=ATOL, rtol=1e-4)


def test_load_model_from_local_directory(tmp_path):
    """The trainer's path: a saved checkpoint directory, loaded offline and prepared."""
    _, ids, pos, cu, max_len = make_row()
    model = build_model_from_config(tiny_config("qwen2", tie_word_embeddings=True), attn_backend="sdpa")
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), attn_backend="sdpa", local_files_only=True)
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    assert output_embedding(loaded)[0] is loaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(
            packed_hidden_states(loaded, ids, pos, cu, max_len), packed_hidden_states(model, ids, pos, cu, max_len)
        )


def test_lm_head_never_runs():
    _, ids, pos, cu, max_len = make_row()
    model = build_model_from_config(tiny_config("llama"))
    model.lm_head.register_forward_hook(lambda *a: pytest.fail("lm_head ran: logits were built"))
    packed_hidden_states(model, ids, pos, cu, max_len).sum().backward()


@pytest.mark.parametrize("backend", OURS)
def test_mask_separates_conversations(backend):
    """Changing conversation 1's tokens changes its hidden states and nothing else's."""
    convs, ids, pos, cu, max_len = make_row()
    model = build_model_from_config(tiny_config("qwen2"), attn_backend=backend)
    with torch.no_grad():
        h = packed_hidden_states(model, ids, pos, cu, max_len)
        ids2 = ids.clone()
        a, b = int(cu[1]), int(cu[2])
        ids2[a:b] = (ids2[a:b] + 17) % model.config.vocab_size
        h2 = packed_hidden_states(model, ids2, pos, cu, max_len)
    changed = (h2 - h).abs().amax(-1) > 1e-6
    assert changed[a:b].all()
    assert not changed[:a].any() and not changed[b:].any()


def test_batch_of_rows_equals_rows_one_by_one():
    model = build_model_from_config(tiny_config("llama"), attn_backend="sdpa")
    _, ids_a, pos_a, cu_a, m_a = make_row([7, 13, 5, 11], pad=3, seed=1)
    _, ids_b, pos_b, cu_b, m_b = make_row([20, 19], pad=0, seed=2)
    t = ids_a.numel()
    assert ids_b.numel() == t
    with torch.no_grad():
        h = packed_hidden_states(
            model, torch.stack([ids_a, ids_b]), torch.stack([pos_a, pos_b]), concat_cu_seqlens([cu_a, cu_b], t)
        )
        ha = packed_hidden_states(model, ids_a, pos_a, cu_a, m_a)
        hb = packed_hidden_states(model, ids_b, pos_b, cu_b, m_b)
    torch.testing.assert_close(h, torch.cat([ha, hb]), atol=ATOL, rtol=0)


def test_block_causal_mask_and_sliding_window():
    m = block_causal_mask(torch.tensor([0, 3, 5], dtype=torch.int32), 1, 5)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    w = block_causal_mask(torch.tensor([0, 5], dtype=torch.int32), 1, 5, sliding_window=2)[0, 0]
    assert w.sum(-1).tolist() == [1, 2, 2, 2, 2]


def test_qwen2_sliding_window_layers_match_separate_runs():
    convs, ids, pos, cu, max_len = make_row()
    cfg = tiny_config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = build_model_from_config(cfg, attn_backend=None)
    assert any(getattr(l.self_attn, "sliding_window", None) for l in model.model.layers)
    ref = reference_logprobs(model, convs)
    prepare_model(model, "sdpa")
    with torch.no_grad():
        lp = logprobs(packed_hidden_states(model, ids, pos, cu, max_len), model)
    for i in range(len(convs)):
        torch.testing.assert_close(lp[int(cu[i]): int(cu[i + 1])], ref[i], atol=ATOL, rtol=0)


def test_gqa_enable_gqa_equals_repeated_kv():
    """The CPU SDPA path uses enable_gqa; the CUDA one repeats k/v: both are the same attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=0.3, cu_seqlens=cu, max_seqlen=5)
    rep = lambda x: x.repeat_interleave(2, dim=1)  # noqa: E731
    out2, _ = varlen_attention_forward(None, q, rep(k), rep(v), None, scaling=0.3, cu_seqlens=cu, max_seqlen=5)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=0)
    # Segment by segment against plain causal attention.
    for a, b in [(0, 4), (4, 9)]:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], rep(k)[:, :, a:b], rep(v)[:, :, a:b], is_causal=True, scale=0.3
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, a:b], ref, atol=1e-6, rtol=0)


def test_forced_unavailable_backend_raises_clearly():
    model = build_model_from_config(tiny_config("llama"), attn_backend=None)
    with pytest.raises(ValueError, match="unknown attention backend"):
        prepare_model(model, "xformers")
    if attn_mod._flash_varlen_func() is None:
        with pytest.raises(BackendUnavailableError, match="flash-attn is not installed"):
            prepare_model(model, "flash")
    if not CUDA:
        with pytest.raises(BackendUnavailableError, match="CUDA only"):
            resolve_backend("torch_varlen", "cpu")
        if attn_mod._torch_varlen_func() is not None:
            # Installed but no CPU kernel: prepare accepts it, the forward says why it cannot run.
            prepare_model(model, "torch_varlen")
            _, ids, pos, cu, max_len = make_row()
            with pytest.raises(BackendUnavailableError, match="torch_varlen.*CUDA only"):
                packed_hidden_states(model, ids, pos, cu, max_len)


def test_backend_names_are_checked_by_one_function_naming_the_argument():
    assert [check_backend_name(b) for b in BACKENDS] == ["auto", "flash", "torch_varlen", "sdpa"]
    for bad in ("xformers", "SDPA", "", None, 3):
        with pytest.raises(ValueError, match="model.attn_backend: unknown attention backend"):
            check_backend_name(bad, "model.attn_backend")
    model = build_model_from_config(tiny_config("llama"), attn_backend=None)
    with pytest.raises(ValueError, match="^attn_backend: unknown attention backend 'xformers'"):
        prepare_model(model, "xformers")
    with pytest.raises(ValueError, match="^backend: unknown attention backend"):
        resolve_backend("xformers", "cpu")
    prepare_model(model, "sdpa")
    _, ids, pos, cu, max_len = make_row()
    with pytest.raises(ValueError, match="^backend: unknown attention backend 'eager'"):
        packed_hidden_states(model, ids, pos, cu, max_len, backend="eager")
    # Without a device only the name and the installation are checked: "auto" stays "auto".
    assert resolve_backend("auto") == "auto" and resolve_backend("sdpa") == "sdpa"
    if attn_mod._flash_varlen_func() is None:
        with pytest.raises(BackendUnavailableError, match="flash-attn is not installed.*Use attn_backend='auto'"):
            resolve_backend("flash")


def test_prepare_records_the_backend_in_one_documented_place():
    model = build_model_from_config(tiny_config("llama"), attn_backend=None)
    assert attention_backend(model) is None
    original = model.config._attn_implementation
    prepare_model(model, "sdpa")
    assert model.refit_attention == PreparedAttention("sdpa", previous=original)
    assert attention_backend(model) == "sdpa"
    prepare_model(model, "auto")  # again: the backend changes, the implementation to restore does not
    assert model.refit_attention == PreparedAttention("auto", previous=original)
    assert unprepare_model(model).config._attn_implementation == original
    assert attention_backend(model) is None
    # A model switched to refit_varlen by hand has no record: packed rows then use "auto".
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _, ids, pos, cu, max_len = make_row()
    assert packed_hidden_states(model, ids, pos, cu, max_len).shape == (ids.numel(), model.config.hidden_size)
    assert attention_backend(prepare_model(model, "sdpa")) == "sdpa" and model.refit_attention.previous is None


def test_forward_reads_the_recorded_backend_and_resolves_it_once(monkeypatch):
    """No per-forward re-check in the body; one kernel choice per forward, shared by all 3 layers."""
    model = build_model_from_config(tiny_config("llama", num_hidden_layers=3), attn_backend="auto")
    calls = []
    real = attn_mod.resolve_backend

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "resolve_backend", counting)
    monkeypatch.setattr(body_mod, "resolve_backend", counting)
    _, ids, pos, cu, max_len = make_row()
    packed_hidden_states(model, ids, pos, cu, max_len)
    assert [a[0] for a in calls] == ["auto"] and calls[0][1] == ids.device
    model.refit_attention = PreparedAttention("sdpa")  # the forward reads this and nothing else
    calls.clear()
    packed_hidden_states(model, ids, pos, cu, max_len)
    assert [a[0] for a in calls] == ["sdpa"]


def test_raw_packing_kwargs_build_their_metadata_per_call():
    """The raw cu_seqlens/max_seqlen path keeps no module-level cache (the dead _RAW_CACHE is gone)."""
    assert not hasattr(attn_mod, "_RAW_CACHE") and not hasattr(attn_mod, "_meta_from_raw")
    q = k = v = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = varlen_attention_forward(None, q, k, v, None, cu_seqlens=cu, max_seqlen=4, refit_backend="sdpa")
    cu[1] = 3  # changed in place: the next call must see the new boundaries
    out2, _ = varlen_attention_forward(None, q, k, v, None, cu_seqlens=cu, max_seqlen=4, refit_backend="sdpa")
    assert torch.equal(out[:, :2], out2[:, :2]) and not torch.equal(out[:, 2], out2[:, 2])
    with pytest.raises(ValueError, match="refit_backend: unknown|backend: unknown"):
        varlen_attention_forward(None, q, k, v, None, cu_seqlens=cu, refit_backend="nope")


def test_bad_packing_metadata_raises():
    model = build_model_from_config(tiny_config("llama"))
    _, ids, pos, cu, max_len = make_row()
    with pytest.raises(ValueError, match="end at the number of tokens"):
        packed_hidden_states(model, ids, pos, cu[:-1], max_len)
    with pytest.raises(ValueError, match="max_seqlen"):
        packed_hidden_states(model, ids, pos, cu, 2)
    with pytest.raises(ValueError, match="row boundary"):
        PackedAttentionMeta.build(torch.tensor([0, 3, 10]), None, batch=2, seqlen=5)
    with pytest.raises(RuntimeError, match="prepare_model"):
        packed_hidden_states(unprepare_model(model), ids, pos, cu, max_len)


def test_unpacked_call_falls_back_to_plain_causal_attention():
    """Without packing kwargs the implementation behaves like HF sdpa (e.g. for generate)."""
    model = build_model_from_config(tiny_config("llama"), attn_backend=None)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        prepare_model(model)
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=ATOL, rtol=0)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 13)


def _fake_half_varlen(monkeypatch):
    """CPU stand-in for CUDA's choice: 'auto' sees a varlen kernel for fp16/bf16 only (as on a GPU), and
    the kernel actually run is recorded (the fake computes with the real SDPA path)."""
    calls = {"torch_varlen": [], "sdpa": []}
    real_sdpa = attn_mod._sdpa

    def available(device="cpu", dtype=torch.float32):
        return (["torch_varlen"] if dtype in (torch.float16, torch.bfloat16) else []) + ["sdpa"]

    def fake_varlen(q, k, v, meta, scaling, dropout, sliding_window):
        calls["torch_varlen"].append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, meta, scaling, dropout, sliding_window)

    def sdpa(q, k, v, *args):
        calls["sdpa"].append((q.dtype, k.dtype, v.dtype))
        return real_sdpa(q, k, v, *args)

    monkeypatch.setattr(attn_mod, "available_backends", available)
    monkeypatch.setattr(attn_mod, "_torch_varlen", fake_varlen)
    monkeypatch.setattr(attn_mod, "_sdpa", sdpa)
    return calls


def test_autocast_picks_the_kernel_for_the_autocast_dtype(monkeypatch):
    """#14: under bf16 autocast HF's RoPE hands attention fp32 q/k beside a bf16 v; choosing from q's fp32
    picked SDPA with its O(T^2) mask on the GPU. q/k/v are now cast to the autocast dtype first."""
    calls = _fake_half_varlen(monkeypatch)
    seen = []
    real_cast = attn_mod.autocast_inputs
    monkeypatch.setattr(attn_mod, "autocast_inputs", lambda *t: seen.append([x.dtype for x in t]) or real_cast(*t))
    model = build_model_from_config(tiny_config("llama", num_hidden_layers=2), attn_backend="auto")  # fp32
    _, ids, pos, cu, max_len = make_row()
    h32 = packed_hidden_states(model, ids, pos, cu, max_len)
    assert calls == {"torch_varlen": [], "sdpa": [(torch.float32,) * 3] * 2}  # fp32 without autocast: SDPA
    calls["sdpa"].clear()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = packed_hidden_states(model, ids, pos, cu, max_len)
    assert torch.float32 in seen[0] and torch.bfloat16 in seen[0]  # what HF hands over: mixed dtypes
    assert calls == {"torch_varlen": [(torch.bfloat16,) * 3] * 2, "sdpa": []}
    torch.testing.assert_close(h.float(), h32, atol=0.1, rtol=0.05)


def test_autocast_inputs_follow_autocast_only():
    q, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    d = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    assert all(a is b for a, b in zip(attn_mod.autocast_inputs(q, v, d), (q, v, d)))  # autocast off: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in attn_mod.autocast_inputs(q, v, d)] == [torch.bfloat16, torch.bfloat16, torch.float64]
        assert attn_mod.autocast_dtype("cuda") is None  # autocast is per device type
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert attn_mod.autocast_inputs(q)[0] is q
    assert attn_mod.autocast_dtype("meta") is None


# ---------------------------------------------------------------------------------------------------
# CUDA only: the varlen kernels against the SDPA block-diagonal path, bf16.
# ---------------------------------------------------------------------------------------------------
CUDA_BACKENDS = ["flash", "torch_varlen"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_varlen_backend_matches_sdpa(model_type, backend):
    if backend not in available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available here")
    convs, ids, pos, cu, max_len = make_row(device="cuda")
    # head_dim 64 so every flash kernel accepts it.
    cfg = tiny_config(model_type, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = build_model_from_config(cfg, dtype=torch.bfloat16, device="cuda", attn_backend="sdpa")

    def run(b):
        model.zero_grad(set_to_none=True)
        h = packed_hidden_states(model, ids, pos, cu, max_len, backend=b)
        lp = logprobs(h, model)
        loss = sum(next_token_loss(lp[int(cu[i]): int(cu[i + 1])], c) for i, c in enumerate(convs))
        loss.backward()
        return lp.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    lp_ref, g_ref = run("sdpa")
    lp, g = run(backend)
    n_real = int(cu[len(convs)])
    torch.testing.assert_close(lp[:n_real], lp_ref[:n_real], atol=1e-2, rtol=1e-2)
    for n in g_ref:
        scale = g_ref[n].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(g[n] / scale, g_ref[n] / scale, atol=2e-2, rtol=0, msg=lambda m: f"{n}: {m}")
    assert resolve_backend("auto", "cuda", torch.bfloat16) in ("flash", "torch_varlen")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_auto_fp32_uses_sdpa_and_matches_separate_runs():
    convs, ids, pos, cu, max_len = make_row(device="cuda")
    model = build_model_from_config(tiny_config("llama"), device="cuda", attn_backend=None)
    ref = reference_logprobs(model, convs)
    prepare_model(model, "auto")
    with torch.no_grad():
        lp = logprobs(packed_hidden_states(model, ids, pos, cu, max_len), model)
    for i in range(len(convs)):
        torch.testing.assert_close(lp[int(cu[i]): int(cu[i + 1])], ref[i], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_autocast_fp32_model_runs_a_varlen_kernel(monkeypatch):
    """The trainer's case: fp32 weights under bf16 autocast must reach flash / torch_varlen, not the mask."""
    if available_backends("cuda", torch.bfloat16)[0] == "sdpa":
        pytest.skip("no varlen kernel on this GPU install")
    chosen = []
    real = attn_mod.resolve_backend
    monkeypatch.setattr(attn_mod, "resolve_backend", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    convs, ids, pos, cu, max_len = make_row(device="cuda")
    cfg = tiny_config("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = build_model_from_config(cfg, device="cuda", attn_backend="auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = packed_hidden_states(model, ids, pos, cu, max_len)
        ref = packed_hidden_states(model, ids, pos, cu, max_len, backend="sdpa")
    assert chosen[0] in ("flash", "torch_varlen"), chosen
    n_real = int(cu[len(convs)])
    torch.testing.assert_close(h[:n_real].float(), ref[:n_real].float(), atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------------
# The CPU SDPA path attends block by block (#15 item 5): exact in float64 against each conversation
# alone, outputs and gradients; no T x T mask; masks only for blocks of short conversations / windows.
# ---------------------------------------------------------------------------------------------------
# Long ones alone, runs of tiny ones merged (one run longer than BLOCK_TOKENS, so it splits), an empty
# segment, a padding tail of 3.
MIXED = [40, 3, 9, 0, 2, 30, 17, 5, 15, 15, 15, 15, 15, 1]


def plain_attention(q, k, v, scale, window=None):
    """Causal softmax attention written out, one conversation [H, L, D] (k/v [H_kv, L, D])."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    n = q.shape[1]
    i = torch.arange(n)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def _qkv64(total, hq=4, hkv=2, d=8, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(batch, h, total, d, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(hq), mk(hkv), mk(hkv)


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def _grads_of(out, upstream, *inputs):
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("kernel", ["blocks", "blocks_repeat_kv", "dense"])
def test_cpu_sdpa_equals_each_conversation_alone_float64(kernel, window):
    lengths = MIXED
    total = sum(lengths)
    q, k, v = _qkv64(total)
    meta = PackedAttentionMeta.build(_cu(lengths), None, batch=1, seqlen=total, backend="sdpa")
    fn = {"blocks": attn_mod._sdpa_blocks, "dense": attn_mod._sdpa_dense,
          "blocks_repeat_kv": lambda *a: attn_mod._sdpa_blocks(*a, enable_gqa=False)}[kernel]
    out = fn(q, k, v, meta, 0.3, 0.0, window)  # [1, T, H, D]
    assert out.shape == (1, total, 4, 8)
    up = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gq, gk, gv = _grads_of(out, up, q, k, v)
    ref, c = [], 0
    for n in lengths:
        ref.append(plain_attention(q[0, :, c:c + n], k[0, :, c:c + n], v[0, :, c:c + n], 0.3, window))
        c += n
    ref = torch.cat(ref, 1).transpose(0, 1)[None]  # [1, T, H, D]
    rq, rk, rv = _grads_of(ref, up, q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for g, r in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def test_cpu_sdpa_rows_cut_segments_at_row_boundaries_float64():
    """Two rows; without validation a segment may run over the row boundary: each row attends alone,
    as the [B, 1, T, T] mask did."""
    seqlen = 50
    cu = torch.tensor([0, 7, 41, 62, 100], dtype=torch.int32)  # 41..62 crosses the boundary at 50
    q, k, v = _qkv64(seqlen, batch=2)
    meta = PackedAttentionMeta.build(cu, None, batch=2, seqlen=seqlen, backend="sdpa", validate=False)
    assert attn_mod.row_segments(meta.cu_seqlens, 2, seqlen) == [[7, 34, 9], [12, 38]]
    out = attn_mod._sdpa_blocks(q, k, v, meta, None, 0.0, None)
    dense = attn_mod._sdpa_dense(q, k, v, meta, None, 0.0, None)
    up = torch.randn(out.shape, dtype=torch.float64)
    torch.testing.assert_close(out, dense, atol=1e-12, rtol=0)
    for g, r in zip(_grads_of(out, up, q, k, v), _grads_of(dense, up, q, k, v)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)
    ref = plain_attention(q[1, :, 0:12], k[1, :, 0:12], v[1, :, 0:12], 8 ** -0.5)
    torch.testing.assert_close(out[1, :12], ref.transpose(0, 1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_model_float64_equals_each_conversation_alone(model_type):
    """Whole model in float64 on the CPU path, long and tiny conversations mixed: log-probs and every
    parameter gradient equal the unmodified HF model run on each conversation alone."""
    lengths = [40, 3, 9, 2, 30, 17, 5, 1]
    convs, ids, pos, cu, max_len = make_row(lengths, pad=4)
    model = make_model(model_type, dtype=torch.float64)
    # HF's own attention on each conversation alone (reference_logprobs would cast to fp32).
    ref_lp = [torch.log_softmax(model(input_ids=c[None], use_cache=False).logits[0], -1) for c in convs]
    assert ref_lp[0].dtype == torch.float64
    ref_loss = sum(next_token_loss(lp, c) for lp, c in zip(ref_lp, convs))
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    prepare_model(model, "sdpa")
    hidden = packed_hidden_states(model, ids, pos, cu, max_len)
    weight, _ = output_embedding(model)
    lp = torch.log_softmax(hidden @ weight.t(), -1)  # float64 throughout (logprobs() would cast to fp32)
    loss = 0
    for i, c in enumerate(convs):
        seg = lp[int(cu[i]): int(cu[i + 1])]
        torch.testing.assert_close(seg, ref_lp[i], atol=1e-10, rtol=0)
        loss = loss + next_token_loss(seg, c)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-10, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-10, rtol=1e-9, msg=lambda m: f"{n}: {m}")


def test_group_segments_rule():
    g = attn_mod.group_segments
    assert g([]) == [] and g([0, 0]) == []
    assert g([16, 15, 15, 16]) == [[16], [15, 15], [16]]  # 16 = SMALL_SEGMENT: alone
    assert g([15] * 5) == [[15, 15, 15, 15], [15]]  # 60 tokens fit BLOCK_TOKENS=64, 75 do not
    assert g([1] * 64 + [1]) == [[1] * 64, [1]]
    assert g([5, 100, 5]) == [[5], [100], [5]]  # a long conversation ends a block
    assert g([5, 0, 5]) == [[5, 5]]
    assert (attn_mod.SMALL_SEGMENT, attn_mod.BLOCK_TOKENS) == (16, 64)  # the measured rule (NOTES.md)
    # Every token lands in exactly one block, in order.
    lengths = MIXED
    assert [n for grp in g(lengths) for n in grp] == [n for n in lengths if n]


def test_cpu_path_builds_no_row_mask_and_block_masks_once_per_forward(monkeypatch):
    built = []
    real = attn_mod.block_causal_mask
    monkeypatch.setattr(attn_mod, "block_causal_mask", lambda cu, b, t, w=None: built.append(t) or real(cu, b, t, w))
    model = build_model_from_config(tiny_config("llama", num_hidden_layers=3), attn_backend="sdpa")
    enable_checkpointing(model)
    model.train()
    # Long conversations only: plain causal SDPA per conversation, no mask tensor at all.
    _, ids, pos, cu, max_len = make_row([40, 30, 17], pad=20)
    packed_hidden_states(model, ids, pos, cu, max_len).sum().backward()
    assert built == []
    # Short ones in blocks: one small mask per multi-conversation block, shared by 3 layers and recomputation.
    _, ids, pos, cu, max_len = make_row([40, 3, 9, 2, 30, 15, 15, 15, 15, 15], pad=0)
    packed_hidden_states(model, ids, pos, cu, max_len).sum().backward()
    assert built == [14, 60]  # [3, 9, 2] and four 15s; the fifth 15 attends alone
    # A sliding window longer conversations exceed gets a windowed mask of their own length instead.
    built.clear()
    meta = PackedAttentionMeta.build(cu, None, batch=1, seqlen=int(cu[-1]), backend="sdpa")
    sizes, masks = meta.blocks(sliding_window=20)[0]
    assert sizes == [40, 14, 30, 60, 15] and built == [40, 14, 30, 60]
    assert masks[0].sum(-1).max() == 20 and masks[-1] is None
    assert meta.blocks(sliding_window=20)[0][1] is masks and len(built) == 4  # cached
