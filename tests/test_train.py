"""The trainer: the step objective is exact whatever the micro-batching, resume is bit for bit, bad steps
stop cleanly, and a tiny model actually learns.

The key invariant: after one SGD step with lr=1 the parameters move by exactly minus the gradient of
the objective over the whole step batch, computed here independently with the unmodified HF model
(full logits, one conversation at a time), for every algorithm and any grad_accum. Swift's weights,
STaR-GATE's selection and DPO's pairs are recomputed here by hand from the raw JSONL rows (groups:
the `group` field, else the prompt).
"""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from refit_fast.data import build_word_tokenizer, load_tokenized
from refit_fast.model import build_model_from_config, load_model, tiny_config
from refit_fast.train import ConfigError, NonFiniteLossError, TrainConfig, load_config, train
from refit_fast.train import checkpoint as ckpt_mod
from refit_fast.train.data import (Schedule, TrainData, assign_rows, best_per_group, dpo_pairs, filter_top,
                                   group_index, make_units)

WORDS = "red blue green small big cat dog bird runs sits flies fast slow yes no maybe".split()
QUESTIONS = ["pick a color", "name an animal", "how fast", "which size", "say yes or no"]
MODEL = dict(tiny_config("llama"), vocab_size=64)


def write_data(path, n=12, seed=0, answer_len=(2, 6)):
    """n conversations over a few shared prompts (so DPO finds pairs), two assistant turns each."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(*answer_len))]
            msgs = [
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                {"role": "assistant", "content": "which one ?"},
                {"role": "user", "content": rng.choice(WORDS)},
                {"role": "assistant", "content": " ".join(words)},
            ]
            f.write(json.dumps({"id": f"c{i}", "messages": msgs, "reward": round(rng.random(), 3)}) + "\n")
    return str(path)


# (first user message, reward, group field or None): odd groups (3 and 5), a singleton, a group of equal
# rewards, and a group "t7" joined by the group field across three wordings (one of them "pick a
# color", which the field takes out of that prompt's group).
GROUPED_ROWS = [
    ("pick a color", 0.2, None), ("pick a color", 0.9, None), ("pick a color", 0.5, None),
    ("name an animal", 0.7, None),
    ("how fast", 0.4, None), ("how fast", 0.4, None),
    ("which size", 0.1, "t7"), ("what size is it", 0.8, "t7"), ("pick a color", 0.3, "t7"),
    ("say yes or no", 0.0, None), ("say yes or no", 1.0, None), ("say yes or no", 0.25, None),
    ("say yes or no", 0.25, None), ("say yes or no", 0.6, None),
]


def write_grouped_data(path, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, (question, reward, group) in enumerate(GROUPED_ROWS):
            msgs = [{"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}]
            row = {"id": f"g{i}", "messages": msgs, "reward": reward}
            if group is not None:
                row["group"] = group
            f.write(json.dumps(row) + "\n")
    return str(path)


def raw_group_keys(path):
    """Each row's group, by hand from the JSONL: its group field, else its messages before the first
    assistant turn."""
    keys = []
    for line in open(path):
        row = json.loads(line)
        prompt = []
        for m in row["messages"]:
            if m["role"] == "assistant":
                break
            prompt.append(m)
        keys.append(("group", str(row["group"])) if row.get("group") is not None else ("prompt", json.dumps(prompt)))
    return keys


def hand_swift_weights(rewards, keys, eps):
    """(r - mean_g) / (std_g + eps), population std, float64; 0 for a group without two distinct rewards."""
    r = np.asarray(rewards, np.float64)
    w = np.zeros_like(r)
    for k in set(keys):
        idx = [i for i, x in enumerate(keys) if x == k]
        if len(set(r[idx].tolist())) > 1:
            mean = sum(r[idx]) / len(idx)
            std = math.sqrt(sum((r[idx] - mean) ** 2) / len(idx))
            w[idx] = (r[idx] - mean) / (std + eps)
    return w


def hand_best_per_group(rewards, keys):
    best = {}
    for i, (k, r) in enumerate(zip(keys, rewards)):
        if k not in best or r > rewards[best[k]]:
            best[k] = i
    return sorted(best.values())


def base_config(tmp_path, data, **over):
    cfg = {
        "algorithm": "refit",
        "output_dir": str(tmp_path / "out"),
        "data": {"path": data},
        "tokenizer": "word",
        "model": {"config": MODEL},
        "batch": {"max_tokens": 96, "grad_accum": 1},
        "steps": 1,
        "optim": {"name": "sgd", "lr": 1.0, "grad_clip": 0.0},
        "log": {"quiet": True, "progress": "false", "tensorboard": "false"},
    }
    return TrainConfig.from_dict(cfg, over)


# ------------------------------------------------------------------------------------------------
# the independent reference: plain HF forward, full logits, one conversation at a time
# ------------------------------------------------------------------------------------------------


def seq_logp(model, ids, mask):
    ids = torch.as_tensor(ids)[None]
    logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return (lp * torch.as_tensor(mask[1:], dtype=torch.float64)).sum()


def reference_step(cfg, tokenizer, convs_filter=None, parts=None):
    """(loss, {name: param - grad}) for one SGD(lr=1) step on the whole data set as one step batch.
    ``parts``: a dict that receives Swift's (loss_pos, loss_neg)."""
    model = build_model_from_config(MODEL, seed=cfg.seed, attn_backend=None)
    model.train()
    convs, _ = load_tokenized(cfg.data.path, tokenizer, progress=False)
    keys = raw_group_keys(cfg.data.path)
    assert len(keys) == len(convs)  # every row survived, so row i is conversation i
    if cfg.algorithm == "star_gate":
        keep = hand_best_per_group([c.reward for c in convs], keys)
        convs, keys = [convs[i] for i in keep], [keys[i] for i in keep]
    if convs_filter is not None:
        convs = convs_filter(convs)
    r = torch.tensor([c.reward for c in convs], dtype=torch.float64)
    algo = cfg.algorithm
    if algo == "dpo":
        pairs = dpo_pairs(r.numpy(), keys, cfg.objective.dpo_pairs)
        lp = torch.stack([seq_logp(model, c.input_ids, c.loss_mask) for c in convs])
        ref = lp.detach()
        delta = lp - ref
        z = cfg.objective.dpo_beta * (delta[pairs[:, 0]] - delta[pairs[:, 1]])
        loss = torch.nn.functional.softplus(-z).mean()
    else:
        eps = cfg.objective.swift_eps
        if algo in ("sft", "filtered_sft", "star_gate"):
            w = torch.ones_like(r)
        elif algo == "refit":
            w = r
        elif cfg.objective.swift_stats == "step":
            w = (r - r.mean()) / (r.std(unbiased=False) + eps)
        else:
            by = keys if cfg.objective.swift_stats == "group" else [0] * len(convs)
            w = torch.from_numpy(hand_swift_weights(r.numpy(), by, eps))
        lp = torch.stack([seq_logp(model, c.input_ids, c.loss_mask) for c in convs])
        denom = len(convs) if cfg.objective.normalize == "sequence" else sum(int(c.loss_mask[1:].sum()) for c in convs)
        loss = -(w * lp).sum() / denom
        if parts is not None:
            parts["loss_pos"] = float(-(w.clamp(min=0) * lp.detach()).sum() / denom)
            parts["loss_neg"] = float(-(w.clamp(max=0) * lp.detach()).sum() / denom)
    loss.backward()
    return float(loss.detach()), {n: (p - p.grad).detach() for n, p in model.named_parameters()}


