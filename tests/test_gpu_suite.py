"""The GPU suite's machinery on CPU: it refuses to measure without CUDA, renders results, and runs every part's
code path at tiny sizes (DEVICE="cpu", a tiny LLAMA_1B) so a GPU session spends no device time on bugs:
failing contenders become error lines and the next one runs, JSON lines are valid and on disk as soon as
written, the 1B model is built once per part on the part's device, and predictions are there or say why not.
The two device scripts are checked with `bash -n`."""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "gpu_suite_sample.json"
TINY = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True)


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def cpu_suite(monkeypatch, tmp_path):
    """The suite on CPU with a tiny model, recording JSON lines to tmp_path/results.jsonl, no perf_model."""
    suite = _load("run_gpu_suite")
    monkeypatch.setattr(suite, "DEVICE", "cpu")
    monkeypatch.setattr(suite, "LLAMA_1B", dict(TINY))
    monkeypatch.setattr(suite, "RESULTS", tmp_path / "results")
    monkeypatch.setitem(sys.modules, "perf_model", None)  # import fails: the "no prediction" path
    rec = suite.Recorder(tmp_path / "results.jsonl")
    monkeypatch.setattr(suite, "RECORDER", rec)
    yield suite
    rec.close()


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]  # every line must be valid JSON


def _loss_args(**kw):
    base = dict(loss_n=[64], loss_d=32, loss_v=97, loss_dtype="float32", sets=2, only=None, skip=None, warmup=1, iters=2)
    return argparse.Namespace(**{**base, **kw})


