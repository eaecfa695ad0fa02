"""The demo pipeline (a tiny smoke run) and ModelPolicy (batched generation for the environment)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from refit_fast.data import build_word_tokenizer
from refit_fast.envs import corpus, evaluate, rollout
from refit_fast.envs.demo import COLUMNS, METHODS, PRESETS, Preset, main, run_demo
from refit_fast.envs.model_policy import ModelPolicy

ALL = ("logged",) + METHODS


# ---- the pipeline ---------------------------------------------------------------------------------


TINY = Preset(episodes=40, per_episode=2, hidden=32, layers=1, heads=2, max_tokens=512, grad_accum=1,
              sft_steps=3, sft_warmup=1, method_steps=2, eval_episodes=12)


def test_demo_smoke_writes_every_result(tmp_path):
    lines = []
    results = run_demo(str(tmp_path), preset=TINY, seed=3, progress=False, log=lines.append)

    assert list(results) == list(ALL) == ["logged", "sft", "filtered_sft", "dpo", "refit", "swift"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved) == list(ALL)
    for method, scores in saved.items():
        for key in ("mean_reward", "stderr", "accuracy", "questions"):
            assert isinstance(scores[key], float), (method, key)
        assert 0.0 <= scores["mean_reward"] <= 1.0 and scores["stderr"] >= 0.0
        assert scores["n"] == TINY.eval_episodes
        assert scores == {k: results[method][k] for k in scores}
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == len(ALL) + 1  # header + one row per method
    for method in ALL:
        assert f"| {method} |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["seed"] == 3 and info["eval_seed"] == 0 and info["preset"]["method_steps"] == 2
    assert [len(info["losses"][m]) for m in METHODS] == [3, 2, 2, 2, 2]
    for method in METHODS:  # every method trained its own model, from SFT's
        assert os.path.isdir(tmp_path / "runs" / method / "final")
        cfg = (tmp_path / "runs" / method / "config.yaml").read_text()
        assert f"algorithm: {method}" in cfg
        assert ("init_from: null" in cfg) == (method == "sft")
    assert any("trained swift" in line for line in lines) and any("evaluated dpo" in line for line in lines)
    # the logged policy is scored on the same held-out episodes as the models
    assert results["logged"]["n"] == results["swift"]["n"]


def test_demo_presets_give_every_method_the_same_budget():
    for name, p in PRESETS.items():
        assert set(dict(p.lrs)) == set(METHODS[1:]), name
        assert all(p.lr(m) > 0 for m in METHODS), name
        assert p.eval_episodes >= 500, name
    # quick: less logged data and a smaller evaluation, the same tuned hyper-parameters
    assert PRESETS["quick"].episodes < PRESETS["default"].episodes
    assert PRESETS["quick"].eval_episodes <= PRESETS["default"].eval_episodes
    assert PRESETS["quick"].lrs == PRESETS["default"].lrs
    assert PRESETS["cuda"].hidden > PRESETS["default"].hidden and PRESETS["cuda"].episodes > PRESETS["default"].episodes


def test_demo_cli_refuses_small_evaluations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--eval-episodes", "100", "--device", "cpu"])
    assert "--eval-episodes must be >= 500" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


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
    assert reward in (0.0, 1.0) and messages[-1]["role"] in ("assistant", "user") and infos