def assert_params_close(result, expected, rtol=2e-4, atol=2e-6):
    got = load_model(result.final_model_path, attn_backend=None, local_files_only=True)
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n].float(), rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# the key invariant
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,swift_stats", [("sft", None), ("refit", None), ("swift", "step")])
def test_step_gradient_equals_whole_batch_gradient(tmp_path, algorithm, swift_stats):
    data = write_data(tmp_path / "d.jsonl")
    over = {"objective.swift_stats": swift_stats} if swift_stats else {}
    # max_tokens=96 packs these 12 conversations into 3 rows: grad_accum=3 is one step over all of them.
    cfg = base_config(tmp_path, data, algorithm=algorithm, **{"batch.grad_accum": 3, **over})
    res = train(cfg)
    m = res.metrics[0]
    assert m["rows"] == 3 and m["conversations"] == 12, m
    ref_loss, expected = reference_step(cfg, res.tokenizer)
    assert res.losses[0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert_params_close(res, expected)
    # and one big row (grad_accum=1) gives the same step
    cfg1 = base_config(tmp_path, data, algorithm=algorithm, output_dir=str(tmp_path / "one"),
                       **{"batch.max_tokens": 1024, **over})
    res1 = train(cfg1)
    assert res1.metrics[0]["rows"] == 1
    assert res1.losses[0] == pytest.approx(res.losses[0], rel=1e-5, abs=1e-6)
    assert_params_close(res1, expected)


@pytest.mark.parametrize("algorithm,swift_stats", [("swift", "group"), ("swift", "dataset"), ("star_gate", None), ("dpo", None)])
def test_grouped_step_gradient_equals_whole_dataset_objective(tmp_path, algorithm, swift_stats):
    """Swift with the data set's group (or global) statistics, STaR-GATE and DPO on groups with odd
    sizes, a singleton, equal rewards and a group field that overrides the prompt: one step over all of
    it, in several packed rows and in one, equals autograd of the objective with hand-made weights."""
    data = write_grouped_data(tmp_path / "g.jsonl")
    over = {"objective.swift_stats": swift_stats} if swift_stats else {}
    n_expected = {"star_gate": 5, "dpo": 4}.get(algorithm, len(GROUPED_ROWS))  # conversations or pairs
    for out, max_tokens in (("rows", 40 if algorithm != "dpo" else 80), ("one", 1024)):
        cfg = base_config(tmp_path, data, algorithm=algorithm, output_dir=str(tmp_path / out),
                          **{"batch.max_tokens": max_tokens, "batch.grad_accum": 8, **over})
        res = train(cfg)
        m = res.metrics[0]
        assert res.total_steps == 1 and (m["rows"] > 1) == (out == "rows"), m
        assert m.get("pairs", m["conversations"]) == n_expected, m
        parts = {}
        ref_loss, expected = reference_step(cfg, res.tokenizer, parts=parts)
        if algorithm != "dpo":
            assert res.losses[0] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        assert_params_close(res, expected)
        if algorithm == "swift":
            # Swift's loss split by weight sign; both parts checked against the hand objective
            assert m["loss_pos"] == pytest.approx(parts["loss_pos"], rel=1e-5, abs=1e-6)
            assert m["loss_neg"] == pytest.approx(parts["loss_neg"], rel=1e-5, abs=1e-6)
            assert m["loss_pos"] + m["loss_neg"] == pytest.approx(m["loss"], rel=1e-5, abs=1e-6)
            assert m["loss_pos"] > 0 > m["loss_neg"]  # NLL > 0: positive weights add, negative ones subtract
            # singleton + two equal rewards (group) / none (dataset)
            assert m["zero_weight"] == (3 if swift_stats == "group" else 0)


def test_swift_weights_do_not_depend_on_packing_or_grad_accum(tmp_path, monkeypatch):
    """Over one epoch every conversation is weighted by its whole-data-set group weight, whatever the
    token budget and accumulation (so the steps differ); data.group_key names another field."""
    import refit_fast.train.objectives as obj

    data = write_grouped_data(tmp_path / "g.jsonl")
    renamed = tmp_path / "task.jsonl"
    renamed.write_text("".join(json.dumps({("task" if k == "group" else k): v for k, v in json.loads(line).items()}) + "\n"
                               for line in open(data)))
    hand = hand_swift_weights([r for _, r, _ in GROUPED_ROWS], raw_group_keys(data), 1e-6)
    convs, _ = load_tokenized(data, build_word_tokenizer(WORDS + [q for q, _, _ in GROUPED_ROWS]), progress=False)
    td = TrainData.from_tokenized(convs)
    w64 = obj.swift_weights(td.rewards, group_index(td.groups), 1e-6)
    np.testing.assert_allclose(w64, hand, rtol=1e-12, atol=0)
    assert np.flatnonzero(w64 == 0).tolist() == [3, 4, 5]  # exactly 0: the singleton and the equal pair
    real, seen = obj.weighted_ce, []

    def spy(hidden, weight, labels, seq_ids, rewards=None, **k):
        if rewards is not None:
            seen.extend(rewards.tolist())
        return real(hidden, weight, labels, seq_ids, rewards, **k)

    monkeypatch.setattr(obj, "weighted_ce", spy)
    for i, (path, max_tokens, accum, extra) in enumerate([(data, 40, 1, {}), (data, 1024, 1, {}), (data, 60, 2, {}),
                                                          (str(renamed), 40, 1, {"data.group_key": "task"})]):
        seen.clear()
        cfg = base_config(tmp_path, path, algorithm="swift", output_dir=str(tmp_path / f"o{i}"), steps=None,
                          **{"batch.max_tokens": max_tokens, "batch.grad_accum": accum, "log.every": 0,
                             "optim.lr": 0.1, **extra})
        res = train(cfg)
        assert sum(m["conversations"] for m in res.metrics) == len(GROUPED_ROWS)
        assert (len(res.losses) == 1) == (max_tokens == 1024), len(res.losses)
        assert sorted(seen) == sorted(np.float32(hand).tolist()), (max_tokens, accum, extra)
        assert sum(m["zero_weight"] for m in res.metrics) == 3
    # a conversation dropped as too long still counts in its group's statistics (they are the data set's)
    budget = int(td.flat.lengths.max()) - 1
    kept = td.flat.lengths <= budget
    assert 0 < (~kept).sum() < 3 and hand[~kept].any()
    seen.clear()
    cfg = base_config(tmp_path, data, algorithm="swift", output_dir=str(tmp_path / "drop"), steps=None,
                      **{"batch.max_tokens": budget, "log.every": 0, "optim.lr": 0.0})
    train(cfg)
    assert sorted(seen) == sorted(np.float32(hand[kept]).tolist())


def test_swift_summary_metrics_and_no_distinct_rewards_error(tmp_path, capsys):
    data = write_grouped_data(tmp_path / "g.jsonl")
    cfg = base_config(tmp_path, data, algorithm="swift", steps=None, **{"batch.max_tokens": 40, "log.quiet": False,
                                                                       "log.every": 2})
    res = train(cfg)
    out = capsys.readouterr().out
    assert "swift weights from 5 groups (by 'group' field or prompt): 3 of 14 conversations have weight 0 " \
           "(1 alone in their group, 2 in groups whose rewards are all equal)" in out, out
    assert "most conversations" not in out and " | pos " in out
    lines = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [x["zero_weight"] for x in lines] == [m["zero_weight"] for m in res.metrics] and sum(
        x["zero_weight"] for x in lines) == 3
    # the parts on logging steps (every 2nd and the last) only
    assert [("loss_pos" in x) for x in lines] == [(k + 1) % 2 == 0 or k + 1 == len(lines) for k in range(len(lines))]
    for x in lines:
        if "loss_pos" in x:
            assert x["loss_pos"] + x["loss_neg"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
    # step statistics: the same split, no zero_weight field
    res = train(cfg.replace(overwrite=True, **{"objective.swift_stats": "step", "log.quiet": True}))
    assert "zero_weight" not in res.metrics[0]
    assert res.metrics[-1]["loss_pos"] + res.metrics[-1]["loss_neg"] == pytest.approx(res.losses[-1], rel=1e-5, abs=1e-6)

    # every prompt once: no group holds two different rewards
    single = write_data(tmp_path / "single.jsonl", n=5)
    cfg = base_config(tmp_path, single, algorithm="swift", output_dir=str(tmp_path / "single"))
    with pytest.raises(ConfigError, match=r"no group .* holds two different rewards.*swift_stats=step or dataset"):
        train(cfg)
    # mostly singletons: trains, with a hint in the summary line
    mostly = tmp_path / "mostly.jsonl"
    mostly.write_text(open(single).read() + json.dumps(dict(json.loads(open(single).readline()), id="dup", reward=9.0)) + "\n")
    train(base_config(tmp_path, str(mostly), algorithm="swift", output_dir=str(tmp_path / "mostly"), **{"log.quiet": False}))
    assert "4 of 6 conversations have weight 0 (4 alone in their group, 0 in groups whose rewards are all equal); " \
           "most conversations have no group mate" in capsys.readouterr().out
    assert len(train(cfg.replace(**{"objective.swift_stats": "dataset"})).losses) == 1  # global statistics still work
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps(dict(json.loads(x), reward=0.5)) + "\n" for x in open(single)))
    with pytest.raises(ConfigError, match="all 5 rewards are equal"):
        train(base_config(tmp_path, str(same), algorithm="swift", output_dir=str(tmp_path / "same"),
                          **{"objective.swift_stats": "dataset"}))


