"""Roofline model of one weighted_ce forward + backward: every launch, its FLOPs and bytes, its time.

    python benchmarks/perf_model.py --n 8192 --d 4096 --v 128256 --device h200            # default plan
    python benchmarks/perf_model.py --n 8192 --d 4096 --v 128256 --device h200 --plan v1  # today's loop
    python benchmarks/perf_model.py ... --json                                             # for machines

What is modelled: the chunk loop of refit_fast/ops/weighted_ce.py with scalar reduction ("mean"/"sum",
gradients computed in the forward, 6*N*D*V FLOPs), bf16/fp16 inputs on CUDA (fp32 logits from
`mm(out_dtype=fp32)`, a separate bf16 gradient buffer) or fp32 inputs (gradient written in place
over the logits), N trained tokens (untrained ones cost nothing and are not counted here).

A chunk plan has `sub_rows` (rows of one logits GEMM + row-kernel launch), `stage_rows` (rows of
one dh GEMM and one dW GEMM: the K of the dW GEMM), `n_stages` and `dw_fp32` (an fp32 [V, D]
accumulator for a bf16/fp16 weight). The v1 plan (today's loop) has sub_rows = stage_rows = the
rows that fit the 256 MiB budget, dW accumulated in the weight dtype. With plan=None the model
uses `refit_fast.ops.chunking.plan_chunks` when it is importable, else v1.

Launches per stage of s rows (sub-chunks of at most sub_rows rows inside it):
  gather       hc = h[idx]                       read s*D, write s*D          (index_select)
  logits GEMM  z = hc @ W.T, fp32 out            M=sub, N=V, K=D, per sub-chunk
  row kernel   two passes over z, writes g       read 2*sub*V*4, write sub*V*gb, per sub-chunk
  dh GEMM      g @ W                             M=s, N=D, K=V (out in the input dtype)
  scatter      dh[idx] = that                    read s*D, write s*D          (index_copy_)
  dW addmm     dW += g.T @ hc                    M=V, N=D, K=s, beta=1 (reads and writes dW)
Once per call: zeros for dh and dW, the fp32 -> bf16 cast of an fp32 accumulator, and (v1 driver)
in backward the scaling of the saved gradients by the upstream gradient (dh * g, dW * g: new
tensors). The v2 driver (refit_fast/ops/chunking.py `fused_linear_ce`) runs the same launches with
its own buffers (logits GEMM `out=` a preallocated sub-chunk buffer, the row kernel writing into the
staging block) and scales in backward in place, only when grad_out != 1: the model assumes
`loss.backward()` (grad_out = 1, as the benchmarks do), so that costs nothing.

Rules (all in this file, each a named constant):
  * GEMM: time = max(compute, memory) (with --no-overlap, compute + memory for the beta=1 dW addmm:
    a pessimistic bound for the case where its accumulator traffic does not hide under the math).
    - memory = every operand and output byte once (A, B, C read when beta=1, D written, split-K
      partials written and read) / the device's copy bandwidth.
    - compute: output tiles of 128 x 128 (M and N rounded up: tile quantization), K in blocks of
      64 (K rounded up too); tiles run in waves over the SMs; a tile costs (k-blocks + PIPE_FILL)
      k-block times, where PIPE_FILL = 4 k-blocks stands for the pipeline fill and drain of each
      tile (an assumption: one fill of a 4-stage pipeline, not a measurement). The GEMM may split
      K by s in {1, 2, 4, 8, 16} (the k-blocks shared evenly by the splits, stream-K style; each
      split tile pays its own fill), taking the fastest; a split adds its fp32 partials' bytes
      (written, then read) and one reduction launch. Splitting pays only when the tiles leave SMs
      idle (the v1 dh GEMM: 96 tiles on 132 SMs). With this rule a bigger K is never faster and,
      over whole k-blocks, never slower per FLOP (tested).
    - the per-SM rate is set so that the 8192^3 GEMM of the device's rate measurement comes out at
      exactly the measured rate (that GEMM has its own waves and fill: 32 waves of 4096 tiles on
      132 SMs, 128 k-blocks); and no GEMM is predicted faster than the measured rate (a GEMM with
      fewer wasted waves than that measurement would otherwise come out above it).
  * element-wise kernels (row kernel, gather/scatter, zeros, casts, scaling): bytes / bandwidth.
    The row kernel's exponentials (2 per logit) are below its memory time on all three devices
    (e.g. H100/H200: 16 SFU ops/clk/SM x 132 SMs x ~1.98 GHz = 4.2e12/s vs 4.3e12 B/s / 10 B per
    logit = 0.43e12 logits/s) and are not counted.
  * LAUNCH_GAP_S = 2 us of idle device time per launch (an assumption, not a measurement): the
    dependent kernels of the loop run back to back, so the host's launch cost is hidden but each
    kernel's tail and the next one's ramp are not.
What it leaves out: L2 hits (every operand comes from HBM: pessimistic for the small ones), overlap of
a kernel's tail with the next kernel, clocks falling under load, the host sync of the validation.

The floor is 6*N*D*V FLOPs at the device's dense rate for the dtype; `fraction` = floor / total.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Devices. bf16_flops: dense bf16 tensor-core rate; fp32_flops: plain FP32 (FFMA, what torch uses for
# fp32 matmuls by default: torch.backends.cuda.matmul.allow_tf32 is False); tf32_flops: dense TF32
# tensor cores; hbm_bytes_per_s: copy bandwidth counting bytes read plus written.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops: float
    fp32_flops: float  # plain FP32 (not TF32)
    tf32_flops: float
    hbm_bytes_per_s: float
    n_sm: int
    source: str

    def rate(self, dtype: str) -> float:
        return self.bf16_flops if _DTYPES[dtype] == 2 else self.fp32_flops


DEVICES: dict[str, Device] = {
    "h200": Device(
        name="NVIDIA H200 (SXM, 141 GB)", bf16_flops=790e12, fp32_flops=67e12, tf32_flops=494.5e12,
        hbm_bytes_per_s=4.3e12, n_sm=132,
        source=("bf16 790 TFLOP/s and 4.3 TB/s measured on our H200 (/work/.library/device/KINDS.md, "
                "2026-10-28 and 2026-11-04: 8192^3 bf16 torch matmul 769-798 TFLOP/s on random data, "
                "device-to-device copy 4.3 TB/s read+write; the issue #14 and DESIGN.md use 790); "
                "fp32 67 and tf32 494.5 (dense) TFLOP/s from NVIDIA's H100/H200 SXM datasheet; "
                "132 SMs as PyTorch reported them there")),
    "h100": Device(
        name="NVIDIA H100 (SXM, 80 GB)", bf16_flops=798e12, fp32_flops=67e12, tf32_flops=494.5e12,
        hbm_bytes_per_s=3.0e12, n_sm=132,
        source=("bf16 798 TFLOP/s (8192^3 random) and ~3.0 TB/s copy measured on an H100 80GB here "
                "(benchmarks/NOTES.md header, from the device tool's KINDS.md of 2026-11); fp32 67 "
                "and tf32 494.5 (dense) TFLOP/s and 132 SMs from NVIDIA's H100 SXM datasheet")),
    "a100": Device(
        name="NVIDIA A100 (SXM4, 80 GB)", bf16_flops=312e12, fp32_flops=19.5e12, tf32_flops=156e12,
        hbm_bytes_per_s=2.039e12, n_sm=108,
        source=("all datasheet, never measured here: NVIDIA A100 80GB SXM4 datasheet (bf16 312 dense, "
                "fp32 19.5, tf32 156 dense TFLOP/s, HBM2e 2,039 GB/s), 108 SMs (A100 whitepaper). "
                "Achieved rates are below these: the prediction is optimistic on this device")),
}

_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}

# GEMM rule constants (see the module docstring)
TILE_M = 128
TILE_N = 128
TILE_K = 64
PIPE_FILL = 4  # k-block times of fill/drain per output tile (assumption)
SPLITS = (1, 2, 4, 8, 16)
REF_GEMM = 8192  # the rate measurement's square GEMM
LAUNCH_GAP_S = 2e-6  # idle device time per launch (assumption)
# Sensitivity switch (CLI --no-overlap): False adds a beta=1 GEMM's bytes time to its compute time
# instead of taking the max, as if the accumulator's read-modify-write never overlapped the mainloop.
BETA_OVERLAP = True
DEFAULT_BUDGET = 256 * 2**20  # refit_fast's chunk_budget default

COMPONENTS = ("logits GEMM", "row kernel", "dh GEMM", "dW addmm", "gather/scatter", "casts/copies", "launch gaps")


# --------------------------------------------------------------------------------------------------
# GEMM and element-wise costs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gemm:
    """D[M, N] = A[M, K] @ B[K, N] (+ C when beta=1); *_b are element sizes in bytes."""

    m: int
    n: int
    k: int
    a_b: int
    b_b: int
    d_b: int
    beta: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def bytes(self) -> int:
        """Operand and output bytes, each once (no split-K partials)."""
        out = self.m * self.n * self.d_b
        return self.m * self.k * self.a_b + self.k * self.n * self.b_b + out * (2 if self.beta else 1)


def _tiles(m: int, n: int) -> int:
    return math.ceil(m / TILE_M) * math.ceil(n / TILE_N)


def _kblock_time(dev: Device, rate: float) -> float:
    """Seconds one SM needs for one 128x128x64 k-block, calibrated on the REF_GEMM^3 measurement."""
    tiles = _tiles(REF_GEMM, REF_GEMM)
    waves = math.ceil(tiles / dev.n_sm)
    kb = math.ceil(REF_GEMM / TILE_K)
    return (2 * REF_GEMM**3 / rate) / (waves * (kb + PIPE_FILL))


def gemm_plan(g: Gemm, dev: Device, rate: float) -> dict:
    """The chosen split and its compute / memory seconds (see the rules in the module docstring)."""
    tiles = _tiles(g.m, g.n)
    kb = math.ceil(g.k / TILE_K)
    t_kb = _kblock_time(dev, rate)
    best = None
    for s in SPLITS:
        waves = math.ceil(tiles * s / dev.n_sm)
        compute = waves * (kb / s + PIPE_FILL) * t_kb  # k-blocks shared evenly by the splits
        compute = max(compute, g.flops / rate)  # never faster than the measured rate
        partial = (2 * s * g.m * g.n * 4) if s > 1 else 0  # fp32 partials written, then read by the reduction
        memory = (g.bytes + partial) / dev.hbm_bytes_per_s
        # beta=1 (the dW addmm): its accumulator's read-modify-write hides under the compute, or not
        t = (max(compute, memory) if (BETA_OVERLAP or not g.beta) else compute + memory) + (LAUNCH_GAP_S if s > 1 else 0.0)
        if best is None or t < best["s"]:
            best = dict(s=t, split=s, compute_s=compute, memory_s=memory, waves=waves,
                        launches=2 if s > 1 else 1, bytes=g.bytes + partial)
    return best


def gemm_seconds(g: Gemm, dev: Device, rate: float) -> float:
    return gemm_plan(g, dev, rate)["s"]


# --------------------------------------------------------------------------------------------------
# Chunk plans
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class V1Plan:
    """Today's byte-budget plan (refit_fast/ops/weighted_ce.py `_chunk_rows`), reproduced here."""

    sub_rows: int
    stage_rows: int
    n_stages: int
    dw_fp32: bool = False
    budget_bytes: int = DEFAULT_BUDGET
    name: str = "v1"
    driver: str = "v1"  # the code that runs it: v1 scales the saved gradients into new tensors in backward


