"""The trainer under failure (issue #12): resume never runs code from a checkpoint, overwrite destroys
nothing before the new run is known to start, a torn or full metrics file and a full disk end cleanly,
a resume with changed settings is refused, and collectives have a bounded timeout."""
import errno
import json
import os
import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from refit_fast.train import ConfigError, train
from refit_fast.train import checkpoint as ckpt_mod
from refit_fast.train import metrics as metrics_mod
from test_train import adamw_config, write_data


class _WritesMarker:
    """Unpickling this calls os.system: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["rng-rank0.pt", "optimizer.pt", "scheduler.pt"])
def test_resume_refuses_a_crafted_pickle_without_running_it(tmp_path, name):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg, on_step=lambda m: m["step"] == 2)
    last = ckpt_mod.latest_checkpoint(cfg.output_dir)
    marker = tmp_path / "marker"
    torch.save(_WritesMarker(marker), os.path.join(last, name))
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match=rf"refusing to load .*checkpoint-2/{name}.*posix.system"):
        train(cfg.replace(resume=True))
    assert not marker.exists()


def test_rng_state_files_of_older_checkpoints_still_load(tmp_path):
    # before: np.random.get_state() (a tuple holding a NumPy array) was pickled as is
    np.random.seed(3)
    import random

    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "rng-rank0.pt")
    expected = np.random.rand()
    np.random.seed(4)
    ckpt_mod.restore_rng(ckpt_mod.load_rng(str(tmp_path), rank=1))  # rank 1 falls back to rank 0's file
    assert np.random.rand() == expected


@pytest.mark.parametrize("broken", ["data.path", "model.init_from"])
def test_overwrite_with_a_bad_input_keeps_the_previous_run(tmp_path, broken):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg)
    before = {name: os.path.getsize(os.path.join(cfg.output_dir, name)) for name in ("metrics.jsonl", "config.yaml")}
    checkpoints = ckpt_mod.list_checkpoints(cfg.output_dir)
    if broken == "data.path":
        bad = cfg.replace(overwrite=True, **{"data.path": str(tmp_path / "typo.jsonl")})
    else:  # a folder that exists but holds no model
        os.makedirs(tmp_path / "empty")
        bad = cfg.replace(overwrite=True, **{"model.init_from": str(tmp_path / "empty")})
    with pytest.raises(Exception):
        train(bad)
    assert ckpt_mod.list_checkpoints(cfg.output_dir) == checkpoints
    assert {name: os.path.getsize(os.path.join(cfg.output_dir, name)) for name in before} == before
    assert train(cfg.replace(resume=True)).steps_run == []  # still resumable: it was complete


def test_a_torn_last_metrics_line_is_skipped_on_resume(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg, on_step=lambda m: m["step"] == 3)
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # the process died mid-line
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: skipped 1 unreadable line"):
        res = train(cfg.replace(resume=True))
    assert res.steps_run == [4, 5, 6]
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3, 4, 5, 6]


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_a_checkpoint_stops_with_the_path_and_keeps_the_last_one(tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run", **{"checkpoint.every": 2})
    real_save = torch.save
    monkeypatch.setattr(ckpt_mod.torch, "save", lambda obj, f, *a, **k: _no_space() if str(f).endswith(
        os.path.join("checkpoint-4.tmp", "optimizer.pt")) else real_save(obj, f, *a, **k))
    with pytest.raises(ckpt_mod.DiskFullError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint-4.tmp/optimizer.pt" in msg and "checkpoint-2" in msg and "resume=true" in msg
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoint-4.tmp"))  # the space is given back
    assert ckpt_mod.latest_checkpoint(cfg.output_dir).endswith("checkpoint-2")
    assert train(cfg.replace(resume=True)).steps_run == [3, 4, 5, 6]


def test_full_disk_during_metrics_leaves_no_torn_line(tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run", **{"checkpoint.every": 2})
    real_write = metrics_mod._write

    def write(fd, data):
        if b'"step": 4,' in data:  # half the line reaches the disk, then it is full
            real_write(fd, data[: len(data) // 2])
            _no_space()
        return real_write(fd, data)

    monkeypatch.setattr(metrics_mod, "_write", write)
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with pytest.raises(ckpt_mod.DiskFullError, match=rf"^disk full while writing {path} .*checkpoint-2, is intact"):
        train(cfg)
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3]
    monkeypatch.setattr(metrics_mod, "_write", real_write)
    assert train(cfg.replace(resume=True)).steps_run == [3, 4, 5, 6]
    assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3, 4, 5, 6]


def _fake_torchrun(monkeypatch, calls):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda **k: calls.append(k))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")


@pytest.mark.parametrize("env_value, seconds", [(None, 300.0), ("12.5", 12.5)])
def test_the_collective_timeout_reaches_init_process_group(monkeypatch, env_value, seconds):
    from refit_fast.train.distributed import setup_distributed

    if env_value is None:
        monkeypatch.delenv("REFIT_FAST_DIST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("REFIT_FAST_DIST_TIMEOUT", env_value)
    calls = []
    _fake_torchrun(monkeypatch, calls)
    env = setup_distributed("cpu")
    assert (env.rank, env.world_size) == (1, 2)
    assert [c["timeout"].total_seconds() for c in calls] == [seconds]


def test_a_bad_timeout_and_a_timed_out_collective_say_so(monkeypatch):
    import torch.distributed as dist

    from refit_fast.train.distributed import DistTimeoutError, all_reduce_sum, setup_distributed

    calls = []
    _fake_torchrun(monkeypatch, calls)
    monkeypatch.setenv("REFIT_FAST_DIST_TIMEOUT", "-1")
    with pytest.raises(ValueError, match="REFIT_FAST_DIST_TIMEOUT='-1': expected a positive number"):
        setup_distributed("cpu")
    monkeypatch.setenv("REFIT_FAST_DIST_TIMEOUT", "7")
    env = setup_distributed("cpu")

    def hung(*a, **k):
        raise dist.DistError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 7000ms for recv operation")

    monkeypatch.setattr(dist, "all_reduce", hung)
    with pytest.raises(DistTimeoutError, match=r"rank 1: an all-reduce did not complete within 7 s \(REFIT_FAST_DIST"):
        all_reduce_sum(torch.zeros(1), env)


@pytest.mark.parametrize("change, expected", [
    ({"seed": 1}, "seed: 0 -> 1"),
    ({"algorithm": "refit"}, "algorithm: 'swift' -> 'refit'"),
    ({"batch.max_tokens": 96}, "batch.max_tokens: 64 -> 96"),
    ({"optim.lr": 1e-3}, "optim.lr: 0.01 -> 0.001"),
    ("data file", "data.path: "),
    ("data contents", "data: a file's size or contents changed"),
])
def test_resume_with_changed_settings_is_refused(tmp_path, change, expected):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg, on_step=lambda m: m["step"] == 3)
    config_yaml = open(os.path.join(cfg.output_dir, "config.yaml")).read()
    if change == "data file":
        change = {"data.path": write_data(tmp_path / "other.jsonl", n=20, seed=1)}
    elif change == "data contents":
        write_data(tmp_path / "d.jsonl", n=20, seed=1)  # edited in place, same path
        change = {}
    with pytest.raises(ConfigError, match=r"resume: .*checkpoint-3 was trained with other settings \(.*" + re.escape(expected)):
        train(cfg.replace(resume=True, **change))
    assert open(os.path.join(cfg.output_dir, "config.yaml")).read() == config_yaml  # not overwritten


def test_resume_force_accepts_changes_and_records_them(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg, on_step=lambda m: m["step"] == 3)
    forced = cfg.replace(resume=True, seed=5)
    forced.resume = "force"  # what config.py parses from resume=force
    res = train(forced)
    assert res.steps_run == [4, 5, 6]
    lines = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[3]["resume_forced"] == ["seed: 0 -> 5"] and all("resume_forced" not in x for x in lines[4:])
    # the new checkpoints record the new settings: resuming them with seed=5 is a plain resume
    assert train(cfg.replace(resume=True, seed=5)).steps_run == []


def test_resume_of_an_older_checkpoint_compares_config_yaml(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=20)
    cfg = adamw_config(tmp_path, data, tmp_path / "run")
    train(cfg, on_step=lambda m: m["step"] == 3)
    state_file = os.path.join(ckpt_mod.latest_checkpoint(cfg.output_dir), ckpt_mod.STATE_FILE)
    state = json.load(open(state_file))
    del state["settings"]  # written before settings were saved in checkpoints
    json.dump(state, open(state_file, "w"))
    with pytest.raises(ConfigError, match=r"batch.grad_accum: 1 -> 2"):
        train(cfg.replace(resume=True, **{"batch.grad_accum": 2}))
    assert train(cfg.replace(resume=True)).steps_run == [4, 5, 6]


def test_final_word_tokenizer_reloads_unchanged_after_a_second_run(tmp_path):
    """A word tokenizer reused from init_from (reloaded through AutoTokenizer) is saved again with the
    files that make AutoTokenizer give it back unchanged, also beside a qwen2 model's config (the
    reload keeps save_word_tokenizer's auto_map, so final/ needs no special saving)."""
    from transformers import AutoTokenizer

    from test_train import base_config
    from refit_fast.model import tiny_config

    data = write_data(tmp_path / "d.jsonl")
    qwen = {**tiny_config("qwen2"), "vocab_size": 128}
    first = train(base_config(tmp_path, data, output_dir=str(tmp_path / "a"), **{"model.config": qwen}))
    second = train(base_config(tmp_path, data, output_dir=str(tmp_path / "b"), tokenizer="auto",
                               **{"model.config": {}, "model.init_from": first.final_model_path}))
    text = "which one ? " + " ".join(json.loads(open(data).readline())["messages"][3]["content"].split())
    want = first.tokenizer(text)["input_ids"]
    for path in (first.final_model_path, second.final_model_path):
        cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
        assert "auto_map" in cfg, path
        assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == want, path