def test_token_normalization(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, algorithm="refit", **{"batch.grad_accum": 3, "objective.normalize": "token"})
    res = train(cfg)
    ref_loss, expected = reference_step(cfg, res.tokenizer)
    assert res.losses[0] == pytest.approx(ref_loss, rel=1e-5)
    assert_params_close(res, expected)


def test_dpo_gradient_equals_direct_dpo_loss(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=15)
    cfg = base_config(tmp_path, data, algorithm="dpo", **{"batch.grad_accum": 4, "objective.dpo_beta": 0.5})
    res = train(cfg)
    m = res.metrics[0]
    # every pair's policy equals its reference at the first step: loss is exactly log 2
    assert m["pairs"] == 5 and res.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    ref_loss, expected = reference_step(cfg, res.tokenizer)
    assert_params_close(res, expected)


def test_filtered_sft_trains_on_the_top_fraction(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, algorithm="filtered_sft",
                      **{"batch.max_tokens": 1024, "objective.filter_top_fraction": 0.25})
    res = train(cfg)
    assert res.metrics[0]["conversations"] == 3

    def top3(convs):
        keep = sorted(range(len(convs)), key=lambda i: -convs[i].reward)[:3]
        return [convs[i] for i in sorted(keep)]

    _, expected = reference_step(cfg, res.tokenizer, convs_filter=top3)
    assert_params_close(res, expected)


