"""refit_fast inside Hugging Face transformers: a patched stock causal LM gives its own loss and
gradients (float64), takes rewards, and refuses heads weighted_ce cannot reproduce."""
import pytest
import torch
import transformers

from refit_fast.integrations.hf import UnsupportedHeadError, is_patched, patch_causal_lm, unpatch_causal_lm
from refit_fast.ops.reference import weighted_ce_reference

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0)
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3_text", "phi3", "olmo2"]
# heads with a logit transform the config declares, computed in weighted_ce's kernel (small values so
# that the transform bites on a tiny random model's logits)
HEADS = {"gemma2": {"final_logit_softcapping": 0.5}, "cohere": {"logit_scale": 0.25},
         "granite": {"logits_scaling": 0.3}}


def tiny_model(model_type, seed=0, **over):
    torch.manual_seed(seed)
    conf = transformers.AutoConfig.for_model(model_type, **{**TINY, **over})
    conf._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(conf).double()


def batch(seed=1, B=3, T=11, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[mask == 0] = -100
    labels[2, 5] = -100  # a hole inside the reply
    return ids, mask, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_loss_and_grads(model, input_ids, attention_mask, labels, num_items_in_batch=None):
    """The unpatched model's logits, Hugging Face's shifted token-mean loss written out in float64 (its
    own loss upcasts to float32 only, which is less exact than the float64 both sides run in here)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    loss = nll / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", FAMILIES + list(HEADS))
def test_patched_model_gives_its_own_loss_and_gradients(model_type):
    model = tiny_model(model_type, **HEADS.get(model_type, {}))
    ids, mask, labels = batch()
    ref, ref_grads = reference_loss_and_grads(model, ids, mask, labels)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # its own loss, in float32
    torch.testing.assert_close(hf.double(), ref, rtol=1e-6, atol=1e-7)
    patch_causal_lm(model, impl="torch")
    assert is_patched(model)
    got, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-8, atol=1e-11, msg=lambda m: f"{n}: {m}")
    # gradient accumulation: the caller's normalizer (transformers.Trainer's num_items_in_batch)
    got, _ = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=100)
    ref, _ = reference_loss_and_grads(unpatch_causal_lm(model), ids, mask, labels, num_items_in_batch=100)
    torch.testing.assert_close(got.loss, ref, rtol=1e-10, atol=1e-12)
    # without labels the model's own forward: logits, as generation needs
    assert not is_patched(model) and patch_causal_lm(model)(input_ids=ids).logits.shape == (*ids.shape, 97)


def test_rewards_weight_each_sequence_by_the_plain_reference():
    model = patch_causal_lm(tiny_model("qwen2"), impl="torch")
    ids, mask, labels = batch(seed=4)
    rewards = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, rewards=rewards)
    hidden = unpatch_causal_lm(model).model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    seq = torch.arange(3)[:, None].expand(3, ids.shape[1])
    expected = weighted_ce_reference(hidden.reshape(-1, 32), model.lm_head.weight, targets.reshape(-1),
                                     seq.reshape(-1), rewards, reduction="sum") / (targets != -100).sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    # Swift over the batch: standardized rewards
    patch_causal_lm(model, impl="torch")
    swift = model(input_ids=ids, attention_mask=mask, labels=labels, rewards=rewards, standardize=True)
    w = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    expected = weighted_ce_reference(hidden.reshape(-1, 32), model.lm_head.weight, targets.reshape(-1),
                                     seq.reshape(-1), w, reduction="sum") / (targets != -100).sum()
    torch.testing.assert_close(swift.loss, expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="one per sequence"):
        model(input_ids=ids, labels=labels, rewards=torch.ones(2))


@pytest.mark.parametrize("model_type", list(HEADS))
def test_declared_heads_are_applied_not_ignored(model_type):
    """The transform really is in the patched loss: without it (a config that no longer declares it,
    the model still applying it) the head check refuses the model."""
    from refit_fast.integrations.hf import head_options

    model = tiny_model(model_type, **HEADS[model_type])
    assert head_options(model)
    field, value = next(iter(HEADS[model_type].items()))
    real = model.lm_head.forward
    identity = None if field == "final_logit_softcapping" else 1.0
    setattr(model.config, field, identity)  # weighted_ce would now compute the plain head ...
    if field == "final_logit_softcapping":  # ... while the model keeps transforming its logits
        model.lm_head.forward = lambda h: value * torch.tanh(real(h) / value)
    else:
        scale = value if field == "logit_scale" else 1 / value
        model.lm_head.forward = lambda h: real(h) * scale
    with pytest.raises(UnsupportedHeadError, match="max difference"):
        patch_causal_lm(model)
    assert not is_patched(model)


def test_a_custom_head_is_caught_by_the_logit_check():
    model = tiny_model("llama")
    real = model.lm_head.forward
    model.lm_head.forward = lambda h: real(h) * 1.01  # a scaled head no config field declares
    with pytest.raises(UnsupportedHeadError, match="max difference"):
        patch_causal_lm(model)


@pytest.mark.parametrize("model_type", list(HEADS))
def test_the_trainer_keeps_the_declared_head(model_type):
    """refit-fast train's packed model (PackedCausalLM) computes the declared head too, so a Gemma 2
    model trained by our trainer keeps its final-logit softcap: its loss is the model's own."""
    from refit_fast.model import prepare_model
    from refit_fast.train.objectives import PackedCausalLM

    over = dict(HEADS[model_type], **({"attn_logit_softcapping": None} if model_type == "gemma2" else {}))
    model = tiny_model(model_type, **over)
    ids, _, labels = batch(T=13)
    ids, labels = ids[:1], labels[:1]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    targets = torch.cat([labels[0, 1:], torch.tensor([-100])])
    truth = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    lm = PackedCausalLM(prepare_model(model, attn_backend="sdpa"))
    T = ids.shape[1]
    with torch.no_grad():
        ours = lm(ids[0], torch.arange(T), torch.tensor([0, T], dtype=torch.int32), T, targets,
                  torch.zeros(T, dtype=torch.long))
    torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-10)
