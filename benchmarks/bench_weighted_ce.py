"""Loss-kernel benchmark: refit_fast.weighted_ce against naive PyTorch (materialized fp32 logits),
torch.compile of it, PyTorch's own `F.linear_cross_entropy` (reference and chunked, torch >= 2.13),
Liger-Kernel's fused linear cross-entropy, Apple's Cut Cross-Entropy (default and exact:
filter_eps=None) and QuACK's chunked linear cross-entropy, each when it builds (the others are
listed with the reason), side by side in one process.

GPU (the numbers we quote)::

    python benchmarks/bench_weighted_ce.py                       # D=4096, V=128256, N=4k/16k/64k, bf16
    python benchmarks/bench_weighted_ce.py --n 8192 --d 2304 --v 256000   # Gemma-like

It times forward+backward with CUDA events after warm-up, rotating between input sets, and reports
the median (p20/p80 too), the peak memory beyond inputs and their gradients, TFLOP/s against
6*N*D*V, and the fraction of the FLOP floor at a bf16 matmul rate measured in the same run. Results
go to benchmarks/results/<device>-<date>.json and .md.

CPU (pytest-benchmark; weighted_ce's torch path against materialized logits, torch's native
reference and chunked paths and CCE's torch.compile implementation, at N x D x V = 2048x512x32000,
4096x1024x50257 and 1024x2048x128256, fp32; each checked against materialized logits, timed
interleaved, its peak memory measured in a fresh process)::

    python -m pytest benchmarks/bench_weighted_ce.py --benchmark-only -p no:cacheprovider -s
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refit_fast import chunk_budget, weighted_ce  # noqa: E402
from refit_fast.ops.reference import weighted_ce_reference  # noqa: E402

# REFIT_RESULTS_DIR lets a device run write straight into its output folder, so results of the
# parts that finished come back even if the run is cut off at its time limit.
RESULTS = Path(os.environ.get("REFIT_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


# ---- the contenders: f(hidden [N, D], weight [V, D], labels [N]) -> mean NLL over trained tokens ----
# REFIT_BENCH_SOFTCAP=c (or --softcap c): every contender computes the softcapped loss (Gemma 2's
# final_logit_softcapping, logits c * tanh(z / c)); a peer without a softcap option is skipped.
def softcap() -> float | None:
    value = float(os.environ.get("REFIT_BENCH_SOFTCAP") or 0)
    return value if value > 0 else None


def _capped(z):
    cap = softcap()
    return z if cap is None else cap * torch.tanh(z / cap)


def _naive(h, W, y):
    return weighted_ce_reference(h, W, y, normalize="token", softcap=softcap())


def _materialized(h, W, y):
    """Plain PyTorch: the [N, V] logits in the inputs' dtype (softcapped if asked), then cross-entropy."""
    return torch.nn.functional.cross_entropy(_capped(h @ W.T), y)


# Why a peer is missing, per device, filled by contenders(): name -> reason (shown in the tables).
SKIPPED: dict = {}