def test_filtered_sft_with_nothing_kept_says_why(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, algorithm="filtered_sft", **{"objective.filter_min_reward": 1e9})
    with pytest.raises(ValueError, match=r"filtered_sft: no conversation has reward >= objective.filter_min_reward=1000000000.0 \(highest reward: "):
        train(cfg)


# ------------------------------------------------------------------------------------------------
# checkpoints, resume, failures
# ------------------------------------------------------------------------------------------------


def adamw_config(tmp_path, data, out, **over):
    return base_config(tmp_path, data, output_dir=str(out), steps=6,
                       optim={"name": "adamw", "lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.1, "grad_clip": 1.0},
                       **{"batch.max_tokens": 64, "checkpoint.every": 3, "algorithm": "swift", **over})


def test_resume_is_bit_for_bit(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=20)
    straight = train(adamw_config(tmp_path, data, tmp_path / "a"))
    assert len(straight.losses) == 6
    # 3 steps, then the process "stops" (on_step returns True), then resume for the other 3
    first = train(adamw_config(tmp_path, data, tmp_path / "b"), on_step=lambda m: m["step"] == 3)
    assert first.steps_run == [1, 2, 3] and first.final_model_path is None
    assert os.path.isdir(tmp_path / "b" / "checkpoint-3")
    second = train(adamw_config(tmp_path, data, tmp_path / "b", resume=True))
    assert second.steps_run == [4, 5, 6]
    assert first.losses + second.losses == straight.losses  # exact, not approximate
    a = load_model(straight.final_model_path, attn_backend=None, local_files_only=True).state_dict()
    b = load_model(second.final_model_path, attn_backend=None, local_files_only=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_loss_stops_before_the_update(tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "nan", **{"checkpoint.every": 2})
    import refit_fast.train.objectives as obj

    real = obj.weighted_ce
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(obj, "weighted_ce", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*checkpoint-2"):
        train(cfg)
    assert ckpt_mod.latest_checkpoint(cfg.output_dir).endswith("checkpoint-2")
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoint-3"))
    # the last good checkpoint still resumes
    monkeypatch.setattr(obj, "weighted_ce", real)
    res = train(cfg.replace(resume=True))
    assert res.steps_run == [3, 4, 5, 6] and all(math.isfinite(x) for x in res.losses)


def test_crash_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "crash", **{"checkpoint.every": 2})
    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith(os.path.join("checkpoint-4.tmp", "optimizer.pt")):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert os.path.isdir(os.path.join(cfg.output_dir, "checkpoint-4.tmp"))
    assert ckpt_mod.latest_checkpoint(cfg.output_dir).endswith("checkpoint-2")
    res = train(cfg.replace(resume=True))
    assert res.steps_run[0] == 3
    assert not any(name.endswith(".tmp") for name in os.listdir(cfg.output_dir))
    assert [s for s, _ in ckpt_mod.list_checkpoints(cfg.output_dir)] == [4, 6]  # keep_last=2


def test_fresh_run_refuses_to_clobber_checkpoints(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data)
    train(cfg)
    with pytest.raises(ConfigError, match="resume=true"):
        train(cfg)
    assert train(cfg.replace(overwrite=True)).steps_run == [1]


# ------------------------------------------------------------------------------------------------
# end to end: CLI, loss falls, metrics, SFT -> Refit from the SFT model in one process
# ------------------------------------------------------------------------------------------------


def test_cli_end_to_end_loss_falls_then_refit_from_sft(tmp_path, capsys):
    from refit_fast.cli import main

    data = write_data(tmp_path / "d.jsonl", n=40)
    yaml_path = tmp_path / "sft.yaml"
    yaml_path.write_text(
        "algorithm: sft\n"
        f"data: {data}\n"
        "tokenizer: word\n"
        "model:\n  config: {model_type: qwen2, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,\n"
        "           num_attention_heads: 4, num_key_value_heads: 2}\n"
        "batch: {max_tokens: 128, grad_accum: 1}\n"
        "optim: {lr: 1.0e-2, warmup_steps: 2}\n"
        "log: {every: 10, progress: false}\n"
    )
    out = tmp_path / "sft"
    assert main(["train", str(yaml_path), f"output_dir={out}", "steps=30"]) == 0
    assert "step 30/30" in capsys.readouterr().out
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(lines) == 30
    for key in ("loss", "lr", "grad_norm", "tokens", "packing_efficiency", "reward_mean", "weight_std", "peak_mem_mb", "tokens_per_s"):
        assert key in lines[0]
    first, last = np.mean([x["loss"] for x in lines[:5]]), np.mean([x["loss"] for x in lines[-5:]])
    assert last < 0.7 * first, (first, last)
    assert os.path.isfile(out / "final" / "model.safetensors") and os.path.isfile(out / "final" / "tokenizer.json")

    # the demo's pattern: a second method from the SFT model, same process, tokenizer found there
    cfg = load_config(str(yaml_path), [f"output_dir={tmp_path / 'refit'}", "algorithm=refit", "steps=3",
                                       f"model.init_from={out / 'final'}", "tokenizer=auto", "log.quiet=true"])
    res = train(cfg)
    from transformers import AutoTokenizer

    assert res.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(out / "final")).get_vocab()
    # starting from the SFT model, Refit's first loss is that of a trained model, far below chance
    assert res.losses[0] < first


def test_cli_usage_and_config_errors(tmp_path, capsys):
    from refit_fast.train.cli import main

    assert main(["--help"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("algoritm: refit\n")
    assert main([str(bad)]) == 1
    assert "did you mean algorithm" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# config and planning units
# ------------------------------------------------------------------------------------------------


def test_config_yaml_overrides_and_validation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: swift\ndata: x.jsonl\nmodel: {config: {model_type: llama}}\noptim: {lr: 1}\n")
    cfg = load_config(str(p), ["optim.lr=1e-4", "batch.grad_accum=4", "optim.betas=[0.9, 0.99]", "tokenizer=word"])
    assert (cfg.algorithm, cfg.optim.lr, cfg.batch.grad_accum, cfg.optim.betas) == ("swift", 1e-4, 4, (0.9, 0.99))
    assert cfg.tokenizer.kind == "word" and cfg.data.path == "x.jsonl"
    assert (cfg.objective.swift_stats, cfg.data.group_key) == ("group", "group")  # the paper's statistics by default
    assert load_config(str(p)).optim.lr == 1.0 and isinstance(load_config(str(p)).optim.lr, float)
    for over, match in [
        (["algorithm=ppo"], "algorithm"),
        (["batch.max_tokens=0"], "batch.max_tokens"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.lrr=1"], "did you mean optim.lr"),
        (["model.path=/nonexistent"], "model"),
        (["objective.filter_top_fraction=0"], "filter_top_fraction"),
        (["objective.swift_stats=batch"], "objective.swift_stats"),
        (["data.group_key="], "data.group_key"),
        (["lr"], "key=value"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(str(p), over)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_assign_rows_whole_rows_balanced():
    rng = np.random.default_rng(0)
    loads = rng.integers(10, 100, 8)
    parts = assign_rows(loads, 2)
    assert sorted(sum(parts, [])) == list(range(8)) and all(len(p) == 4 for p in parts)
    tokens = [int(loads[p].sum()) for p in parts]
    assert abs(tokens[0] - tokens[1]) <= loads.max()
    assert assign_rows([5, 5, 5], 2) == [[0, 2], [1]]  # short rank runs an empty micro-step


def test_dpo_pairs_and_filter():
    r = np.array([0.1, 0.9, 0.5, 0.5, 0.3])
    keys = ["a", "a", "a", "b", "b"]
    assert dpo_pairs(r, keys).tolist() == [[1, 0], [3, 4]]
    assert dpo_pairs(np.array([1.0, 1.0]), ["a", "a"]).shape == (0, 2)  # equal rewards: no pair
    assert filter_top(r, 0.4).tolist() == [1, 2]
    # STaR-GATE: one per group, the best, ties to the first; groups by first appearance, output in data order
    assert best_per_group(r, keys).tolist() == [1, 3]
    assert best_per_group(np.array([0.5, 0.2, 0.5, 0.9, 0.2, 0.9]), ["b", "a", "b", "c", "a", "c"]).tolist() == [0, 1, 3]
    assert best_per_group(np.zeros(0), []).tolist() == []


def test_schedule_covers_every_unit_once_per_epoch():
    from types import SimpleNamespace as C

    rng = np.random.default_rng(1)
    convs = [C(id=str(i), input_ids=np.arange(1, n + 1), loss_mask=np.r_[0, np.ones(n - 1, int)], reward=0.0,
               prompt_key="p") for i, n in enumerate(rng.integers(3, 40, 50))]
    data = TrainData.from_tokenized(convs)
    s = Schedule(data, *make_units(data), max_tokens=64, rows_per_step=3, seed=0, epochs=2)
    seen = [[], []]
    for k in range(s.total_steps):
        sb = s.step_batch(k)
        assert len(sb.rows) <= 3 and all(load <= 64 for load in sb.loads)
        seen[sb.epoch] += sb.units.tolist()
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(50))
    assert seen[0] != seen[1]  # reshuffled per epoch


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, algorithm="swift", **{"batch.grad_accum": 3, "model.gradient_checkpointing": True})
    res = train(cfg)
    ref_loss, expected = reference_step(cfg, res.tokenizer)
    assert res.losses[0] == pytest.approx(ref_loss, rel=1e-5)
    assert_params_close(res, expected)


def test_pretokenized_rows_without_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tok.jsonl"
    with open(path, "w") as f:
        for i in range(10):
            n = int(rng.integers(6, 20))
            mask = [0] * (n // 2) + [1] * (n - n // 2)
            f.write(json.dumps({"input_ids": rng.integers(1, 64, n).tolist(), "loss_mask": mask,
                                "reward": float(rng.random())}) + "\n")
    cfg = base_config(tmp_path, str(path), tokenizer="auto", steps=3, cpu_threads=1,
                      optim={"name": "adamw", "lr": 1e-3})
    res = train(cfg)
    assert res.tokenizer is None and len(res.losses) == 3
    assert os.path.isfile(os.path.join(res.final_model_path, "model.safetensors"))
    with pytest.raises(ConfigError, match="vocabulary"):
        train(cfg.replace(overwrite=True, **{"model.config": dict(MODEL, vocab_size=16)}))


def test_tensorboard_events_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, **{"steps": 2, "log.tensorboard": "true"})
    train(cfg)
    events = [f for f in os.listdir(tmp_path / "out" / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "out" / "tensorboard" / events[0]) > 0


@pytest.mark.parametrize("world,pad_to,row_dtype", [(1, None, np.int64), (2, None, np.int64), (3, 70, np.int32)])
def test_batches_deal_each_steps_rows_to_ranks_with_their_weights(world, pad_to, row_dtype):
    from types import SimpleNamespace as C

    from refit_fast.train.data import Batches

    rng = np.random.default_rng(world)
    convs = [C(id=str(i), input_ids=rng.integers(0, 50, n), loss_mask=np.r_[0, np.ones(n - 1, int)], reward=float(i),
               prompt_key="p") for i, n in enumerate(rng.integers(3, 40, 41))]
    data = TrainData.from_tokenized(convs)
    s = Schedule(data, *make_units(data), max_tokens=64, rows_per_step=world * 2, seed=3, epochs=2)
    ranks = [Batches(s, world_size=world, rank=r, weighting=lambda conv, stats: data.rewards[conv], pad_to=pad_to,
                     row_dtype=row_dtype) for r in range(world)]
    for k in range(s.total_steps):
        steps = [b.step(k) for b in ranks]
        sb = s.step_batch(k)
        assert len({len(st.micro) for st in steps}) == 1  # every rank runs the same number of micro-steps
        seen = []
        for st in steps:
            assert st.rows == len(sb.rows) and st.tokens == int(sb.loads.sum())
            assert st.stats.n_units == len(sb.units)
            for mb in st.micro:
                if mb is None:
                    continue
                row, cu = mb.row, mb.row["cu_seqlens"].tolist()
                assert row["input_ids"].dtype == torch.int64 and (pad_to is None or len(row["input_ids"]) == pad_to)
                for j, i in enumerate(mb.weights64.long().tolist()):  # weight = reward = conversation index
                    ids, _ = data.flat.conversation(i)
                    assert row["input_ids"][cu[j]:cu[j + 1]].tolist() == ids.tolist()
                    assert (row["seq_ids"][cu[j]:cu[j + 1]] == j).all()  # local ids
                assert (row["seq_ids"][cu[len(mb.weights64)]:] == -1).all()  # padding, if any
                seen += mb.weights64.long().tolist()
        assert sorted(seen) == sorted(np.concatenate(sb.items).tolist())  # the step's rows, each on one rank


@pytest.mark.parametrize("algorithm", ["swift", "dpo"])
def test_packer_options_from_the_config_give_the_same_step(tmp_path, algorithm):
    data = write_grouped_data(tmp_path / "g.jsonl")
    over = {"batch.max_tokens": 80, "batch.grad_accum": 8}
    plain = train(base_config(tmp_path, data, algorithm=algorithm, output_dir=str(tmp_path / "plain"), **over))
    cfg = base_config(tmp_path, data, algorithm=algorithm, output_dir=str(tmp_path / "padded"),
                      **over, **{"batch.pad_to": 85, "batch.row_dtype": "int32"})
    padded = train(cfg)
    assert padded.metrics[0]["rows"] == plain.metrics[0]["rows"] > 1
    assert padded.losses[0] == pytest.approx(plain.losses[0], rel=1e-6, abs=1e-7)
    _, expected = reference_step(cfg, padded.tokenizer)
    assert_params_close(padded, expected)


def test_overlong_truncate_turns_trains_the_cut_conversations(tmp_path, capsys):
    from refit_fast.packing import truncate_turns

    data = write_data(tmp_path / "d.jsonl", n=12, answer_len=(2, 12))
    full = train(base_config(tmp_path, data, output_dir=str(tmp_path / "full"), steps=None,
                             **{"batch.max_tokens": 1024, "optim.lr": 0.0}))
    convs, _ = load_tokenized(data, full.tokenizer, progress=False)
    lengths = [len(c.input_ids) for c in convs]
    budget = sorted(lengths)[len(lengths) // 2]  # about half the conversations are longer
    expected, cut = 0, 0
    for c in convs:  # by hand, one conversation at a time: drop the oldest exchanges until it fits
        mask = np.asarray(c.loss_mask)
        ranges = truncate_turns(mask, budget)
        assert ranges is not None  # the final exchange always fits this budget
        kept = np.concatenate([mask[a:b] for a, b in ranges])
        expected += int(kept[1:].sum())
        cut += len(kept) < len(mask)
    assert 0 < cut < len(convs)
    over = {"batch.max_tokens": budget, "optim.lr": 0.0, "log.quiet": False}
    dropped = train(base_config(tmp_path, data, output_dir=str(tmp_path / "drop"), steps=None, **over))
    assert sum(m["conversations"] for m in dropped.metrics) == len(convs) - cut
    capsys.readouterr()
    res = train(base_config(tmp_path, data, output_dir=str(tmp_path / "cut"), steps=None,
                            **over, **{"data.overlong": "truncate_turns"}))
    assert sum(m["conversations"] for m in res.metrics) == len(convs)
    assert sum(m["trained_tokens"] for m in res.metrics) == expected
    assert f"(0 over max_tokens dropped, {cut} truncated to fit" in capsys.readouterr().out


def test_model_dtype_is_kept_and_saved(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, output_dir=str(tmp_path / "bf16"), **{"model.dtype": "bfloat16", "optim.lr": 1e-3})
    res = train(cfg)
    assert math.isfinite(res.losses[0])
    saved = json.load(open(os.path.join(res.final_model_path, "config.json")))
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    # auto: the dtype the starting model was saved in; float32 (the default) converts it
    for setting, want in (("auto", torch.bfloat16), ("float32", torch.float32)):
        again = train(base_config(tmp_path, data, output_dir=str(tmp_path / setting), **{
            "model.config": None, "model.init_from": res.final_model_path, "model.dtype": setting, "tokenizer": "auto"}))
        got = load_model(again.final_model_path, attn_backend=None, dtype=None, local_files_only=True)
        assert {p.dtype for p in got.parameters()} == {want}, setting
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(cfg.to_dict(), ["model.dtype=float8"])


def test_conversations_longer_than_the_position_table_are_refused(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    cfg = base_config(tmp_path, data, **{"model.config": dict(MODEL, max_position_embeddings=20), "batch.max_tokens": 96})
    with pytest.raises(ConfigError, match=r"longer than the model's max_position_embeddings=20, e\.g\. c\d+ \(\d+ tokens\)"):
        train(cfg)
    # with max_tokens within the table, the over-long ones are the packer's to drop
    res = train(cfg.replace(**{"batch.max_tokens": 20, "steps": None, "optim.lr": 1e-3}))
    assert sum(m["conversations"] for m in res.metrics) < 12
