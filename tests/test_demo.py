"""The demo pipeline (a tiny smoke run) and ModelPolicy (batched generation for the environment)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from refit_fast.data import build_word_tokenizer
from refit_fast.envs import corpus, evaluate, rollout
from refit_fast.demo import METHODS, MIN_EVAL_EPISODES, POLICIES, PRESETS, RESULT_KEYS, Preset, main, run_demo
from refit_fast.envs.model_policy import ModelPolicy

COLUMNS = ("mean_reward", "stderr", "accuracy", "accuracy_stderr", "questions_per_episode", "well_formed")


# ---- the pipeline ---------------------------------------------------------------------------------


TINY = Preset(scripted=60, hidden=32, layers=1, heads=2, max_tokens=512, grad_accum=1, base_steps=3,
              base_warmup=1, tasks=20, method_steps=2, eval_episodes=12, filter_min_reward=0.1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    results = run_demo(str(out), preset=TINY, seed=3, progress=False, log=lines.append)
    return out, results, lines


def test_demo_smoke_writes_every_result(tiny_run):
    out, results, lines = tiny_run
    assert list(results) == list(POLICIES) == ["base", "star_gate", "dpo", "refit", "swift", "filtered_sft"]
    saved = json.loads((out / "results.json").read_text())
    assert list(saved) == list(POLICIES)
    for policy, scores in saved.items():
        assert set(scores) == set(RESULT_KEYS) == {"mean_reward", "stderr", "accuracy", "accuracy_stderr",
                                                   "questions_per_episode"}
        assert all(isinstance(v, float) for v in scores.values()), policy
        assert 0.0 <= scores["mean_reward"] <= 1.0 and scores["stderr"] >= 0.0
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["accuracy_stderr"] >= 0.0
        assert scores == {k: results[policy][k] for k in scores}
        assert results[policy]["n"] == TINY.eval_episodes
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == len(POLICIES) + 1  # header + one row per policy
    for policy in POLICIES:
        assert f"| {policy} |" in table
    assert (out / "results.png").stat().st_size > 1000
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 3 and info["eval_seed"] == 0 and info["preset"]["method_steps"] == 2
    assert [len(info["losses"][m]) for m in POLICIES] == [3, 2, 2, 2, 2, 2]
    assert set(info["logged"]) == {"0.7", "1", "1.3", "all"}
    parts = info["swift_loss_parts"]  # logged every 10 steps and at the last one: here only step 2
    assert parts["steps"] == [2]
    assert parts["loss_pos"][0] + parts["loss_neg"][0] == pytest.approx(info["losses"]["swift"][-1], rel=1e-5, abs=1e-6)
    assert parts["loss_pos"][0] >= 0 >= parts["loss_neg"][0]
    base_cfg = (out / "runs" / "base" / "config.yaml").read_text()
    assert "algorithm: sft" in base_cfg and "scripted.jsonl" in base_cfg
    for method in METHODS:  # every method trained its own model, from the base, on the logged data
        assert os.path.isdir(out / "runs" / method / "final")
        cfg = (out / "runs" / method / "config.yaml").read_text()
        assert f"algorithm: {method}" in cfg and "logged.jsonl" in cfg
        assert os.path.join("runs", "base", "final") in cfg
    assert any("star_gate" in line and "trained and scored" in line for line in lines)


def test_demo_logs_three_plays_per_task_at_three_temperatures(tiny_run):
    out, _, _ = tiny_run
    records = [json.loads(line) for line in (out / "logged.jsonl").read_text().splitlines()]
    assert len(records) == TINY.tasks * len(TINY.temperatures)
    groups = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
        assert 0.0 <= r["reward"] <= 1.0
    assert len(groups) == TINY.tasks
    for members in groups.values():  # the same task (same opening messages), once per temperature
        assert sorted(r["temperature"] for r in members) == sorted(TINY.temperatures)
        assert len({json.dumps(r["messages"][:2]) for r in members}) == 1
    # the scripted data of the base never shares a task with the logged data
    scripted = [json.loads(line) for line in (out / "scripted.jsonl").read_text().splitlines()]
    assert len(scripted) == TINY.scripted
    assert not {r["id"] for r in scripted} & set(groups)


def test_demo_results_do_not_depend_on_jobs(tiny_run, tmp_path):
    """Workers train on one thread each, like the main process: the same numbers with 2 jobs."""
    out, results, _ = tiny_run
    again = run_demo(str(tmp_path), preset=TINY, seed=3, progress=False, log=None, jobs=2)
    assert again == results
    assert (tmp_path / "logged.jsonl").read_text() == (out / "logged.jsonl").read_text()


def test_demo_presets_give_every_method_the_same_budget():
    for name, p in PRESETS.items():
        assert set(dict(p.lrs)) == set(METHODS), name
        assert all(p.lr(m) > 0 for m in POLICIES), name
        assert p.eval_episodes >= MIN_EVAL_EPISODES[p.base], name  # 500 (scratch), 200 (smollm2)
        assert len(p.temperatures) == 3, name  # m = 3 plays per task, as in the paper
    # quick: less data and a smaller evaluation, the same tuned hyper-parameters
    assert PRESETS["quick"].tasks < PRESETS["default"].tasks
    assert PRESETS["quick"].eval_episodes <= PRESETS["default"].eval_episodes
    assert PRESETS["quick"].lrs == PRESETS["default"].lrs
    assert PRESETS["cuda"].hidden > PRESETS["default"].hidden and PRESETS["cuda"].tasks > PRESETS["default"].tasks


def test_demo_cli_refuses_bad_options(tmp_path, capsys):
    for argv, message in ((["--eval-episodes", "100"], "--eval-episodes must be >= 500"),
                          (["--jobs", "0"], "--jobs must be >= 1"),
                          (["--device", "tpu"], "--device must be cpu, cuda or auto")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path)] + argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_demo_lives_above_the_environment():
    """The demo is refit_fast.demo (run by `refit-fast demo` or `python -m refit_fast.demo`); envs/ has none."""
    import importlib.util
    import subprocess
    import sys

    from refit_fast.cli import COMMANDS

    assert COMMANDS["demo"][0] == "refit_fast.demo"
    assert importlib.util.find_spec("refit_fast.envs.demo") is None
    done = subprocess.run([sys.executable, "-m", "refit_fast.demo", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "usage: refit-fast demo" in done.stdout


# ---- ModelPolicy ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(corpus(200, seed=0))


def _random_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


CONVS = [
    [{"role": "system", "content": "items : red ball , blue ball . you have 3 turns ."},
     {"role": "user", "content": "i need the ball ."}],
    [{"role": "system", "content": "items : tiny cup , small cup , big cup , huge cup . ask about color , size or "
                                   "material , or name the item . you have 3 turns ."},
     {"role": "user", "content": "where is my cup ?"},
     {"role": "assistant", "content": "what size is it ?"},
     {"role": "user", "content": "it is big ."}],
    [{"role": "user", "content": "can you hand me the key ?"}],
]


def test_model_policy_batched_equals_one_at_a_time(tokenizer):
    """Left padding, attention mask and positions must not change what a conversation generates."""
    policy = ModelPolicy(_random_llama(len(tokenizer)), tokenizer, max_new_tokens=8)
    batched = policy(CONVS)
    assert isinstance(batched, list) and len(batched) == len(CONVS)
    singles = [policy(c) for c in CONVS]  # a single conversation (a list of dicts) gives one text
    assert all(isinstance(t, str) for t in singles)
    assert batched == singles
    assert any(batched)  # a random model says something before <|end|> (the comparison is not vacuous)
    # and a batch size smaller than the batch splits it without changing anything
    small = ModelPolicy(policy.model, tokenizer, max_new_tokens=8, batch_size=2)
    assert small(CONVS) == batched


class ScriptedLM(torch.nn.Module):
    """A fake causal LM that emits a fixed token sequence, one token per forward call."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size, self.calls = list(script), vocab_size, 0
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None):
        assert position_ids.shape == input_ids.shape and attention_mask.shape[1] >= input_ids.shape[1]
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        logits[:, -1, token] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=("cache", self.calls))


