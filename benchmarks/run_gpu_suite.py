"""The GPU benchmark suite: one command, every number we quote, side by side in one process per part.

    python benchmarks/run_gpu_suite.py --parts tests                 # pytest -m gpu, one JSON line per test
    python benchmarks/run_gpu_suite.py --parts loss --loss-n 8192    # one part: tests | loss | trainer | long_context
    python benchmarks/run_gpu_suite.py --jsonl out/results.jsonl ... # stream every result as a JSON line
    python benchmarks/run_gpu_suite.py --summary out/results.jsonl   # JSON lines -> json, md, png (CPU ok)
    python benchmarks/run_gpu_suite.py --from-json benchmarks/results/X.json   # re-render md + png (CPU ok)

A device session runs it part by part through ``benchmarks/gpu_session.sh`` (tests, loss at N=8192 and
32768, trainer: one call) and ``benchmarks/gpu_long_context.sh`` (a second call).

Parts:
  tests         ``pytest -m gpu`` (the Triton kernels compiled for real), one JSON line per test; the
                memory-bound test runs first, where it is most exposed to what the process allocated before;
  loss          forward+backward of the linear head + cross-entropy, bf16, Llama-3's D=4096 V=128256 at
                each N of --loss-n, every contender side by side in one process: weighted_ce, PyTorch's
                F.linear_cross_entropy (reference and chunked, where this torch has it), Liger, Cut
                Cross-Entropy (default and exact: filter_eps=None), QuACK (when quack-kernels imports),
                naive PyTorch and torch.compile of it. A contender that fails (at import or run time, OOM
                included) is a JSON line with its error and the next one still runs;
  trainer       one optimizer step of a randomly initialized 1B-class Llama on packed rows (our model body
                + weighted_ce) against the same model trained the usual Hugging Face way (padded batches,
                `labels=` loss) on the same conversations: tokens/s, peak memory. The model is built once,
                directly on the GPU; each contender starts from the same weights and a fresh optimizer;
  long_context  the largest packed row (8k..128k tokens) that trains (fwd+bwd+AdamW, gradient
                checkpointing) with refit_fast vs the Hugging Face loss; again one model for the part.

Every measurement is printed beside the prediction of ``benchmarks/perf_model.py``
(``predict(n, d, v, device=, dtype=)``) when that module imports, and says "no prediction" otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(os.environ.get("REFIT_RESULTS_DIR") or Path(__file__).resolve().parent / "results")

# The device every part runs on; the CPU smoke tests set "cpu" (with a tiny LLAMA_1B) to exercise the code.
DEVICE = "cuda"

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)

TRAINER_CONFIG = "Llama 1B-class (D=2048, 16 layers, V=128256), bf16 autocast, AdamW"
LONG_CONFIG = "Llama 1B-class, V=128256, one packed row, gradient checkpointing, AdamW, bf16 autocast"

# pytest -m gpu: tests that need CUDA but carry no `gpu` marker yet are added to the selection, and the
# memory-bound test goes first (run first, it would also see the cuBLAS workspace and Triton's compile).
GPU_EXTRA = ("tests/test_reward_stats.py::test_group_on_cuda_matches_reference",)
RUN_FIRST = ("tests/test_weighted_ce_gpu.py::test_extra_memory_is_bounded_by_the_budget",)


# ---------------------------------------------------------------------------------------------
# JSON lines: every result is one line, flushed as soon as it exists (a run cut short keeps them)
# ---------------------------------------------------------------------------------------------
def _clean(x):
    """JSON-safe: non-finite floats become None (json would write NaN, which is not JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


class Recorder:
    """Appends one JSON object per line to ``path`` (if given), flushed and fsynced per line."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> dict:
        record = _clean(dict(record, ts=round(time.time(), 3)))
        if self._f is not None:
            self._f.write(json.dumps(record, sort_keys=False) + "\n")
            self._f.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._f.fileno())
        return record

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


RECORDER = Recorder(None)


def emit(record: dict) -> dict:
    """Record one result (JSON line) and print it readably."""
    rec = RECORDER.write(record)
    print(_fmt(rec), flush=True)
    return rec


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# predictions (benchmarks/perf_model.py, optional)
# ---------------------------------------------------------------------------------------------
def _predictor():
    """(predict, None), or (None, why) when perf_model cannot be imported."""
    try:
        from perf_model import predict
    except Exception as exc:  # missing, or broken at import: the suite still runs
        return None, f"perf_model not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return predict, None


def perf_device() -> str:
    """The device name perf_model knows ("h200", "h100", ...) for this run's GPU."""
    if DEVICE != "cuda":
        return "h200"
    import torch

    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else "h200"
    for known in ("h200", "h100", "a100", "b200"):
        if known in name:
            return known
    return name


def predict_fields(n: int, d: int, v: int, dtype: str = "bf16", measured_ms: float | None = None) -> dict:
    """The prediction for a loss head of [n, d] x [v, d] as record fields; never raises."""
    predict, why = _predictor()
    if predict is None:
        return dict(prediction=None, prediction_note=f"no prediction: {why}")
    try:
        p = predict(int(n), int(d), int(v), device=perf_device(), dtype=dtype)
        fields = dict(prediction=p.as_dict(), predicted_ms=float(p.total_ms), predicted_floor_ms=float(p.floor_ms),
                      predicted_fraction=float(p.fraction))
    except Exception as exc:
        return dict(prediction=None, prediction_note=f"no prediction: {type(exc).__name__}: {str(exc)[:160]}")
    if measured_ms:
        fields["measured_over_predicted"] = measured_ms / fields["predicted_ms"] if fields["predicted_ms"] else None
    return fields


def _fmt_pred(r: dict) -> str:
    if r.get("predicted_ms") is not None:
        s = f"pred {r['predicted_ms']:.2f} ms (floor {r['predicted_floor_ms']:.2f})"
        if r.get("measured_over_predicted"):
            s += f" x{r['measured_over_predicted']:.2f}"
        return s
    return "no prediction" if "prediction" in r else ""


def _fmt(r: dict) -> str:
    part = r.get("part", "?")
    if part == "tests":
        if r.get("event") == "test":
            return f"[tests] {r['outcome']:>7} {r['nodeid']} ({r.get('duration_s', 0):.1f} s)"
        return f"[tests] {json.dumps({k: v for k, v in r.items() if k not in ('part', 'ts')})}"
    if part == "loss" and r.get("method"):
        head = f"[loss] {r['method']:>22} N={r['N']:>6}"
        if r.get("status") == "ok":
            floor = f"{100 * r['floor_fraction']:5.1f}% of floor" if r.get("floor_fraction") is not None else "no floor"
            err = r.get("loss_rel_err")
            return (f"{head}  {r['median_s'] * 1e3:9.2f} ms  {r['tflops']:6.1f} TFLOP/s  {floor}  "
                    f"extra {r['extra_bytes'] / 2**20:9.1f} MiB  loss err {err if err is None else f'{err:.1e}'}  "
                    f"| {_fmt_pred(r)}")
        return f"{head}  {r.get('status')}: {r.get('error') or r.get('reason', '')}  | {_fmt_pred(r)}"
    if part in ("trainer", "long_context") and r.get("method"):
        where = f"T={r['T']}" if "T" in r else ""
        if r.get("status") == "ok":
            extra = f"{r['tokens_per_s']:.0f} tok/s " if "tokens_per_s" in r else ""
            return (f"[{part}] {r['method']} {where} {extra}step {r['step_s']:.3f} s peak {r['peak_gib']:.1f} GiB"
                    f"  | loss head {_fmt_pred(r)}")
        return f"[{part}] {r['method']} {where} {r.get('status')}: {r.get('error') or r.get('reason', '')}"
    return f"[{part}] " + json.dumps({k: v for k, v in r.items() if k not in ("part", "ts")})


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch
    import torch.nn.functional as F

    env = dict(date=_dt.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
               torch_linear_cross_entropy=hasattr(F, "linear_cross_entropy"))
    from importlib.metadata import version

    for mod, dist_name in (("triton", "triton"), ("liger_kernel", "liger-kernel"),
                           ("cut_cross_entropy", "cut-cross-entropy"), ("quack", "quack-kernels")):
        try:
            env[mod] = version(dist_name)
        except Exception:
            pass
    if DEVICE == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    else:
        env["device"] = platform.processor() or "cpu"
    _, why = _predictor()
    env["perf_model"] = "available" if why is None else why
    return env


# ---------------------------------------------------------------------------------------------
# small helpers shared by the parts
# ---------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A contender that cannot run here (not installed, not on this torch/device): a 'skipped' line."""


class Deadline:
    """The part's time limit (seconds from now, or None): nothing new starts after it."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + float(seconds)

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def _free_memory():
    gc.collect()
    if DEVICE == "cuda":
        import torch

        torch.cuda.empty_cache()


def _error_fields(exc: BaseException) -> dict:
    import torch

    status = "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
    return dict(status=status, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")


def _cuda_broken() -> str | None:
    """Why the CUDA context is unusable (a sticky error such as an illegal address), or None."""
    if DEVICE != "cuda":
        return None
    import torch

    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception as exc:  # the context is lost for the rest of this process
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


class ContextLost(RuntimeError):
    """The CUDA context is broken: nothing more can run in this process (exit code 3)."""


# ---------------------------------------------------------------------------------------------
# part: tests (pytest -m gpu, one JSON line per test)
# ---------------------------------------------------------------------------------------------
class _PytestJsonl:
    """pytest plugin: marks GPU_EXTRA as `gpu`, runs RUN_FIRST first, emits one line per test."""

    def __init__(self, extra=(), first=()):
        self.extra, self.first = set(extra), list(first)
        self.counts = {}

    def _matches(self, item, ids):
        return any(item.nodeid == i or item.nodeid.endswith("/" + i) or item.nodeid.startswith(i + "[") for i in ids)

    def pytest_collection_modifyitems(self, session, config, items):
        import pytest

        for item in items:
            if self._matches(item, self.extra):
                item.add_marker(pytest.mark.gpu)
        items.sort(key=lambda it: 0 if self._matches(it, self.first) else 1)  # stable: the rest keep their order

    def pytest_runtest_logreport(self, report):
        # one line per test: its call, or the setup that failed/skipped it
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome
            if getattr(report, "wasxfail", None) is not None:
                outcome = "xfailed" if report.skipped else "xpassed"
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            rec = dict(part="tests", event="test", nodeid=report.nodeid, outcome=outcome,
                       duration_s=round(report.duration, 3))
            if report.failed:
                rec["error"] = str(report.longreprtext)[-1500:]
            elif report.skipped and isinstance(report.longrepr, tuple):
                rec["reason"] = str(report.longrepr[2])[:300]
            emit(rec)
        elif report.when == "teardown" and report.failed:
            self.counts["error"] = self.counts.get("error", 0) + 1
            emit(dict(part="tests", event="test", nodeid=report.nodeid, outcome="error",
                      error=str(report.longreprtext)[-1500:]))


def part_tests(args) -> dict:
    import importlib.util

    import pytest

    if DEVICE == "cuda":
        import torch

        if torch.cuda.is_available():
            os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels for real
    pargs = list(args.pytest_args) if args.pytest_args else ["-m", "gpu", "tests"]
    # a test module that cannot be imported on the device must not stop the others from running
    pargs += ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    if args.test_timeout and importlib.util.find_spec("pytest_timeout") is not None:
        pargs += ["-p", "pytest_timeout", f"--timeout={args.test_timeout}"]
    plugin = _PytestJsonl(GPU_EXTRA, RUN_FIRST)
    t = time.perf_counter()
    rc = int(pytest.main(pargs, plugins=[plugin]))
    summary = dict(part="tests", event="summary", exit_code=rc, seconds=round(time.perf_counter() - t, 1),
                   args=pargs, **{k: plugin.counts.get(k, 0) for k in ("passed", "failed", "skipped", "error",
                                                                        "xfailed", "xpassed")})
    emit(summary)
    return summary


# ---------------------------------------------------------------------------------------------
# part: the loss kernel, every contender side by side
# ---------------------------------------------------------------------------------------------
def _naive(h, W, y):
    """Materialized fp32 logits, then cross-entropy: what a plain PyTorch training step does."""
    import torch.nn.functional as F

    return F.cross_entropy((h @ W.t()).float(), y, ignore_index=-100)


def _make_weighted_ce():
    from refit_fast import weighted_ce

    return lambda h, W, y: weighted_ce(h, W, y, normalize="token")


def _make_torch_lce(chunked: bool):
    def make():
        import torch
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
        if chunked:
            if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
                raise Unavailable(f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions")
            opts = torch.nn.LinearCrossEntropyOptions()
            return lambda h, W, y: F.linear_cross_entropy(h, W, y, ignore_index=-100, options=opts)
        return lambda h, W, y: F.linear_cross_entropy(h, W, y, ignore_index=-100)

    return make


def _needs_cuda(what):
    if DEVICE != "cuda":
        raise Unavailable(f"{what} is timed on CUDA only")


def _make_liger():
    _needs_cuda("liger")
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    return lambda h, W, y: liger(W, h, y)


def _make_cce(exact: bool):
    def make():
        _needs_cuda("cut_cross_entropy")
        from cut_cross_entropy import linear_cross_entropy

        if exact:  # no gradient filtering: the exact gradient
            return lambda h, W, y: linear_cross_entropy(h, W, y, reduction="mean", filter_eps=None)
        return lambda h, W, y: linear_cross_entropy(h, W, y, reduction="mean")

    return make


def _make_quack():
    _needs_cuda("quack")
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda h, W, y: chunked_linear_cross_entropy(h, W, y, reduction="mean")


def _make_compile():
    _needs_cuda("torch_compile")  # on CPU its compile alone takes longer than the whole smoke run
    import torch

    return torch.compile(_naive, dynamic=False)


# (name, the package whose absence means 'skipped', factory) in the order they run: the ones we quote first.
LOSS_CONTENDERS = (
    ("weighted_ce", "refit_fast", _make_weighted_ce),
    ("torch_lce_reference", None, _make_torch_lce(False)),
    ("torch_lce_chunked", None, _make_torch_lce(True)),
    ("liger", "liger_kernel", _make_liger),
    ("cce", "cut_cross_entropy", _make_cce(False)),
    ("cce_exact", "cut_cross_entropy", _make_cce(True)),
    ("quack", "quack", _make_quack),
    ("naive_torch", None, lambda: _naive),
    ("torch_compile", None, _make_compile),
)


def loss_contenders():
    """The contenders of the loss part: (name, package, factory); a hook for tests."""
    return LOSS_CONTENDERS


def matmul_tflops(dtype=None, n=8192, reps=10) -> float | None:
    """The device's measured dense matmul rate (the CPU bench's measurement, one home); None on CPU."""
    if DEVICE != "cuda":
        return None
    import torch

    from bench_weighted_ce import matmul_tflops as measure  # plain imports only: torch and refit_fast

    return measure(dtype or torch.bfloat16, n, reps)


def make_inputs(n, d, v, dtype, sets, seed=0):
    """`sets` rotating (hidden, labels) pairs and one weight, on DEVICE; never zeros."""
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    W = (torch.randn(v, d, device=DEVICE, dtype=dtype, generator=g) / d**0.5).requires_grad_()
    pairs = []
    for _ in range(sets):
        h = torch.randn(n, d, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
        y = torch.randint(0, v, (n,), device=DEVICE, generator=g)
        pairs.append((h, y))
    return W, pairs


def reference_loss(h, W, y, chunk=4096) -> float:
    """Token-mean NLL in fp32, a few rows at a time (no [N, V] logits at once)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        W32 = W.float()
        for i in range(0, h.shape[0], chunk):
            logits = h[i:i + chunk].float() @ W32.t()
            yy = y[i:i + chunk]
            keep = yy >= 0
            lse = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, yy.clamp_min(0)[:, None])[:, 0]
            total += float(((lse - tgt) * keep).sum())
            count += int(keep.sum())
    return total / max(count, 1)