def test_the_last_checkpoint_and_final_gather_a_sharded_model_once(tmp_path):
    # Under FSDP the full state is gathered from the shards (a collective over every parameter): the
    # checkpoint of the last step and final/ share one gather.
    from refit_fast.model import build_model_from_config, tiny_config
    from refit_fast.train.distributed import DistEnv
    from refit_fast.train.objectives import PackedCausalLM

    lm = PackedCausalLM(build_model_from_config(tiny_config("llama")))
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = ckpt_mod.Checkpointer(str(tmp_path), DistEnv(0, 1, 0, torch.device("cpu"), None), keep_last=2)
    ck.fsdp = True  # as if sharded: count the gathers, with the module's own state standing in for them
    gathers = []
    ck._model_state = lambda m: gathers.append(1) or {k: v.clone() for k, v in m.model.state_dict().items()}
    ck._optimizer_state = lambda m, o: o.state_dict()
    ck.save(lm, opt, sched, 3, {"epoch": 0})
    ck.save(lm, opt, sched, 4, {"epoch": 0}, final=True)
    final = ck.save_final(lm, None, step=4)
    assert len(gathers) == 2 and os.path.isfile(os.path.join(final, "model.safetensors"))
    fresh = build_model_from_config(tiny_config("llama"), seed=1)
    ckpt_mod.load_weights(fresh, final)  # the kept state was written whole, not consumed by the first save
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), lm.model.state_dict().values()))
    ck.save(lm, opt, sched, 5, {"epoch": 0})  # not marked final: a later final save gathers anew
    ck.save_final(lm, None, step=5)
    assert len(gathers) == 4
    assert ckpt_mod.read_trainer_state(ck.latest())["step"] == 5


def test_recover_interrupted_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-2.old", "checkpoint-3.tmp", "checkpoint-4.old", "final"):
        (tmp_path / name).mkdir()
    done = ckpt_mod.recover_interrupted_saves(str(tmp_path))
    # .old beside its checkpoint and .tmp are removed; a lone .old is the only copy and comes back
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "final"]
    assert len(done) == 3 and any("restored" in d and "checkpoint-4" in d for d in done)