def _peer(out: dict, device: str, name: str, make) -> None:
    """out[name] = make(), or the reason it cannot run here in SKIPPED[device][name]: one peer that
    fails to import or build never stops the others."""
    try:
        fn = make()
    except Exception as exc:  # ImportError, or a peer's own check of the device/torch version
        SKIPPED.setdefault(device, {})[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return
    out[name] = fn


def _torch_lce(chunked: bool):
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        raise ImportError(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    if softcap() is not None:
        raise ValueError("F.linear_cross_entropy has no softcap option")
    if not chunked:
        return lambda h, W, y: F.linear_cross_entropy(h, W, y)
    opts = torch.nn.LinearCrossEntropyOptions()  # the chunked path, its automatic choices
    return lambda h, W, y: F.linear_cross_entropy(h, W, y, options=opts)


def _liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(reduction="mean", softcap=softcap())
    return lambda h, W, y: liger(W, h, y)


def _cce(impl: str = "cce", exact: bool = False):
    from cut_cross_entropy import linear_cross_entropy

    kw = dict(impl=impl, softcap=softcap())
    if exact:
        kw["filter_eps"] = None  # no gradient filtering: the exact gradient
    return lambda h, W, y: linear_cross_entropy(h, W, y, reduction="mean", **kw)


def _quack():
    if softcap() is not None:
        raise ValueError("QuACK's chunked_linear_cross_entropy has no softcap option")
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda h, W, y: chunked_linear_cross_entropy(h, W, y, reduction="mean")


def _needs_cuda(what: str):
    def make():
        raise RuntimeError(f"{what}: needs CUDA (Triton/CuTe kernels), not run on CPU")
    return make


def contenders(device: str) -> dict:
    """name -> callable, for every implementation that builds here (all compute the same token-mean
    NLL); the others are listed with their reason in SKIPPED[device]."""
    SKIPPED[device] = {}
    cap = softcap()
    out = {
        "refit_fast": lambda h, W, y: weighted_ce(h, W, y, normalize="token", softcap=cap),
        "refit_fast_torch": lambda h, W, y: weighted_ce(h, W, y, normalize="token", impl="torch", softcap=cap),
        "naive_torch": _naive,
    }
    if device != "cuda":
        out.pop("refit_fast_torch")  # impl="auto" is the torch path on CPU: the same contender
        out["materialized"] = _materialized
        _peer(out, device, "torch_lce", lambda: _torch_lce(False))
        _peer(out, device, "torch_lce_chunked", lambda: _torch_lce(True))
        # CCE's own kernel is Triton (CUDA); its torch.compile implementation runs on CPU and has no
        # gradient filter (filter_eps applies to the CUDA kernel only), so "default" = "exact" here
        _peer(out, device, "cce_torch_compile", lambda: _cce("torch_compile"))
        for name, what in (("liger", "Liger-Kernel"), ("cut_cross_entropy", "CCE impl='cce'"),
                           ("cce_exact", "CCE impl='cce', filter_eps=None")):
            _peer(out, device, name, _needs_cuda(what))
        _peer(out, device, "quack", _quack)  # needs CUDA too; the import says why
        return out
    _peer(out, device, "torch_compile", lambda: torch.compile(_naive, dynamic=False))
    _peer(out, device, "torch_lce", lambda: _torch_lce(False))
    _peer(out, device, "torch_lce_chunked", lambda: _torch_lce(True))
    _peer(out, device, "liger", _liger)
    _peer(out, device, "cut_cross_entropy", _cce)
    _peer(out, device, "cce_exact", lambda: _cce(exact=True))
    _peer(out, device, "quack", _quack)
    return out


def matmul_tflops(dtype=torch.bfloat16, n=8192, reps=10) -> float:
    """The device's measured dense matmul rate (random data, median of `reps`)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def make_inputs(n, d, v, dtype, device, sets, seed=0, ignore_frac=0.0):
    """`sets` rotating (hidden, labels) pairs and one weight; never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(v, d, device=device, dtype=dtype, generator=g) / d**0.5).requires_grad_()
    pairs = []
    for _ in range(sets):
        h = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
        y = torch.randint(0, v, (n,), device=device, generator=g)
        if ignore_frac:
            y[torch.rand(n, device=device, generator=g) < ignore_frac] = -100
        pairs.append((h, y))
    return W, pairs


def time_cuda(fn, W, pairs, warmup, iters):
    """Median / p20 / p80 seconds of forward+backward, and peak memory beyond inputs and gradients."""
    def step(h, y):
        h.grad = W.grad = None
        fn(h, W, y).backward()

    for i in range(warmup):
        step(*pairs[i % len(pairs)])
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        h, y = pairs[i % len(pairs)]
        h.grad = W.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(h, W, y).backward()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    # memory: one more step from a clean peak counter, grads freed first
    h, y = pairs[0]
    h.grad = W.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(h, W, y).backward()
    torch.cuda.synchronize()
    grad_bytes = h.numel() * h.element_size() + W.numel() * W.element_size()
    extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return dict(median_s=statistics.median(times), p20_s=q[0], p80_s=q[-1], extra_bytes=int(extra))


def run_cuda(args) -> dict:
    dtype = getattr(torch, args.dtype)
    rate = matmul_tflops(dtype)
    rows = []
    for n in args.n:
        W, pairs = make_inputs(n, args.d, args.v, dtype, "cuda", args.sets, ignore_frac=args.ignore_frac)
        flops = 6 * n * args.d * args.v
        floor_s = flops / (rate * 1e12)
        full_logits = n * args.v * 4
        for name, fn in contenders("cuda").items():
            if args.only and name not in args.only:
                continue
            row = dict(method=name, N=n, D=args.d, V=args.v, dtype=args.dtype)
            try:
                with chunk_budget(args.chunk_mb << 20 if args.chunk_mb else None):
                    row.update(time_cuda(fn, W, pairs, args.warmup, args.iters))
                row["tflops"] = flops / row["median_s"] / 1e12
                row["floor_fraction"] = floor_s / row["median_s"]
                row["extra_over_full_logits"] = row["extra_bytes"] / full_logits
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as exc:  # a peer failing must not sink the whole table
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                for h, _ in pairs:
                    h.grad = None
                W.grad = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(_fmt_row(row), flush=True)
        for name, why in SKIPPED.get("cuda", {}).items():  # peers that do not build here, with the reason
            if not args.only or name in args.only:
                rows.append(dict(method=name, N=n, D=args.d, V=args.v, dtype=args.dtype, status=f"skipped: {why}"))
                print(_fmt_row(rows[-1]), flush=True)
        del W, pairs
        torch.cuda.empty_cache()
    return dict(matmul_tflops=rate, rows=rows)


def _fmt_row(r) -> str:
    if "median_s" not in r:
        return f"{r['method']:>20} N={r['N']:>6}  {r.get('status', '?')}"
    return (f"{r['method']:>20} N={r['N']:>6}  {r['median_s'] * 1e3:9.2f} ms  {r['tflops']:6.1f} TFLOP/s  "
            f"{100 * r['floor_fraction']:5.1f}% of floor  extra {r['extra_bytes'] / 2**20:9.1f} MiB")


def environment() -> dict:
    env = dict(date=_dt.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    for mod in ("liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod.replace("_", "-"))
        except Exception:
            pass
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return env


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# weighted_ce benchmark — {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton', '-')}, liger-kernel {env.get('liger_kernel', '-')}, "
             f"cut-cross-entropy {env.get('cut_cross_entropy', '-')}. Forward+backward, {result['args']['dtype']}, "
             f"median of {result['args']['iters']} after {result['args']['warmup']} warm-up, rotating "
             f"{result['args']['sets']} input sets; bf16 matmul rate measured in the same run: "
             f"{result['matmul_tflops']:.0f} TFLOP/s. Floor = 6*N*D*V / that rate. Extra memory = peak beyond "
             "inputs and their gradients.", "",
             "| method | N | D | V | median ms | p20-p80 ms | TFLOP/s | % of floor | extra MiB | extra / full logits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['method']} | {r['N']} | {r['D']} | {r['V']} | {r.get('status')} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['N']} | {r['D']} | {r['V']} | {r['median_s'] * 1e3:.2f} | "
                     f"{r['p20_s'] * 1e3:.2f}-{r['p80_s'] * 1e3:.2f} | {r['tflops']:.1f} | "
                     f"{100 * r['floor_fraction']:.1f} | {r['extra_bytes'] / 2**20:.1f} | {r['extra_over_full_logits']:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    stem = stem or f"weighted_ce-{env['device'].replace(' ', '_')}-{env['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(to_markdown(result))
    return RESULTS / f"{stem}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sets", type=int, default=3, help="rotating input sets")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of untrained (-100) labels")
    p.add_argument("--chunk-mb", type=int, default=None, help="refit_fast chunk budget (MiB)")
    p.add_argument("--only", nargs="*", help="methods to run")
    p.add_argument("--softcap", type=float, default=None, help="every contender with a logit softcap (Gemma 2: 30)")
    p.add_argument("--out", default=None, help="results file stem (default: weighted_ce-<device>-<date>)")
    p.add_argument("--cpu-memory", metavar="METHOD", help="CPU: print the peak extra memory of one fwd+bwd "
                   "of METHOD at --n (first value) --d --v as JSON (run in a fresh process)")
    p.add_argument("--cpu-report", metavar="JSONL", help="CPU: render the rows written to REFIT_CPU_JSON as markdown")
    args = p.parse_args(argv)
    if args.softcap:
        os.environ["REFIT_BENCH_SOFTCAP"] = str(args.softcap)  # read by contenders(), also in subprocesses
    if args.cpu_memory:
        print(json.dumps(cpu_memory(args.cpu_memory, args.n[0], args.d, args.v)))
        return 0
    if args.cpu_report:
        rows = [json.loads(ln) for ln in Path(args.cpu_report).read_text().splitlines() if ln.strip()]
        print(cpu_markdown(rows), end="")
        return 0
    if not torch.cuda.is_available():
        print("bench_weighted_ce: no CUDA device here. The GPU numbers need an A100/H100; on CPU run\n"
              "  python -m pytest benchmarks/bench_weighted_ce.py --benchmark-only", file=sys.stderr)
        return 2
    result = run_cuda(args)
    result["environment"] = environment()
    result["args"] = vars(args)
    path = write_results(result, args.out)
    print(path.read_text())
    return 0


# ---- CPU: peers side by side (pytest-benchmark), and the memory of each in a fresh process ----
# The three shapes of issue #14 item 6, fp32, rewards=None (plain token-mean CE: every contender
# computes the same thing). Run:
#     python -m pytest benchmarks/bench_weighted_ce.py --benchmark-only -p no:cacheprovider -s
#     REFIT_CPU_SHAPES=2048x512x32000 REFIT_CPU_ROUNDS=5 REFIT_CPU_JSON=/tmp/cpu.jsonl python -m pytest ...
#     python benchmarks/bench_weighted_ce.py --cpu-report /tmp/cpu.jsonl      # the markdown table
# REFIT_CPU_PEERS=a,b picks contenders; REFIT_CPU_MEMORY=all|none|a,b whose memory to measure;
# REFIT_BENCH_SOFTCAP=30 the softcapped loss (contenders without a softcap are skipped).
CPU_SHAPES = ((2048, 512, 32000), (4096, 1024, 50257), (1024, 2048, 128256))
CPU_PEERS = ("refit_fast", "torch_lce_chunked", "materialized", "torch_lce", "cce_torch_compile",
             "liger", "cut_cross_entropy", "cce_exact", "quack")
CPU_SETS = 2  # rotating input sets (hidden, labels); the weight is shared


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs sets VmHWM to the current RSS (kernel >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory(name: str, n: int, d: int, v: int, seed: int = 0) -> dict:
    """Run in a fresh process (see cpu_memory_subprocess): the peak memory of one forward+backward
    of `name` beyond its inputs and their gradients, as peak RSS (VmHWM after a reset, minus the RSS
    before, minus the growth of file-backed resident pages: library code paged in) and, where the
    contender is not compiled, as the peak of live tensor storages
    (tests/memtrack.py). A warm-up first (a tiny batch; the real shape for compiled contenders, so
    that compilation is not counted) loads the libraries."""
    import gc

    torch.manual_seed(seed)
    fn = contenders("cpu")[name]
    W, pairs = make_inputs(n, d, v, torch.float32, "cpu", 1, seed=seed)
    h, y = pairs[0]
    compiled = "compile" in name
    hw, yw = (h, y) if compiled else (h[:8].detach().clone().requires_grad_(), y[:8])
    fn(hw, W, yw).backward()
    h.grad = hw.grad = W.grad = None
    del hw, yw
    gc.collect()
    grad_bytes = h.numel() * h.element_size() + W.numel() * W.element_size()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS here (/proc/self/clear_refs): no memory numbers")
    base, file_base = _status_kb("VmRSS") * 1024, _status_kb("RssFile") * 1024
    tensor_peak = None
    if compiled:
        fn(h, W, y).backward()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from memtrack import PeakMemory

        with PeakMemory() as m:
            fn(h, W, y).backward()
        tensor_peak = m.peak
    peak = _status_kb("VmHWM") * 1024
    file_growth = max(0, _status_kb("RssFile") * 1024 - file_base)  # library code paged in: not tensors
    return dict(method=name, N=n, D=d, V=v, rss_extra_bytes=int(peak - base - grad_bytes - file_growth),
                rss_file_growth_bytes=int(file_growth),
                tensor_extra_bytes=None if tensor_peak is None else int(tensor_peak - grad_bytes),
                full_logits_bytes=n * v * 4)


def cpu_memory_subprocess(name: str, n: int, d: int, v: int, timeout: float = 1800) -> dict:
    """cpu_memory in a fresh Python process; glibc's mmap threshold is fixed at 64 KiB there so
    that freed buffers go back to the OS and the RSS follows the live memory."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cpu-memory", name, "--n", str(n), "--d", str(d),
           "--v", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return dict(method=name, N=n, D=d, V=v, memory_error=(r.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(lines[-1])


def _agreement(loss, gh, gW, ref) -> dict:
    """Errors against the reference run (materialized fp32 logits) on the same inputs."""
    l0, h0, W0 = ref
    return dict(loss_abs_err=abs(float(loss) - float(l0)),
                dh_rel_err=float((gh - h0).abs().max() / h0.abs().max()),
                dW_rel_err=float((gW - W0).abs().max() / W0.abs().max()))


AGREE = dict(loss_abs_err=1e-4, dh_rel_err=1e-3, dW_rel_err=1e-3)


def run_cpu_shape(n: int, d: int, v: int, names, rounds: int, seed: int = 0, memory=True) -> list[dict]:
    """All `names` at one shape: each checked against materialized logits (that run is its
    warm-up), then `rounds` rounds, each timing every contender once (order rotated per round,
    input sets rotated), then the memory of each in a fresh process (`memory`: True for all, or
    the names to measure). Rows for peers that cannot run here carry their reason."""
    import time

    torch.manual_seed(seed)
    avail = contenders("cpu")
    skipped = SKIPPED.get("cpu", {})
    rows = {k: dict(method=k, N=n, D=d, V=v) for k in names}
    run = [k for k in names if k in avail]
    for k in names:
        if k not in avail:
            rows[k]["status"] = "skipped: " + skipped.get(k, "not available")
    W, pairs = make_inputs(n, d, v, torch.float32, "cpu", CPU_SETS, seed=seed)

    def step(fn, h, W, y):
        h.grad = W.grad = None
        loss = fn(h, W, y)
        loss.backward()
        return loss

    h, y = pairs[0]
    loss = step(_materialized, h, W, y)
    ref = (loss.detach(), h.grad.clone(), W.grad.clone())
    for k in list(run):
        if k == "materialized":  # the reference run was its warm-up
            rows[k].update(loss_abs_err=0.0, dh_rel_err=0.0, dW_rel_err=0.0)
            continue
        try:
            loss = step(avail[k], h, W, y)
            rows[k].update(_agreement(loss.detach(), h.grad, W.grad, ref))
            bad = [e for e, tol in AGREE.items() if not rows[k][e] <= tol]
            if bad:
                rows[k]["status"] = "disagrees: " + ", ".join(f"{e}={rows[k][e]:.2e}" for e in bad)
                run.remove(k)
        except Exception as exc:  # one failing contender never stops the others
            rows[k]["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            run.remove(k)
    del ref
    h.grad = W.grad = None
    times = {k: [] for k in run}
    for r in range(rounds):
        order = run[r % len(run):] + run[:r % len(run)] if run else []
        for k in order:
            hh, yy = pairs[(r + order.index(k)) % len(pairs)]
            hh.grad = W.grad = None
            t0 = time.perf_counter()
            step(avail[k], hh, W, yy)
            times[k].append(time.perf_counter() - t0)
            hh.grad = W.grad = None
    for k in run:
        rows[k].update(median_s=statistics.median(times[k]), times_s=times[k])
    del W, pairs
    if memory:
        for k in run:
            if memory is not True and k not in memory:
                continue
            m = cpu_memory_subprocess(k, n, d, v)
            rows[k].update({x: m[x] for x in m if x not in ("method", "N", "D", "V")})
    return [rows[k] for k in names]


def cpu_ratios(rows: list[dict]) -> dict:
    """weighted_ce's time over native chunked, and its extra memory over materialized logits."""
    by = {r["method"]: r for r in rows}
    out = {}
    me, nat, mat = by.get("refit_fast", {}), by.get("torch_lce_chunked", {}), by.get("materialized", {})
    if "median_s" in me and "median_s" in nat:
        out["time_vs_torch_lce_chunked"] = me["median_s"] / nat["median_s"]
    if "median_s" in me and "median_s" in mat:
        out["time_vs_materialized"] = me["median_s"] / mat["median_s"]
    if me.get("rss_extra_bytes") is not None and mat.get("rss_extra_bytes"):
        out["rss_vs_materialized"] = me["rss_extra_bytes"] / mat["rss_extra_bytes"]
    return out


def cpu_markdown(rows: list[dict]) -> str:
    """The CPU table: one line per contender and shape, then weighted_ce's ratios per shape."""
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["| shape N x D x V | method | median s | rounds (s) | peak RSS extra MiB | tensor peak extra MiB | "
             "extra / full logits | loss err | dh rel err | dW rel err |", "|---|---|---|---|---|---|---|---|---|---|"]
    shapes = []
    for r in rows:
        shp = f"{r['N']}x{r['D']}x{r['V']}"
        if shp not in shapes:
            shapes.append(shp)
        if "median_s" not in r:
            lines.append(f"| {shp} | {r['method']} | {r.get('status', '?')} | | | | | | | |")
            continue
        rss = r.get("rss_extra_bytes")
        of_logits = "-" if rss is None else f"{rss / r['full_logits_bytes']:.3f}"
        lines.append(f"| {shp} | {r['method']} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} | "
                     f"{mib(rss) if 'memory_error' not in r else r['memory_error']} | {mib(r.get('tensor_extra_bytes'))} | "
                     f"{of_logits} | "
                     f"{r['loss_abs_err']:.1e} | {r['dh_rel_err']:.1e} | {r['dW_rel_err']:.1e} |")
    lines += ["", "| shape | weighted_ce time / torch chunked | weighted_ce time / materialized | "
              "weighted_ce peak RSS extra / materialized |", "|---|---|---|---|"]
    for shp in shapes:
        q = cpu_ratios([r for r in rows if f"{r['N']}x{r['D']}x{r['V']}" == shp])
        cells = [f"{q[k]:.3f}" if k in q else "-" for k in ("time_vs_torch_lce_chunked", "time_vs_materialized",
                                                             "rss_vs_materialized")]
        lines.append(f"| {shp} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    def _cpu_shapes():
        env = os.environ.get("REFIT_CPU_SHAPES")
        if not env:
            return CPU_SHAPES
        return tuple(tuple(int(x) for x in s.split("x")) for s in env.split(","))

    @pytest.mark.parametrize("shape", _cpu_shapes(), ids=lambda s: "x".join(map(str, s)))
    def test_cpu_peers(benchmark, shape):
        """Every CPU contender at one shape, interleaved (see run_cpu_shape); pytest-benchmark times
        the whole measurement once, the per-contender medians are in extra_info and REFIT_CPU_JSON.
        Then the issue's bars: weighted_ce not slower than torch's chunked path, and less peak
        memory than materialized logits."""
        n, d, v = shape
        rounds = int(os.environ.get("REFIT_CPU_ROUNDS", "3"))
        names = os.environ.get("REFIT_CPU_PEERS", ",".join(CPU_PEERS)).split(",")
        mem = os.environ.get("REFIT_CPU_MEMORY", "all")  # "all", "none" or names
        memory = True if mem == "all" else (False if mem == "none" else mem.split(","))
        rows = benchmark.pedantic(run_cpu_shape, args=(n, d, v, names, rounds), kwargs=dict(memory=memory),
                                  rounds=1, iterations=1)
        benchmark.extra_info.update(shape=dict(N=n, D=d, V=v), rows=rows, ratios=cpu_ratios(rows))
        out = os.environ.get("REFIT_CPU_JSON")
        if out:
            with open(out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        print("\n" + cpu_markdown(rows))
        q = cpu_ratios(rows)
        if "time_vs_torch_lce_chunked" in q:
            assert q["time_vs_torch_lce_chunked"] <= 1.0, q
        if "rss_vs_materialized" in q:
            assert q["rss_vs_materialized"] < 1.0, q


if __name__ == "__main__":
    sys.exit(main())