def _sync():
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def time_loss(fn, W, pairs, warmup, iters) -> dict:
    """Median / p20 / p80 seconds of forward+backward, the first loss value, and (CUDA) the peak memory
    beyond inputs and their gradients."""
    import torch

    def step(h, y):
        h.grad = W.grad = None
        loss = fn(h, W, y)
        loss.backward()
        return loss

    first = float(step(*pairs[0]).detach().float())
    for i in range(1, warmup):
        step(*pairs[i % len(pairs)])
    _sync()
    times = []
    for i in range(iters):
        h, y = pairs[i % len(pairs)]
        if DEVICE == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(h, y)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            step(h, y)
            times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    out = dict(median_s=statistics.median(times), p20_s=q[0], p80_s=q[-1], loss=first)
    h, y = pairs[0]
    h.grad = W.grad = None
    if DEVICE == "cuda":  # memory: one more step from a clean peak counter, grads freed first
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(h, y)
        torch.cuda.synchronize()
        grad_bytes = h.numel() * h.element_size() + W.numel() * W.element_size()
        out["extra_bytes"] = int(torch.cuda.max_memory_allocated() - base - grad_bytes)
    else:
        out["extra_bytes"] = 0
    h.grad = W.grad = None
    return out


def part_loss(args, deadline: Deadline | None = None) -> dict:
    import torch

    deadline = deadline or Deadline(None)
    dtype = getattr(torch, args.loss_dtype)
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.loss_dtype]
    d, v = args.loss_d, args.loss_v
    rate = matmul_tflops(dtype)
    emit(dict(part="loss", event="matmul_rate", tflops=rate, dtype=args.loss_dtype))
    chosen = [c for c in loss_contenders() if (not args.only or c[0] in args.only) and c[0] not in (args.skip or ())]
    rows = []
    for n in args.loss_n:
        pred = predict_fields(n, d, v, short)
        W, pairs = make_inputs(n, d, v, dtype, args.sets)
        ref = reference_loss(pairs[0][0], W, pairs[0][1])
        flops = 6 * n * d * v
        broken = None
        for name, package, factory in chosen:
            row = dict(part="loss", method=name, N=n, D=d, V=v, dtype=args.loss_dtype, warmup=args.warmup,
                       iters=args.iters)
            if broken:
                row.update(status="error", error=f"not run: the CUDA context broke earlier ({broken})")
            elif deadline.passed():
                row.update(status="skipped", reason="out of time (the step's time limit)")
            else:
                fn = None
                try:
                    fn = factory()
                except Unavailable as exc:
                    row.update(status="skipped", reason=str(exc))
                except ModuleNotFoundError as exc:
                    if package and exc.name and exc.name.split(".")[0] == package:
                        row.update(status="skipped", reason=f"{package} is not installed")
                    else:
                        row.update(stage="import", **_error_fields(exc))
                except Exception as exc:  # broken at import or set-up: an error line, the others still run
                    row.update(stage="import", **_error_fields(exc))
                if fn is not None:
                    try:
                        row.update(time_loss(fn, W, pairs, args.warmup, args.iters))
                        row["status"] = "ok"
                        row["tflops"] = flops / row["median_s"] / 1e12
                        row["floor_fraction"] = (flops / (rate * 1e12)) / row["median_s"] if rate else None
                        row["extra_over_full_logits"] = row["extra_bytes"] / (n * v * 4)
                        row["loss_ref"] = ref
                        row["loss_rel_err"] = abs(row["loss"] - ref) / max(abs(ref), 1e-30)
                    except Exception as exc:  # OOM included
                        row.update(stage="run", **_error_fields(exc))
                    finally:
                        fn = None
                        for h, _ in pairs:
                            h.grad = None
                        W.grad = None
                        _free_memory()
                    if row.get("status") != "ok":
                        broken = _cuda_broken()
            row.update(pred)
            if row.get("status") == "ok" and row.get("predicted_ms"):
                row["measured_over_predicted"] = row["median_s"] * 1e3 / row["predicted_ms"]
            rows.append(emit(row))
        del W, pairs
        _free_memory()
        if broken:
            raise ContextLost(broken)
    return dict(matmul_tflops=rate, rows=rows)


