"""Two gloo processes on CPU give the same losses and the same updated parameters as one process on the
same step batches (DDP by default, FSDP2 as an option), for Refit and Swift (its default group
statistics, which are fixed per conversation, and the step statistics, which every rank computes from
the step plan), including Swift's loss_pos / loss_neg all-reduced over ranks.

The step batch is ``world_size x grad_accum`` rows: 2 ranks x grad_accum 2 here against 1 process x
grad_accum 4, over two steps, the second of which has an odd number of rows (one rank then runs an
empty micro-step). SGD with a large learning rate makes any gradient difference show in the weights.
FSDP2 checkpoints are also checked to resume bit for bit.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

from test_train import MODEL, write_data  # noqa: E402

from refit_fast.model import load_model  # noqa: E402
from refit_fast.train import TrainConfig, train  # noqa: E402

CASES = [("refit", "ddp", None), ("swift", "ddp", "step"), ("swift", "ddp", "group"), ("swift", "fsdp", "group")]


def _config(tmp, data, algorithm, mode, out, grad_accum, swift_stats="group"):
    return {
        "algorithm": algorithm,
        "objective": {"swift_stats": swift_stats or "group"},
        "distributed": mode,
        "output_dir": out,
        "data": {"path": data},
        "tokenizer": "word",
        "model": {"config": MODEL},
        "batch": {"max_tokens": 64, "grad_accum": grad_accum},
        "steps": 2,
        "device": "cpu",
        "optim": {"name": "sgd", "lr": 0.5, "grad_clip": 0.0},
        "log": {"quiet": True, "progress": "false", "tensorboard": "false"},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp, data, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        for algorithm, mode, stats in cases:
            out = os.path.join(tmp, f"dist-{algorithm}-{mode}-{stats}")
            res = train(TrainConfig.from_dict(_config(tmp, data, algorithm, mode, out, grad_accum=2, swift_stats=stats)))
            if rank == 0:
                with open(os.path.join(out, "losses.json"), "w") as f:
                    json.dump({"losses": res.losses, "metrics": res.metrics}, f)
        # FSDP2 checkpoints (full state dicts gathered on rank 0) resume bit for bit: 4 steps vs 2 + 2
        adamw = {"optim": {"name": "adamw", "lr": 1e-2, "warmup_steps": 1}, "steps": 4}
        straight = train(TrainConfig.from_dict({**_config(tmp, data, "swift", "fsdp", f"{tmp}/fa", 1), **adamw}))
        c = TrainConfig.from_dict({**_config(tmp, data, "swift", "fsdp", f"{tmp}/fb", 1), **adamw})
        first = train(c, on_step=lambda m: m["step"] == 2)
        second = train(c.replace(resume=True))
        if rank == 0:
            with open(os.path.join(tmp, "fsdp_resume.json"), "w") as f:
                json.dump({"straight": straight.losses, "resumed": first.losses + second.losses}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _assert_same_model(path_a, path_b):
    a = load_model(path_a, attn_backend=None, local_files_only=True).state_dict()
    b = load_model(path_b, attn_backend=None, local_files_only=True).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_two_gloo_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    data = write_data(tmp_path / "d.jsonl", n=19)
    tmp = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), tmp, data, CASES), nprocs=2, join=True)
    for algorithm, mode, stats in CASES:
        name = f"{algorithm}-{mode}-{stats}"
        one = train(TrainConfig.from_dict(_config(tmp, data, algorithm, "ddp", f"{tmp}/one-{name}", grad_accum=4,
                                                  swift_stats=stats)))
        with open(f"{tmp}/dist-{name}/losses.json") as f:
            dist_res = json.load(f)
        rows = [m["rows"] for m in one.metrics]
        assert rows == [m["rows"] for m in dist_res["metrics"]] and rows[1] % 2 == 1, rows  # step 2: odd row count
        assert dist_res["losses"] == pytest.approx(one.losses, rel=1e-5, abs=1e-6), name
        for key in ("loss_pos", "loss_neg", "zero_weight", "weight_mean", "weight_std"):  # the last step logs the parts
            if key in one.metrics[-1]:
                assert dist_res["metrics"][-1][key] == pytest.approx(one.metrics[-1][key], rel=1e-5, abs=1e-6), (name, key)
        assert ("loss_pos" in one.metrics[-1]) == (algorithm == "swift")
        _assert_same_model(f"{tmp}/dist-{name}/final", one.final_model_path)
    with open(f"{tmp}/fsdp_resume.json") as f:
        r = json.load(f)
    assert len(r["straight"]) == 4 and r["resumed"] == r["straight"]


def test_torchrun_cli_entry_point(tmp_path):
    data = write_data(tmp_path / "d.jsonl", n=19)
    tmp = str(tmp_path)
    import yaml

    cfg = _config(tmp, data, "refit", "ddp", f"{tmp}/tr", grad_accum=2)
    with open(f"{tmp}/c.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "refit_fast.train", f"{tmp}/c.yaml", "log.quiet=false", "log.every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout
    one = train(TrainConfig.from_dict(_config(tmp, data, "refit", "ddp", f"{tmp}/one", grad_accum=4)))
    lines = [json.loads(x) for x in open(f"{tmp}/tr/metrics.jsonl")]
    assert [x["loss"] for x in lines] == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    _assert_same_model(f"{tmp}/tr/final", one.final_model_path)


def _fake_cuda_ranks(monkeypatch, world, local_rank, devices=2):
    """CUDA and NCCL faked on CPU: records the device each call picks instead of touching a GPU."""
    import torch.distributed as dist

    from refit_fast.train import distributed as rd

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", torch.device(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.setdefault("init", kw))
    monkeypatch.setattr(dist, "get_rank", lambda: local_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    return rd, seen


@pytest.mark.parametrize("device", ["cuda:0", "cuda", "auto"])
def test_torchrun_rank_takes_its_local_gpu_even_with_an_explicit_index(monkeypatch, device):
    """#14: device='cuda:0' under torchrun put every rank on GPU 0; each rank now uses cuda:LOCAL_RANK."""
    import warnings

    rd, seen = _fake_cuda_ranks(monkeypatch, world=2, local_rank=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        env = rd.setup_distributed(device)
    assert env.device == torch.device("cuda:1") and seen["set_device"] == torch.device("cuda:1")
    assert seen["init"]["backend"] == "nccl" and seen["init"]["device_id"] == torch.device("cuda:1")
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    warned = any("LOCAL_RANK=1 uses cuda:1" in str(x.message) for x in w)
    assert warned == (device == "cuda:0")  # only an index that is not the rank's own is worth a warning


def test_single_process_keeps_an_explicit_gpu_index(monkeypatch):
    rd, seen = _fake_cuda_ranks(monkeypatch, world=1, local_rank=0)
    env = rd.setup_distributed("cuda:1")
    assert env.device == torch.device("cuda:1") and env.backend is None and "init" not in seen


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    rd, _ = _fake_cuda_ranks(monkeypatch, world=4, local_rank=3, devices=2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but only 2 CUDA device"):
        rd.setup_distributed("cuda")