def test_model_policy_stops_at_end_of_turn(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    script = [ids("it"), ids("is"), ids("the"), ids("red"), ids("ball"), ids("."), ids("<|end|>"), ids("blue")]
    model = ScriptedLM(script, len(tokenizer))
    assert ModelPolicy(model, tokenizer, max_new_tokens=16)(CONVS[0]) == "it is the red ball ."
    assert model.calls == 7  # the prompt, then one call per generated token up to <|end|>; nothing after it
    # without an end-of-turn token, max_new_tokens caps the turn
    model = ScriptedLM([ids("red")], len(tokenizer))
    assert ModelPolicy(model, tokenizer, max_new_tokens=3)(CONVS[0]) == "red red red"


def test_model_policy_sampling_is_reproducible_with_a_seed(tokenizer):
    model = _random_llama(len(tokenizer), seed=1)
    sample = lambda seed: ModelPolicy(model, tokenizer, temperature=1.5, seed=seed, max_new_tokens=10)(CONVS)  # noqa: E731
    greedy = ModelPolicy(model, tokenizer, max_new_tokens=10)(CONVS)
    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first or sample(9) != first  # a different seed samples differently
    assert first != greedy
    with pytest.raises(ValueError):
        ModelPolicy(model, tokenizer, temperature=-1.0)


def test_model_policy_plays_the_environment(tokenizer):
    policy = ModelPolicy(_random_llama(len(tokenizer)), tokenizer, max_new_tokens=6)
    scores = evaluate(policy, n_episodes=6, seed=5, batched=True, progress=False)
    assert scores["n"] == 6 and set(COLUMNS) <= set(scores)
    messages, reward, infos = rollout(policy, episode_seed=1)
    assert 0.0 <= reward <= 1.0 and messages[-1]["role"] in ("assistant", "user") and infos