# ---------------------------------------------------------------------------------------------
# shared by the trainer and long-context parts: synthetic chat-like conversations, one 1B model
# ---------------------------------------------------------------------------------------------
def synthetic_conversations(n, vocab, seed=0, median=600, cap=4096):
    """Chat-like lengths (lognormal, median ~600, capped) with alternating user/assistant spans."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), 0.8, n).astype(int), 16, cap)
    convs = []
    for L in lengths:
        ids = rng.integers(0, vocab, L, dtype=np.int64)
        mask = np.zeros(L, dtype=np.uint8)
        pos = 0
        hi = max(9, min(256, L // 3))  # spans scale with short conversations: every one has a trained turn
        while pos < L:  # user span then assistant span
            pos += int(rng.integers(8, hi))
            span = int(rng.integers(8, hi))
            mask[pos:pos + span] = 1
            pos += span
        mask[0] = 0
        convs.append((ids, mask))
    return convs


def build_1b(grad_ckpt: bool):
    """The part's one 1B-class model, initialized directly on DEVICE (no CPU init and copy), prepared
    for packed rows ("auto"); :func:`use_attention` switches it between our path and stock HF."""
    import torch

    from refit_fast.model import build_model_from_config, enable_checkpointing

    t = time.perf_counter()
    with torch.device(DEVICE):
        model = build_model_from_config(LLAMA_1B, seed=0, attn_backend="auto")
    if grad_ckpt:
        enable_checkpointing(model)
    model.train()
    _sync()
    n_params = sum(p.numel() for p in model.parameters())
    emit(dict(part="build", event="model", device=str(next(model.parameters()).device), params=n_params,
              seconds=round(time.perf_counter() - t, 2), grad_ckpt=grad_ckpt))
    return model


def snapshot(model) -> dict:
    """The initial weights on the host, so each contender starts from them without rebuilding."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(model, weights: dict) -> None:
    import torch

    with torch.no_grad():
        model.load_state_dict(weights)
    model.zero_grad(set_to_none=True)