def v1_rows(d: int, v: int, dtype: str = "bf16", budget_bytes: int = DEFAULT_BUDGET) -> int:
    """Rows per chunk of the v1 loop (Triton path on CUDA): the budget over fp32 logits + the
    separate low-precision gradient (bf16/fp16 only) + the gathered hidden row."""
    eb = _DTYPES[dtype]
    per_row = v * 4 + (v * eb if eb != 4 else 0) + d * eb
    return max(1, budget_bytes // per_row)


def plan_v1(n: int, d: int, v: int, dtype: str = "bf16", budget_bytes: int = DEFAULT_BUDGET) -> V1Plan:
    c = v1_rows(d, v, dtype, budget_bytes)
    return V1Plan(sub_rows=c, stage_rows=c, n_stages=math.ceil(n / c) if n else 0, dw_fp32=False,
                  budget_bytes=budget_bytes)


def _plan_default(n: int, d: int, v: int, dtype: str):
    """refit_fast.ops.chunking.plan_chunks where it exists, else None."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from refit_fast.ops.chunking import plan_chunks
    except ImportError:
        return None
    import torch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return plan_chunks(n, d, v, dtype=tdt)


def resolve_plan(n: int, d: int, v: int, dtype: str, plan):
    """plan: None / "default" (plan_chunks if importable, else v1), "v1", or a plan object."""
    if plan is None or plan == "default":
        p = _plan_default(n, d, v, dtype)
        return p if p is not None else plan_v1(n, d, v, dtype)
    if plan == "v1":
        return plan_v1(n, d, v, dtype)
    if isinstance(plan, str):
        raise ValueError(f"perf_model: plan must be None, 'default', 'v1' or a plan object, got {plan!r}")
    return plan


def plan_summary(plan) -> dict:
    out = {k: getattr(plan, k) for k in ("sub_rows", "stage_rows", "n_stages", "dw_fp32")}
    if hasattr(plan, "name"):
        out["source"] = plan.name
    elif type(plan).__module__ == "refit_fast.ops.chunking":
        out["source"] = "plan_chunks"
    else:
        out["source"] = type(plan).__module__ + "." + type(plan).__name__
    out = {k: (bool(x) if k == "dw_fp32" else x) for k, x in out.items()}
    return out


# --------------------------------------------------------------------------------------------------
# Launches of one forward + backward
# --------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kind: str  # one of COMPONENTS (not "launch gaps")
    what: str
    flops: int = 0
    bytes: int = 0
    gemm: Gemm | None = None
    count: int = 1  # identical launches folded into one record


def _stage_sizes(n: int, stage_rows: int) -> list[tuple[int, int]]:
    """[(rows, how many stages of that size)] covering n rows."""
    if n <= 0:
        return []
    full, rest = divmod(n, stage_rows)
    return [(stage_rows, full)] * (full > 0) + [(rest, 1)] * (rest > 0)


def launches(n: int, d: int, v: int, dtype: str, plan) -> list[Launch]:
    """Every launch of one forward + backward of weighted_ce at reduction='mean', folded by shape."""
    eb = _DTYPES[dtype]
    lowp = eb != 4
    gb = eb if lowp else 4  # gradient buffer element (in place over the logits when fp32)
    wacc = 4 if (not lowp or plan.dw_fp32) else eb  # dW accumulator element
    sub, stage = int(plan.sub_rows), int(plan.stage_rows)
    if sub < 1 or stage < 1:
        raise ValueError(f"perf_model: plan rows must be >= 1, got sub_rows={sub}, stage_rows={stage}")
    out: list[Launch] = []

    def add(kind, what, count=1, flops=0, nbytes=0, gemm=None):
        if count:
            out.append(Launch(kind, what, flops, nbytes, gemm, count))

    # once per call, forward: zeroed gradients (the dW accumulator in its own dtype)
    add("casts/copies", "zeros dh [N, D]", nbytes=n * d * eb)
    add("casts/copies", "zeros dW accumulator [V, D]", nbytes=v * d * wacc)
    for s, cnt in _stage_sizes(n, stage):
        add("gather/scatter", f"index_select h [{s}, D]", cnt, nbytes=2 * s * d * eb + s * 8)
        for r, k in _stage_sizes(s, min(sub, s)):
            z = Gemm(r, v, d, eb, eb, 4)
            add("logits GEMM", f"z[{r}, V] = hc @ W.T (fp32 out)", cnt * k, z.flops, z.bytes, z)
            add("row kernel", f"lse + g over [{r}, V]", cnt * k, nbytes=r * v * (4 + 4 + gb) + r * 16)
        dh = Gemm(s, d, v, gb, eb, eb)
        add("dh GEMM", f"g[{s}, V] @ W", cnt, dh.flops, dh.bytes, dh)
        add("gather/scatter", f"index_copy dh [{s}, D]", cnt, nbytes=2 * s * d * eb + s * 8)
        dw = Gemm(v, d, s, gb, eb, wacc, beta=True)
        add("dW addmm", f"dW += g.T @ hc, K={s}", cnt, dw.flops, dw.bytes, dw)
    if lowp and plan.dw_fp32:
        add("casts/copies", "dW fp32 -> weight dtype", nbytes=v * d * (4 + eb))
    if _driver(plan) == "v1":
        # backward: the saved gradients times the upstream gradient, as new tensors
        add("casts/copies", "backward dh * grad_out", nbytes=2 * n * d * eb)
        add("casts/copies", "backward dW * grad_out", nbytes=2 * v * d * eb)
    else:
        # v2 driver: scales in place only when grad_out != 1; loss.backward() (the benchmarks) touches nothing
        add("casts/copies", "backward: grad_out != 1 check")
    return out


def _driver(plan) -> str:
    """'v1' for today's loop (V1Plan), 'v2' for the staged driver that runs plan_chunks' plans."""
    return getattr(plan, "driver", "v2")


def extra_bytes(n: int, d: int, v: int, dtype: str, plan) -> int:
    """Peak device memory beyond the inputs and one copy of each gradient (what the GPU bench
    reports as extra): the largest of the three moments below.
      loop:     fp32 dW accumulator (if any) + one stage's gradient buffer + one sub-chunk's fp32
                logits + the gathered rows and the dh GEMM's output of a stage + O(N) vectors;
      cast:     fp32 accumulator alive while its bf16 copy (the gradient) is written;
      backward: v1 only: the saved dh and dW while dh * g and dW * g are built (the saved ones are
                extra); the v2 driver scales in place.
    For plan_chunks' plans this is an independent count of what ChunkPlan.extra_bytes plans, plus
    the O(N) vectors (24 bytes per trained token here: two int64 and two fp32 vectors)."""
    eb = _DTYPES[dtype]
    lowp = eb != 4
    sub, stage = min(plan.sub_rows, max(n, 1)), min(plan.stage_rows, max(n, 1))
    vectors = n * (8 + 8 + 4 + 4)  # idx_v, labels_v (int64), w_v, loss_v (fp32)
    acc = v * d * 4 if (lowp and plan.dw_fp32) else 0
    if lowp:
        chunk = sub * v * 4 + stage * v * eb  # fp32 logits of a sub-chunk, bf16 gradients of a stage
    else:
        chunk = max(sub, stage) * v * 4  # in place
    chunk += 2 * stage * d * eb  # gathered hidden rows, dh GEMM output
    loop = acc + chunk + vectors
    cast = acc + vectors
    backward = (n * d * eb + v * d * eb + vectors) if _driver(plan) == "v1" else 0  # v2 scales in place
    return int(max(loop, cast, backward))


# --------------------------------------------------------------------------------------------------
# The prediction
# --------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    n: int
    d: int
    v: int
    device: str
    dtype: str
    plan: dict
    components: dict[str, float]  # ms per launch kind
    total_ms: float
    floor_ms: float
    fraction: float
    extra_bytes: int
    flops: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    n_launches: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        dev = DEVICES[self.device]
        lines = [f"weighted_ce fwd+bwd, N={self.n} D={self.d} V={self.v} {self.dtype} on {dev.name}",
                 f"plan: {self.plan}",
                 f"{'component':<16}{'ms':>9}{'launches':>10}{'GFLOP':>10}{'GB':>9}"]
        for k, ms in self.components.items():
            lines.append(f"{k:<16}{ms:9.3f}{self.n_launches.get(k, 0):10d}{self.flops.get(k, 0) / 1e9:10.1f}"
                         f"{self.bytes.get(k, 0) / 1e9:9.2f}")
        lines.append(f"{'total':<16}{self.total_ms:9.3f}")
        lines.append(f"floor 6*N*D*V at {dev.rate(self.dtype) / 1e12:.0f} TFLOP/s: {self.floor_ms:.3f} ms; "
                     f"fraction of floor: {self.fraction:.3f}; extra memory {self.extra_bytes / 2**30:.3f} GiB")
        return "\n".join(lines)


def floor_ms(n: int, d: int, v: int, device: str = "h200", dtype: str = "bf16") -> float:
    return 6 * n * d * v / DEVICES[device].rate(dtype) * 1e3


def predict(n: int, d: int, v: int, *, device: str = "h200", dtype: str = "bf16", plan=None) -> Prediction:
    """Predicted ms per launch kind for one forward + backward (see the module docstring)."""
    if device not in DEVICES:
        raise ValueError(f"perf_model: device must be one of {sorted(DEVICES)}, got {device!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"perf_model: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if min(n, d, v) < 1:
        raise ValueError(f"perf_model: n, d, v must be >= 1, got {n}, {d}, {v}")
    dev = DEVICES[device]
    rate = dev.rate(dtype)
    p = resolve_plan(n, d, v, dtype, plan)
    comp = {k: 0.0 for k in COMPONENTS}
    flops = {k: 0 for k in COMPONENTS}
    nbytes = {k: 0 for k in COMPONENTS}
    count = {k: 0 for k in COMPONENTS}
    for L in launches(n, d, v, dtype, p):
        if L.gemm is not None:
            gp = gemm_plan(L.gemm, dev, rate)
            sec, nb, nl = gp["s"], gp["bytes"], gp["launches"]
        else:
            sec, nb, nl = L.bytes / dev.hbm_bytes_per_s, L.bytes, 1
        comp[L.kind] += sec * L.count * 1e3
        flops[L.kind] += L.flops * L.count
        nbytes[L.kind] += nb * L.count
        count[L.kind] += nl * L.count
    total_launches = sum(count.values())
    comp["launch gaps"] = total_launches * LAUNCH_GAP_S * 1e3
    count["launch gaps"] = total_launches
    total = sum(comp.values())
    fl = floor_ms(n, d, v, device, dtype)
    return Prediction(n=n, d=d, v=v, device=device, dtype=dtype, plan=plan_summary(p), components=comp,
                      total_ms=total, floor_ms=fl, fraction=fl / total, extra_bytes=extra_bytes(n, d, v, dtype, p),
                      flops=flops, bytes=nbytes, n_launches=count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--device", default="h200", choices=sorted(DEVICES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--plan", default="default", choices=["default", "v1"])
    ap.add_argument("--json", action="store_true", help="print the prediction as JSON")
    ap.add_argument("--no-overlap", action="store_true",
                    help="sensitivity: the dW addmm's accumulator traffic adds to its compute (no overlap)")
    a = ap.parse_args(argv)
    global BETA_OVERLAP
    saved, BETA_OVERLAP = BETA_OVERLAP, not a.no_overlap
    try:
        pred = predict(a.n, a.d, a.v, device=a.device, dtype=a.dtype, plan=a.plan)
    finally:
        BETA_OVERLAP = saved
    print(json.dumps(pred.as_dict(), indent=2) if a.json else pred.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