def _fake_perf_model(monkeypatch, calls):
    class Prediction:
        def __init__(self, n, d, v):
            self.floor_ms = 6 * n * d * v / 790e12 * 1e3
            self.total_ms = 2 * self.floor_ms
            self.fraction = 0.5
            self.components = {"matmul": self.floor_ms, "softmax": self.floor_ms}

        def as_dict(self):
            return dict(total_ms=self.total_ms, floor_ms=self.floor_ms, fraction=self.fraction,
                        components=self.components)

    def predict(n, d, v, *, device="h200", dtype="bf16", plan=None):
        calls.append((n, d, v, device, dtype))
        return Prediction(n, d, v)

    monkeypatch.setitem(sys.modules, "perf_model", types.SimpleNamespace(predict=predict))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_suite_refuses_without_cuda(capsys):
    assert _load("run_gpu_suite").main(["--parts", "loss"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_loss_bench_refuses_without_cuda(capsys):
    assert _load("bench_weighted_ce").main(["--n", "16"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_renders_sample_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    suite = _load("run_gpu_suite")
    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    md = suite.write_all(json.loads(SAMPLE.read_text()), "sample").read_text()
    assert "Sample GPU" in md and "## Loss kernel" in md and "## Trainer step" in md and "## Long context" in md
    assert "| refit_fast | 16384 | 4096 | 128256 | 110.00 |" in md
    assert "| naive_torch | 65536 | 4096 | 128256 | OOM |" in md
    assert "Speed-up: 1.60x tokens/s." in md
    assert "| 65536 | 60.0 GiB, 6.00 s | OOM |" in md
    png = tmp_path / "sample.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "sample.json").read_text())["environment"]["device"] == "Sample GPU"


def test_synthetic_conversations_look_like_chat():
    suite = _load("run_gpu_suite")
    convs = suite.synthetic_conversations(300, 1000, seed=3, cap=4096)
    lengths = sorted(len(ids) for ids, _ in convs)
    assert 300 < lengths[150] < 1200 and lengths[-1] <= 4096
    for ids, mask in convs:
        assert len(ids) == len(mask) and mask[0] == 0 and 0 < mask.mean() < 1 and ids.max() < 1000
    batches = suite.padded_batches(convs[:50], 8192)
    assert sum(len(b["input_ids"]) for b in batches) == 50
    assert all(b["input_ids"].numel() <= 8192 or len(b["input_ids"]) == 1 for b in batches)


# ---------------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------------
def test_json_lines_are_valid_and_on_disk_as_soon_as_written(tmp_path):
    suite = _load("run_gpu_suite")
    rec = suite.Recorder(tmp_path / "sub" / "r.jsonl")
    rec.write(dict(part="loss", method="a", median_s=float("nan"), extra=float("inf"), dev=torch.device("cpu")))
    # read back through another handle while the writer is still open: flushed per line
    first = _lines(tmp_path / "sub" / "r.jsonl")
    assert len(first) == 1 and first[0]["median_s"] is None and first[0]["extra"] is None and first[0]["dev"] == "cpu"
    rec.write(dict(part="loss", method="b", nested={"x": [1.0, float("-inf")]}))
    assert [r["method"] for r in _lines(tmp_path / "sub" / "r.jsonl")] == ["a", "b"]
    rec.close()
    with open(tmp_path / "sub" / "r.jsonl", "a") as f:
        f.write('{"part": "loss", "meth')  # a run killed mid-line
    assert [r["method"] for r in suite.read_jsonl(tmp_path / "sub" / "r.jsonl")] == ["a", "b"]


def test_a_cut_run_keeps_what_it_wrote(tmp_path):
    """SIGTERM (the step's `timeout`) mid-run: the finished test's line is there, plus a 'terminated' line."""
    tdir = tmp_path / "t"
    tdir.mkdir()
    (tdir / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                      "def test_slow():\n    time.sleep(60)\n")
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "run_gpu_suite.py"), "--parts", "tests",
                             "--jsonl", str(out), "--pytest-args", str(tdir)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if out.exists() and "test_quick" in out.read_text():
                break
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    proc.stdout.close()
    assert proc.returncode == 124, log[-2000:]
    lines = _lines(out)
    tests = [r for r in lines if r.get("event") == "test"]
    assert [(r["nodeid"].split("::")[-1], r["outcome"]) for r in tests] == [("test_quick", "passed")]
    assert lines[-1]["event"] == "terminated"


# ---------------------------------------------------------------------------------------------------
# the loss part
# ---------------------------------------------------------------------------------------------------
def test_failing_contenders_become_error_lines_and_the_next_still_runs(cpu_suite, tmp_path, monkeypatch):
    suite = cpu_suite

    def run_time_error():
        def fn(h, W, y):
            raise RuntimeError("kernel exploded")
        return fn

    def oom():
        def fn(h, W, y):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return fn

    def broken_import():
        raise OSError("libcuda.so.1: cannot open shared object file")  # not an ImportError at all

    def not_installed():
        raise ModuleNotFoundError("No module named 'liger_kernel'", name="liger_kernel")

    def missing_dependency():  # the package is there, one of its own imports is not: an error, not a skip
        raise ModuleNotFoundError("No module named 'cutlass'", name="cutlass")

    contenders = (("weighted_ce", "refit_fast", suite._make_weighted_ce), ("boom", None, run_time_error),
                  ("oom", None, oom), ("broken", None, broken_import), ("liger", "liger_kernel", not_installed),
                  ("quack", "quack", missing_dependency), ("naive_torch", None, lambda: suite._naive))
    monkeypatch.setattr(suite, "loss_contenders", lambda: contenders)
    res = suite.part_loss(_loss_args(loss_n=[64, 96]))
    got = [(r["N"], r["method"], r["status"], r.get("stage")) for r in res["rows"]]
    assert got == [(n, m, s, st) for n in (64, 96) for m, s, st in (
        ("weighted_ce", "ok", None), ("boom", "error", "run"), ("oom", "OOM", "run"), ("broken", "error", "import"),
        ("liger", "skipped", None), ("quack", "error", "import"), ("naive_torch", "ok", None))]
    rows = {r["method"]: r for r in res["rows"] if r["N"] == 64}
    assert rows["boom"]["error"] == "RuntimeError: kernel exploded" and "OSError: libcuda" in rows["broken"]["error"]
    assert rows["liger"]["reason"] == "liger_kernel is not installed" and "cutlass" in rows["quack"]["error"]
    for m in ("weighted_ce", "naive_torch"):
        assert rows[m]["median_s"] > 0 and rows[m]["loss_rel_err"] < 1e-4, rows[m]
    lines = _lines(tmp_path / "results.jsonl")  # all valid JSON, one per row, in order
    assert [(r["N"], r["method"]) for r in lines if r.get("method")] == [(r["N"], r["method"]) for r in res["rows"]]
    assert all(r["prediction"] is None and r["prediction_note"].startswith("no prediction") for r in res["rows"])


def test_default_contenders_on_cpu_run_or_say_why_not(cpu_suite, capsys):
    suite = cpu_suite
    res = suite.part_loss(_loss_args())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["weighted_ce", "torch_lce_reference", "torch_lce_chunked", "liger", "cce", "cce_exact",
                          "quack", "naive_torch", "torch_compile"]
    for m in ("weighted_ce", "naive_torch"):
        assert rows[m]["status"] == "ok" and rows[m]["loss_rel_err"] < 1e-4
    for m in ("torch_lce_reference", "torch_lce_chunked"):  # PyTorch's own fused loss where this torch has it
        if hasattr(torch.nn.functional, "linear_cross_entropy"):
            assert rows[m]["status"] == "ok" and rows[m]["loss_rel_err"] < 1e-4, rows[m]
        else:
            assert rows[m]["status"] == "skipped" and "linear_cross_entropy" in rows[m]["reason"]
    for m in ("liger", "cce", "cce_exact", "quack", "torch_compile"):
        assert rows[m]["status"] == "skipped" and "CUDA only" in rows[m]["reason"]
    out = capsys.readouterr().out
    assert "[loss]            weighted_ce N=    64" in out and "no prediction" in out


def test_torch_fused_loss_is_skipped_with_a_reason_where_torch_lacks_it(cpu_suite, monkeypatch):
    suite = cpu_suite
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    res = suite.part_loss(_loss_args(only=["torch_lce_reference", "torch_lce_chunked", "naive_torch"]))
    got = [(r["method"], r["status"]) for r in res["rows"]]
    assert got == [("torch_lce_reference", "skipped"), ("torch_lce_chunked", "skipped"), ("naive_torch", "ok")]
    assert "has no torch.nn.functional.linear_cross_entropy" in res["rows"][0]["reason"]


def test_prediction_is_printed_beside_every_measurement(cpu_suite, monkeypatch, capsys):
    suite = cpu_suite
    calls = []
    _fake_perf_model(monkeypatch, calls)
    res = suite.part_loss(_loss_args(only=["weighted_ce", "naive_torch"], loss_n=[64, 128]))
    assert calls == [(64, 32, 97, "h200", "fp32"), (128, 32, 97, "h200", "fp32")]  # once per N
    for r in res["rows"]:
        assert r["predicted_ms"] == pytest.approx(2 * r["predicted_floor_ms"])
        assert r["prediction"]["components"].keys() == {"matmul", "softmax"}
        assert r["measured_over_predicted"] == pytest.approx(r["median_s"] * 1e3 / r["predicted_ms"])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("[loss]") and "N=" in x]
    assert len(lines) == 4 and all("pred " in x and "floor" in x for x in lines)


def test_a_broken_predictor_does_not_stop_the_suite(cpu_suite, monkeypatch):
    suite = cpu_suite

    def predict(n, d, v, **kw):
        raise ValueError("unknown device 'h200'")

    monkeypatch.setitem(sys.modules, "perf_model", types.SimpleNamespace(predict=predict))
    res = suite.part_loss(_loss_args(only=["naive_torch"]))
    assert res["rows"][0]["status"] == "ok" and "ValueError: unknown device" in res["rows"][0]["prediction_note"]


def test_the_real_perf_model_keeps_the_contract_the_suite_uses(monkeypatch, capsys):
    if not (ROOT / "benchmarks" / "perf_model.py").exists():
        pytest.skip("benchmarks/perf_model.py not written yet")
    suite = _load("run_gpu_suite")
    monkeypatch.delitem(sys.modules, "perf_model", raising=False)
    monkeypatch.setattr(suite, "RECORDER", suite.Recorder(None))
    fields = suite.predict_fields(8192, 4096, 128256, "bf16", measured_ms=50.0)
    assert fields["predicted_ms"] >= fields["predicted_floor_ms"] > 0 and 0 < fields["predicted_fraction"] <= 1 + 1e-9
    assert isinstance(fields["prediction"]["components"], dict) and json.dumps(fields["prediction"])
    assert fields["measured_over_predicted"] == pytest.approx(50.0 / fields["predicted_ms"])
    assert "pred " in suite._fmt_pred(fields)


# ---------------------------------------------------------------------------------------------------
# the trainer and long-context parts: one model per part, built on the device
# ---------------------------------------------------------------------------------------------------
def test_trainer_and_long_context_parts_run_on_cpu_building_the_model_once_per_part(cpu_suite, monkeypatch, tmp_path):
    """The GPU parts' code paths (packing, our step, the HF padded step, long rows) on CPU with a tiny Llama
    in place of the 1B one; the model is built once per part, not once per contender and row length."""
    import refit_fast.model as rm

    suite = cpu_suite
    builds = []
    real = rm.build_model_from_config

    def counting(*a, **kw):
        builds.append((kw.get("device"), str(torch.get_default_device())))
        return real(*a, **kw)

    monkeypatch.setattr(rm, "build_model_from_config", counting)
    args = argparse.Namespace(row_tokens=256, trainer_convs=20, warmup=1, iters=2, long_t=[128, 256])
    trainer = suite.part_trainer(args)
    assert len(builds) == 1 and builds[0][0] is None  # no `device=`: not built elsewhere and copied
    assert [r["method"].split(" ")[0] for r in trainer["rows"]] == ["refit_fast", "Hugging"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and 0 < r["tokens_per_step"] <= 256 for r in trainer["rows"])
    long = suite.part_long_context(args)
    assert len(builds) == 2
    assert [(r["method"], r["T"], r["status"]) for r in long["rows"]] == [
        ("refit_fast", 128, "ok"), ("hf", 128, "ok"), ("refit_fast", 256, "ok"), ("hf", 256, "ok")]
    lines = _lines(tmp_path / "results.jsonl")
    assert [r["part"] for r in lines if r.get("event") == "model"] == ["build", "build"]
    assert [r["method"] for r in lines if r.get("part") == "trainer"] == [r["method"] for r in trainer["rows"]]
    assert all("prediction_note" in r for r in trainer["rows"] + long["rows"])


def test_each_contender_starts_from_the_same_weights(cpu_suite):
    suite = cpu_suite
    model = suite.build_1b(grad_ckpt=False)
    weights = suite.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    seen = []

    def fn_of_opt(opt):
        return lambda: seen.append(next(model.parameters()).detach().clone())

    rec = suite._measure("trainer", model, weights, "hf", fn_of_opt, 0, 1, suite.Deadline(None), method="x")
    assert rec["status"] == "ok" and torch.equal(seen[0], next(iter(weights.values())))
    assert model.config._attn_implementation == "sdpa"
    suite._measure("trainer", model, weights, "refit", fn_of_opt, 0, 1, suite.Deadline(None), method="y")
    assert model.config._attn_implementation == "refit_varlen"


def test_the_model_is_initialized_directly_on_the_parts_device(monkeypatch):
    """build_1b makes the weights inside `torch.device(DEVICE)` (here "meta" stands in for the GPU)."""
    import refit_fast.model as rm

    suite = _load("run_gpu_suite")
    monkeypatch.setattr(suite, "DEVICE", "meta")
    monkeypatch.setattr(suite, "RECORDER", suite.Recorder(None))
    seen = {}

    def fake_build(config, **kw):
        seen.update(kw, default=str(torch.get_default_device()))
        return torch.nn.Linear(4, 4)

    monkeypatch.setattr(rm, "build_model_from_config", fake_build)
    model = suite.build_1b(grad_ckpt=False)
    assert seen["default"] == "meta" and "device" not in seen and model.weight.device.type == "meta"


def test_trainer_contender_failure_is_a_line_and_the_next_runs(cpu_suite, monkeypatch):
    suite = cpu_suite

    def exploding(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    monkeypatch.setattr(suite, "step_refit", exploding)
    args = argparse.Namespace(row_tokens=256, trainer_convs=20, warmup=1, iters=1, long_t=[128])
    rows = suite.part_trainer(args)["rows"]
    assert [r["status"] for r in rows] == ["OOM", "ok"] and "fake" in rows[0]["error"]


def test_out_of_time_parts_skip_the_rest_with_a_line(cpu_suite):
    suite = cpu_suite
    res = suite.part_loss(_loss_args(only=["naive_torch", "weighted_ce"]), suite.Deadline(1e-9))
    assert [(r["method"], r["status"]) for r in res["rows"]] == [("weighted_ce", "skipped"), ("naive_torch", "skipped")]
    assert "out of time" in res["rows"][0]["reason"]


# ---------------------------------------------------------------------------------------------------
# the tests part, the summary, the scripts
# ---------------------------------------------------------------------------------------------------
def test_tests_part_streams_one_line_per_test_and_runs_the_memory_test_first(cpu_suite, tmp_path, monkeypatch):
    suite = cpu_suite
    tdir = tmp_path / "t"
    tdir.mkdir()
    (tdir / "test_a.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\ndef test_gpu_ok():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_gpu_bad():\n    assert 1 == 2\n\n"
        "@pytest.mark.gpu\ndef test_gpu_skip():\n    pytest.skip('no CUDA here')\n\n"
        "def test_unmarked_but_needs_cuda():\n    pass\n\n"
        "def test_plain_cpu():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_memory():\n    pass\n")
    (tdir / "conftest.py").write_text("def pytest_configure(config):\n"
                                      "    config.addinivalue_line('markers', 'gpu: needs CUDA')\n")
    monkeypatch.setattr(suite, "GPU_EXTRA", ("test_a.py::test_unmarked_but_needs_cuda",))
    monkeypatch.setattr(suite, "RUN_FIRST", ("test_a.py::test_memory",))
    args = argparse.Namespace(pytest_args=["-m", "gpu", str(tdir), "--rootdir", str(tdir)], test_timeout=None)
    summary = suite.part_tests(args)
    assert summary["exit_code"] == 1 and (summary["passed"], summary["failed"], summary["skipped"]) == (3, 1, 1)
    tests = [r for r in _lines(tmp_path / "results.jsonl") if r.get("event") == "test"]
    assert [(r["nodeid"].split("::")[-1], r["outcome"]) for r in tests] == [
        ("test_memory", "passed"), ("test_gpu_ok", "passed"), ("test_gpu_bad", "failed"),
        ("test_gpu_skip", "skipped"), ("test_unmarked_but_needs_cuda", "passed")]
    assert "assert 1 == 2" in tests[2]["error"] and "no CUDA here" in tests[3]["reason"]
    table = suite.summary_table(_lines(tmp_path / "results.jsonl"))
    assert "FAILED" in table and "test_gpu_bad" in table and "not validated" in table


def test_summary_folds_the_session_lines_into_json_md_and_png(cpu_suite, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    suite = cpu_suite
    suite.RECORDER.write(dict(part="meta", event="environment", environment=dict(device="Tiny CPU", date="2026-12-02",
                                                                                  torch="2.x")))
    suite.RECORDER.write(dict(part="session", event="step", step="loss_8192", status="ok", seconds=12, timeout_s=90))
    suite.part_loss(_loss_args(only=["weighted_ce", "naive_torch"]))
    suite.RECORDER.write(dict(part="trainer", event="part_args", row_tokens=256))
    suite.part_trainer(argparse.Namespace(row_tokens=256, trainer_convs=20, warmup=1, iters=1))
    suite.RECORDER.close()
    assert suite.main(["--summary", str(tmp_path / "results.jsonl"), "--out", "s"]) == 0
    md = (tmp_path / "results" / "s.md").read_text()
    assert "Tiny CPU" in md and "| weighted_ce | 64 | 32 | 97 |" in md and "no prediction" in md
    assert "## Trainer step" in md and "256 tokens per step" in md and "| loss_8192 | ok | 12 | 90 |" in md
    assert (tmp_path / "results" / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "loss_8192            ok" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["gpu_session.sh", "gpu_long_context.sh"])
def test_device_scripts_parse(script):
    path = ROOT / "benchmarks" / script
    assert path.exists(), script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_session_script_gives_each_step_its_own_limit_and_streams_step_lines(tmp_path):
    """gpu_session.sh with a stub python3: a step that hangs is ended at its own limit (its process group
    too), the steps after it still run with their caps, and every step leaves a valid JSON line."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "python3"
    stub.write_text('#!/usr/bin/env bash\ncase "$*" in *find_spec*) sleep 60;; esac\necho "stub: $*"\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    caps = "install:5 build:5 tests:5 loss_8192:5 loss_32768:5 trainer:5 summary:1"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", OUT=str(out), BUDGET_S="31",
               SESSION_CAPS=caps)
    t = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert took < 25, f"{took:.0f} s: the hung step was not ended at its limit"
    steps = [r for r in _lines(out / "results.jsonl") if r.get("event") == "step"]
    assert [(r["step"], r["status"]) for r in steps] == [
        ("install", "timeout"), ("build", "ok"), ("tests", "ok"), ("loss_8192", "ok"), ("loss_32768", "ok"),
        ("trainer", "ok")]
    assert steps[0]["timeout_s"] <= 5 and all(r["timeout_s"] >= 5 for r in steps[1:])
    log = (out / "session.log").read_text()
    assert "--parts tests --pytest-args -m gpu tests" in log and "--parts loss --loss-n 32768" in log
    assert "stub: benchmarks/run_gpu_suite.py --summary" in proc.stdout