def use_attention(model, which: str) -> None:
    """'refit': packed varlen attention (prepare_model "auto"); 'hf': the stock HF sdpa attention."""
    from refit_fast.model import prepare_model, unprepare_model

    if which == "refit":
        prepare_model(model, "auto")
    else:
        unprepare_model(model, "sdpa")


def new_optimizer(model):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")


def step_refit(model, opt, row, rewards):
    """One step on one packed row: hidden states from the body, weighted_ce on the lm_head weight."""
    import torch

    from refit_fast import weighted_ce
    from refit_fast.model import output_embedding, packed_hidden_states

    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        h = packed_hidden_states(model, row["input_ids"], row["position_ids"], row["cu_seqlens"], row["max_seqlen"])
        W, b = output_embedding(model)
        # seq_ids index the packed conversation list; `rewards` holds one reward per conversation
        loss = weighted_ce(h, W, row["labels"], row["seq_ids"], rewards, bias=b, standardize=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_hf(model, opt, batch):
    """The usual Hugging Face step: padded batch, `labels=` loss (full logits)."""
    import torch

    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def padded_batches(convs, token_budget):
    """Length-sorted padded batches with at most `token_budget` padded tokens each (HF style)."""
    import torch

    order = sorted(range(len(convs)), key=lambda i: len(convs[i][0]))
    batches, cur = [], []
    for i in order:
        L = len(convs[i][0])
        if cur and (len(cur) + 1) * max(L, max(len(convs[j][0]) for j in cur)) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = []
    for b in batches:
        T = max(len(convs[i][0]) for i in b)
        ids = torch.zeros(len(b), T, dtype=torch.long)
        att = torch.zeros(len(b), T, dtype=torch.long)
        lab = torch.full((len(b), T), -100, dtype=torch.long)
        for r, i in enumerate(b):
            x, m = convs[i]
            L = len(x)
            ids[r, :L] = torch.from_numpy(x)
            att[r, :L] = 1
            # HF shifts labels itself: label[t] = token t where trained
            lab[r, :L] = torch.where(torch.from_numpy(m).bool(), torch.from_numpy(x), -100)
        out.append(dict(input_ids=ids, attention_mask=att, labels=lab, real=int(att.sum())))
    return out


def _peak_and_time(fn, warmup, iters):
    import torch

    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # CPU smoke runs: time only
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters, torch.cuda.max_memory_allocated()


def _measure(part, model, weights, which, fn_of_opt, warmup, iters, deadline, **fields):
    """One contender on the part's model: same start weights, fresh optimizer; any failure is a line."""
    rec = dict(part=part, **fields)
    if deadline.passed():
        rec.update(status="skipped", reason="out of time (the step's time limit)")
        return rec
    opt = None
    try:
        restore(model, weights)
        use_attention(model, which)
        opt = new_optimizer(model)
        fn = fn_of_opt(opt)
        sec, peak = _peak_and_time(fn, warmup, iters)
        rec.update(status="ok", step_s=sec, peak_gib=peak / 2**30)
    except Exception as exc:  # OOM included: the next contender still runs
        rec.update(**_error_fields(exc))
    finally:
        opt = fn = None
        model.zero_grad(set_to_none=True)
        _free_memory()
    if rec["status"] != "ok":
        broken = _cuda_broken()
        if broken:
            emit(rec)
            raise ContextLost(broken)
    return rec


# ---------------------------------------------------------------------------------------------
# part: trainer step throughput
# ---------------------------------------------------------------------------------------------
def part_trainer(args, deadline: Deadline | None = None) -> dict:
    import torch

    from refit_fast.packing import pack, to_torch

    deadline = deadline or Deadline(None)
    budget = args.row_tokens
    convs = synthetic_conversations(args.trainer_convs, LLAMA_1B["vocab_size"], seed=1, cap=budget)
    n = args.iters + args.warmup
    packed = pack(convs, budget, seed=0)
    rows = [to_torch(packed[i], DEVICE) for i in range(min(len(packed), n))]
    rewards = torch.rand(len(convs), device=DEVICE)
    batches = [{k: (v.to(DEVICE) if hasattr(v, "to") else v) for k, v in b.items()}
               for b in padded_batches(convs, budget)[:n]]
    d, v = LLAMA_1B["hidden_size"], LLAMA_1B["vocab_size"]
    model = build_1b(grad_ckpt=False)
    weights = snapshot(model)
    contenders = [
        ("refit_fast (packed, weighted_ce)", "refit", rows, statistics.mean(int((r["seq_ids"] >= 0).sum()) for r in rows),
         lambda m, o, x: step_refit(m, o, x, rewards)),
        ("Hugging Face (padded, labels=)", "hf", batches, statistics.mean(b["real"] for b in batches), step_hf),
    ]
    out = []
    for name, which, inputs, real, step in contenders:
        it = iter(range(10**9))

        def fn_of_opt(opt, step=step, inputs=inputs, it=it):
            return lambda: step(model, opt, inputs[next(it) % len(inputs)])

        rec = _measure("trainer", model, weights, which, fn_of_opt, args.warmup, args.iters, deadline,
                       method=name, tokens_per_step=real)
        if rec.get("status") == "ok":
            rec["tokens_per_s"] = real / rec["step_s"]
        rec.update(predict_fields(budget, d, v, "bf16"))  # the loss head of one step's tokens
        out.append(emit(rec))
    model = weights = None
    _free_memory()
    return dict(config=TRAINER_CONFIG, row_tokens=budget, rows=out)


# ---------------------------------------------------------------------------------------------
# part: long context
# ---------------------------------------------------------------------------------------------
def part_long_context(args, deadline: Deadline | None = None) -> dict:
    import numpy as np
    import torch

    from refit_fast.packing import pack, to_torch

    deadline = deadline or Deadline(None)
    d, v = LLAMA_1B["hidden_size"], LLAMA_1B["vocab_size"]
    model = build_1b(grad_ckpt=True)
    weights = snapshot(model)
    out = []
    for T in args.long_t:
        rng = np.random.default_rng(T)
        # one long conversation of T tokens, half of them trained
        ids = rng.integers(0, v, T, dtype=np.int64)
        mask = (np.arange(T) // 512 % 2).astype(np.uint8)
        mask[0] = 0
        row = to_torch(pack([(ids, mask)], T)[0], DEVICE)
        hf = dict(input_ids=torch.from_numpy(ids)[None].to(DEVICE),
                  attention_mask=torch.ones(1, T, dtype=torch.long, device=DEVICE),
                  labels=torch.where(torch.from_numpy(mask).bool(), torch.from_numpy(ids), -100)[None].to(DEVICE))
        one = torch.ones(1, device=DEVICE)
        for method, which in (("refit_fast", "refit"), ("hf", "hf")):
            if method == "refit_fast":
                def fn_of_opt(opt):
                    return lambda: step_refit(model, opt, row, one)
            else:
                def fn_of_opt(opt):
                    return lambda: step_hf(model, opt, hf)
            rec = _measure("long_context", model, weights, which, fn_of_opt, 1, 1, deadline, method=method, T=T)
            rec.update(predict_fields(T, d, v, "bf16"))
            out.append(emit(rec))
        row = hf = None
        _free_memory()
    model = weights = None
    _free_memory()
    return dict(config=LONG_CONFIG, rows=out)


# ---------------------------------------------------------------------------------------------
# output: JSON lines -> one result (json, md, png)
# ---------------------------------------------------------------------------------------------
def result_from_records(records: list[dict]) -> dict:
    """Fold the JSON lines of one session (any parts, any processes) into one result dict."""
    result = dict(environment={}, args={}, steps=[])
    for r in records:
        part, event = r.get("part"), r.get("event")
        if event == "environment" and not result["environment"]:
            result["environment"] = r.get("environment", {})
        elif event == "args" and not result["args"]:
            result["args"] = r.get("args", {})
        elif part == "session":
            result["steps"].append(r)
        elif part == "tests":
            t = result.setdefault("tests", dict(rows=[], summaries=[]))
            (t["rows"] if event == "test" else t["summaries"]).append(r)
        elif part == "loss":
            loss = result.setdefault("loss", dict(matmul_tflops=None, rows=[]))
            if event == "matmul_rate":
                loss["matmul_tflops"] = loss["matmul_tflops"] or r.get("tflops")
            elif r.get("method"):
                loss["rows"].append(r)
        elif part == "trainer" and (r.get("method") or event == "part_args"):
            t = result.setdefault("trainer", dict(config=TRAINER_CONFIG, row_tokens=None, rows=[]))
            if event == "part_args":
                t["row_tokens"] = r.get("row_tokens")
            else:
                t["rows"].append(r)
        elif part == "long_context" and r.get("method"):
            result.setdefault("long_context", dict(config=LONG_CONFIG, rows=[]))["rows"].append(r)
    env = result["environment"]
    env.setdefault("device", "unknown device")
    env.setdefault("date", _dt.date.today().isoformat())
    env.setdefault("torch", "-")
    return result


def _pred_cell(r) -> str:
    if r.get("predicted_ms") is not None:
        ratio = f" (x{r['measured_over_predicted']:.2f})" if r.get("measured_over_predicted") else ""
        return f"{r['predicted_ms']:.2f} / {r['predicted_floor_ms']:.2f}{ratio}"
    return "no prediction" if "prediction" in r else "-"


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# refit_fast GPU suite — {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton', '-')}, liger-kernel {env.get('liger_kernel', '-')}, "
             f"cut-cross-entropy {env.get('cut_cross_entropy', '-')}, quack-kernels {env.get('quack', '-')}. "
             "All numbers from one session of `benchmarks/run_gpu_suite.py` (one process per part).", ""]
    if result.get("tests"):
        t = result["tests"]
        counts = {}
        for r in t["rows"]:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines += ["## GPU tests (`pytest -m gpu`, kernels compiled)", "",
                  ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test ran", ""]
        for r in t["rows"]:
            if r["outcome"] in ("failed", "error"):
                lines.append(f"- FAILED `{r['nodeid']}`")
        lines.append("")
    if "loss" in result:
        loss = result["loss"]
        rate = loss.get("matmul_tflops")
        args = dict(result.get("args", {}))
        if loss["rows"] and "iters" in loss["rows"][0]:  # the loss process's own settings
            args.update(iters=loss["rows"][0]["iters"], warmup=loss["rows"][0].get("warmup"))
        lines += ["## Loss kernel (forward + backward)", "",
                  f"Forward+backward, median of {args.get('iters', '?')} after {args.get('warmup', '?')} warm-up, "
                  f"rotating input sets; bf16 matmul rate measured in the same run: "
                  f"{rate:.0f} TFLOP/s. " if rate else "Forward+backward. ",
                  "Floor = 6*N*D*V / that rate. Extra memory = peak beyond inputs and their gradients. "
                  "Loss error = |loss - fp32 reference| / reference. Predicted = perf_model's total / floor ms "
                  "(measured / predicted).", "",
                  "| method | N | D | V | median ms | p20-p80 ms | TFLOP/s | % of floor | extra MiB | extra / full logits "
                  "| loss error | predicted ms / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in loss["rows"]:
            if "median_s" not in r:
                status = r.get("status") or "?"
                why = status if status in ("?", "OOM") else f"{status}: {(r.get('error') or r.get('reason') or '')[:80]}"
                lines.append(f"| {r['method']} | {r['N']} | {r['D']} | {r['V']} | {why} | | | | | | | {_pred_cell(r)} |")
                continue
            ff = f"{100 * r['floor_fraction']:.1f}" if r.get("floor_fraction") is not None else "-"
            err = f"{r['loss_rel_err']:.1e}" if r.get("loss_rel_err") is not None else "-"
            lines.append(f"| {r['method']} | {r['N']} | {r['D']} | {r['V']} | {r['median_s'] * 1e3:.2f} | "
                         f"{r['p20_s'] * 1e3:.2f}-{r['p80_s'] * 1e3:.2f} | {r['tflops']:.1f} | {ff} | "
                         f"{r['extra_bytes'] / 2**20:.1f} | {r.get('extra_over_full_logits', 0):.4f} | {err} | "
                         f"{_pred_cell(r)} |")
        lines.append("")
    if "trainer" in result:
        t = result["trainer"]
        lines += ["## Trainer step", "", f"{t['config']}; {t['row_tokens']} tokens per step.", "",
                  "| method | tokens/s | step s | peak GiB | real tokens / step | loss head predicted ms |",
                  "|---|---|---|---|---|---|"]
        for r in t["rows"]:
            if "tokens_per_s" in r:
                lines.append(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | "
                             f"{r['tokens_per_step']:.0f} | {_pred_cell(r)} |")
            else:
                lines.append(f"| {r['method']} | {r.get('status')} | | | | {_pred_cell(r)} |")
        ok = [r for r in t["rows"] if "tokens_per_s" in r]
        if len(ok) == 2:
            lines += ["", f"Speed-up: {ok[0]['tokens_per_s'] / ok[1]['tokens_per_s']:.2f}x tokens/s."]
        lines.append("")
    if "long_context" in result:
        lc = result["long_context"]
        lines += ["## Long context", "", lc["config"] + ".", "", "| tokens in the row | refit_fast | Hugging Face |",
                  "|---|---|---|"]
        by_t = {}
        for r in lc["rows"]:
            cell = f"{r['peak_gib']:.1f} GiB, {r['step_s']:.2f} s" if r["status"] == "ok" else r["status"]
            by_t.setdefault(r["T"], {})[r["method"]] = cell
        for T, cells in sorted(by_t.items()):
            lines.append(f"| {T} | {cells.get('refit_fast', '-')} | {cells.get('hf', '-')} |")
        lines.append("")
    if result.get("steps"):
        lines += ["## Session steps", "", "| step | status | seconds | time limit s |", "|---|---|---|---|"]
        for s in result["steps"]:
            lines.append(f"| {s.get('step')} | {s.get('status')} | {s.get('seconds', '-')} | {s.get('timeout_s', '-')} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss", "trainer", "long_context") if k in result]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "loss":
            rows = [r for r in result["loss"]["rows"] if "median_s" in r and r["D"] == 4096]
            for m in sorted({r["method"] for r in rows}):
                pts = sorted((r["N"], r["median_s"] * 1e3) for r in rows if r["method"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            pred = sorted({(r["N"], r["predicted_ms"]) for r in result["loss"]["rows"] if r.get("predicted_ms")})
            if pred:
                ax.plot([p[0] for p in pred], [p[1] for p in pred], linestyle="--", color="black", label="predicted")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N (D=4096, V=128256, bf16)")
            ax.set_ylabel("forward+backward ms")
            ax.set_title("Loss kernel")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        elif key == "trainer":
            rows = [r for r in result["trainer"]["rows"] if "tokens_per_s" in r]
            ax.bar([r["method"].split(" (")[0] for r in rows], [r["tokens_per_s"] for r in rows],
                   color=["#4c72b0", "#888888"][: len(rows)])
            ax.set_ylabel("tokens/s")
            ax.set_title("Trainer step, 1B Llama")
        else:
            for m, color in (("refit_fast", "#4c72b0"), ("hf", "#888888")):
                pts = [(r["T"], r["peak_gib"]) for r in result["long_context"]["rows"]
                       if r["method"] == m and r["status"] == "ok"]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=color)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens in one packed row")
            ax.set_ylabel("peak GiB (missing point = OOM)")
            ax.set_title("Long context")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, stem: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    stem = stem or f"{env['device'].replace(' ', '_')}-{env['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(_clean(result), indent=2))
    md = RESULTS / f"{stem}.md"
    md.write_text(to_markdown(result))
    try:
        plot(result, RESULTS / f"{stem}.png")
    except ImportError:
        print("run_gpu_suite: matplotlib not installed, no plot", file=sys.stderr)
    return md


def summary_table(records: list[dict]) -> str:
    """A short plain-text table of a session's JSON lines (the last thing a device run prints)."""
    out = ["step                 status     seconds  limit"]
    for r in records:
        if r.get("part") == "session" and r.get("event") == "step":
            out.append(f"{r.get('step', '?'):<20} {r.get('status', '?'):<10} {r.get('seconds', '-'):>7}  {r.get('timeout_s', '-')}")
    tests = [r for r in records if r.get("part") == "tests" and r.get("event") == "test"]
    if tests:
        c = {}
        for r in tests:
            c[r["outcome"]] = c.get(r["outcome"], 0) + 1
        out.append("tests: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
        failed = [r for r in tests if r["outcome"] in ("failed", "error")]
        out += [f"  FAILED {r['nodeid']}" for r in failed]
        if failed:
            out.append("WARNING: GPU tests failed: the numbers below are not validated")
    for r in records:
        if r.get("part") in ("loss", "trainer", "long_context") and r.get("method"):
            out.append(_fmt(r))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
PARTS = ("tests", "loss", "trainer", "long_context")


def _on_sigterm(signum, frame):
    """A step's `timeout` ends us: leave a line saying so, then go at once (every line is already on disk;
    a SystemExit could be swallowed by pytest as one test's failure)."""
    with contextlib.suppress(Exception):
        emit(dict(part="meta", event="terminated", reason="SIGTERM (the step's time limit)"))
        RECORDER.close()
    os._exit(124)


def main(argv=None) -> int:
    global RECORDER
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["loss", "trainer", "long_context"], choices=PARTS)
    p.add_argument("--loss-n", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--loss-d", type=int, default=4096)
    p.add_argument("--loss-v", type=int, default=128256)
    p.add_argument("--loss-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sets", type=int, default=3, help="loss part: rotating input sets")
    p.add_argument("--only", nargs="*", help="loss part: run only these contenders")
    p.add_argument("--skip", nargs="*", help="loss part: leave these contenders out")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--row-tokens", type=int, default=16384, help="trainer part: tokens per step")
    p.add_argument("--trainer-convs", type=int, default=2000)
    p.add_argument("--long-t", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--pytest-args", nargs=argparse.REMAINDER, help="tests part: pytest's arguments (default -m gpu tests)")
    p.add_argument("--test-timeout", type=int, default=120, help="tests part: seconds per test (pytest-timeout)")
    p.add_argument("--time-limit", type=float, default=float(os.environ.get("REFIT_TIME_LIMIT") or 0) or None,
                   help="seconds for this run: nothing new starts after them (default $REFIT_TIME_LIMIT)")
    p.add_argument("--jsonl", default=os.environ.get("REFIT_JSONL"), help="append every result here as a JSON line")
    p.add_argument("--summary", help="fold a session's JSON lines into json + md + png and print them (no GPU)")
    p.add_argument("--from-json", help="re-render the markdown and plot of a results JSON (no GPU needed)")
    p.add_argument("--out", help="results file stem (default <device>-<date>)")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(write_all(result, args.out or Path(args.from_json).stem).read_text())
        return 0
    if args.summary:
        records = read_jsonl(args.summary)
        result = result_from_records(records)
        print(write_all(result, args.out).read_text())
        print(summary_table(records))
        return 0
    import torch

    needs_gpu = [x for x in args.parts if x != "tests"]
    if needs_gpu and DEVICE == "cuda" and not torch.cuda.is_available():
        print("run_gpu_suite: needs a CUDA GPU (A100/H100/H200); nothing was measured. "
              "To re-render an existing result: --from-json FILE or --summary FILE.jsonl", file=sys.stderr)
        return 2
    RECORDER = Recorder(args.jsonl)
    signal.signal(signal.SIGTERM, _on_sigterm)
    deadline = Deadline(args.time_limit)
    RECORDER.write(dict(part="meta", event="environment", environment=environment()))
    RECORDER.write(dict(part="meta", event="args", args={k: v for k, v in vars(args).items() if k != "pytest_args"}))
    rc = 0
    try:
        for part in args.parts:
            t = time.perf_counter()
            if part == "trainer":
                RECORDER.write(dict(part="trainer", event="part_args", row_tokens=args.row_tokens))
            try:
                if part == "tests":
                    res = part_tests(args)
                    rc = rc or (0 if res["exit_code"] in (0, 5) else 1)
                else:
                    globals()[f"part_{part}"](args, deadline)
            except ContextLost as exc:
                emit(dict(part=part, event="context_lost", error=str(exc)))
                return 3
            emit(dict(part=part, event="done", seconds=round(time.perf_counter() - t, 1)))
    finally:
        RECORDER.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
