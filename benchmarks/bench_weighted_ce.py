"""Loss-kernel benchmark: refit_fast.weighted_ce against naive PyTorch (materialized fp32 logits),
torch.compile of it, Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, each
when importable, side by side in one process.

GPU (the numbers we quote)::

    python benchmarks/bench_weighted_ce.py                       # D=4096, V=128256, N=4k/16k/64k, bf16
    python benchmarks/bench_weighted_ce.py --n 8192 --d 2304 --v 256000   # Gemma-like

It times forward+backward with CUDA events after warm-up, rotating between input sets, and reports
the median (p20/p80 too), the peak memory beyond inputs and their gradients, TFLOP/s against
6*N*D*V, and the fraction of the FLOP floor at a bf16 matmul rate measured in the same run. Results
go to benchmarks/results/<device>-<date>.json and .md.

CPU (pytest-benchmark; the chunked torch path against materializing the logits)::

    python -m pytest benchmarks/bench_weighted_ce.py --benchmark-only
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
def _naive(h, W, y):
    return weighted_ce_reference(h, W, y, normalize="token")


def contenders(device: str) -> dict:
    """name -> callable, for every implementation importable here (all compute the same token-mean NLL)."""
    out = {
        "refit_fast": lambda h, W, y: weighted_ce(h, W, y, normalize="token"),
        "refit_fast_torch": lambda h, W, y: weighted_ce(h, W, y, normalize="token", impl="torch"),
        "naive_torch": _naive,
    }
    if device == "cuda":
        out["torch_compile"] = torch.compile(_naive, dynamic=False)
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
            out["liger"] = lambda h, W, y: liger(W, h, y)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cut_cross_entropy"] = lambda h, W, y: linear_cross_entropy(h, W, y, reduction="mean")
        except ImportError:
            pass
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
    p.add_argument("--out", default=None, help="results file stem (default: weighted_ce-<device>-<date>)")
    args = p.parse_args(argv)
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


# ---- CPU: pytest-benchmark (collected when this file is named on the pytest command line) ----
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    _CPU_SHAPE = dict(n=2048, d=512, v=32000)

    @pytest.mark.parametrize("name", ["refit_fast_torch", "naive_torch"])
    def test_cpu_forward_backward(benchmark, name):
        torch.manual_seed(0)
        W, pairs = make_inputs(_CPU_SHAPE["n"], _CPU_SHAPE["d"], _CPU_SHAPE["v"], torch.float32, "cpu", 1)
        h, y = pairs[0]
        fn = contenders("cpu")[name]

        def step():
            h.grad = W.grad = None
            fn(h, W, y).backward()

        benchmark.extra_info.update(_CPU_SHAPE)
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
