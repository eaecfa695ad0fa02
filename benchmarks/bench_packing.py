"""Packer benchmark: planning rate, materialization rate, efficiency, and TRL's pack_dataset.

Data: 200k chat-like conversations, lengths ~ lognormal(median 600, sigma 0.8) clipped to
[1, 4096] (~163 M tokens), max_tokens 4096; loss masks are alternating runs of untrained and trained
tokens (mean run 60). Everything runs on one core (the C++ code is single-threaded).

    python -m pytest benchmarks/bench_packing.py -s -p no:cacheprovider --benchmark-columns=min,mean,rounds

`-s` shows the summary table (also written to $REFIT_BENCH_OUT if set). Every measurement that
allocates big arrays gets a warm-up round: on a VM the first touch of never-used guest memory costs
several times the packing itself and says nothing about the packer. Knobs: REFIT_BENCH_N
(conversations, default 200000). Peak memory is ~9 GB at the default size (the preallocated
materialization keeps the input and four int64 arrays per token). The TRL comparison runs when
`trl` and `datasets` import, and is skipped otherwise; trl is not a dependency of this project.

The Arrow-table comparison runs on an int64 and on an int32 `input_ids` column (Hugging Face
`datasets` stores tokenized ids as `list<int32>`); `FlatConversations.from_arrow` keeps either
without a copy. For it, both sides report the median of several rounds, measured in the same run.

pack() builds rows when they are read, so "pack() end to end" is what pack() itself costs; the
"iterate over every row" measurement adds building all of them (one epoch's worth).
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np
import pytest

from refit_fast.packing import FlatConversations, flatten, materialize, pack, plan_bins, row_buffers

N = int(os.environ.get("REFIT_BENCH_N", "200000"))
CAP = 4096
MEDIAN, SIGMA = 600, 0.8
BATCH_ROWS = 16  # rows materialized per call in the trainer-style (reused buffer) measurement

RESULTS: dict[str, str] = {}
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(np.log(MEDIAN), SIGMA, N)), 1, CAP).astype(np.int64)
    total = int(lengths.sum())
    ids = rng.integers(0, 128_000, total, dtype=np.int64)
    runs = rng.geometric(1 / 60, total // 30 + 16)
    runs = runs[: np.searchsorted(np.cumsum(runs), total) + 1]
    mask = np.repeat(np.arange(runs.size) % 2 == 1, runs)[:total]
    cuts = np.cumsum(lengths)[:-1]
    # The input as a data loader hands it over: one (ids, mask) pair of arrays per conversation.
    convs = list(zip(np.split(ids, cuts), np.split(mask, cuts)))
    return {"lengths": lengths, "convs": convs, "flat": flatten(convs), "tokens": total}


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not RESULTS:
        return
    for ids in ("int64", "int32"):
        if f"trl_{ids}" in TIMES and f"pack_arrow_{ids}" in TIMES:
            RESULTS[f"TRL / pack(), {ids} Arrow table (medians)"] = (
                f"{TIMES[f'trl_{ids}'] / TIMES[f'pack_arrow_{ids}']:.1f}x")
    if "trl" in TIMES:
        for key, what in [("pack", "pack(), list input"), ("pack_flat", "pack(), flat input"),
                          ("pack_arrow", "pack(), Arrow table via from_arrow"),
                          ("pack_rows", "pack() + every row built, flat input"),
                          ("plan_bfd", "plan_bins(bfd) alone")]:
            if key in TIMES:
                RESULTS[f"TRL time / {what} time"] = f"{TIMES['trl'] / TIMES[key]:.1f}x"
    lines = [
        f"Packer on one core of {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} CPUs), numpy {np.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"{N} conversations, lognormal median {MEDIAN} sigma {SIGMA}, max_tokens {CAP}. "
        "Best of rounds, except where a median is named.",
        "",
        "| measurement | result |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in RESULTS.items()]
    text = "\n".join(lines)
    print("\n" + text)
    out = os.environ.get("REFIT_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def best(benchmark) -> float | None:
    """Best round in seconds; None under --benchmark-disable (a smoke run records nothing)."""
    return benchmark.stats.stats.min if benchmark.stats else None


def median(benchmark) -> float | None:
    """Median round in seconds (None as for best): for the side-by-side with TRL, which varies."""
    return benchmark.stats.stats.median if benchmark.stats else None


@pytest.mark.parametrize("strategy", ["bfd", "ffs"])
def test_plan(benchmark, data, strategy):
    lengths = data["lengths"]
    plan = benchmark.pedantic(plan_bins, args=(lengths, CAP), kwargs={"strategy": strategy},
                              rounds=20, warmup_rounds=2)
    eff = plan.loads(lengths).sum() / (len(plan) * CAP)
    if strategy == "bfd":
        assert eff >= 0.995
    if best(benchmark) is None:
        return
    rate = N / best(benchmark) / 1e6
    benchmark.extra_info.update(M_conv_per_s=rate, efficiency=eff, rows=len(plan))
    RESULTS[f"plan {strategy}: conversations/s"] = f"{rate:.1f} M ({best(benchmark) * 1e3:.1f} ms)"
    RESULTS[f"plan {strategy}: efficiency"] = f"{eff:.4%} ({len(plan)} rows)"
    TIMES[f"plan_{strategy}"] = best(benchmark)


def _rate(benchmark, data, label):
    if best(benchmark) is None:
        return None
    rate = data["tokens"] / best(benchmark) / 1e6
    benchmark.extra_info["M_tokens_per_s"] = rate
    RESULTS[label] = f"{rate:.0f} M tokens/s"
    return rate


def test_materialize_fresh_arrays(benchmark, data):
    """All rows at once into newly allocated arrays (Packed.materialize_all): page faults included."""
    plan = plan_bins(data["lengths"], CAP)
    benchmark.pedantic(materialize, args=(data["flat"], plan), rounds=2, warmup_rounds=1)
    _rate(benchmark, data, "materialize all rows, new int64 arrays")


@pytest.mark.parametrize("dtype", [np.int64, np.int32], ids=["int64", "int32"])
def test_materialize_preallocated(benchmark, data, dtype):
    """All rows at once into buffers allocated (and touched) beforehand, e.g. reused per epoch."""
    plan = plan_bins(data["lengths"], CAP)
    out = row_buffers(plan, data["lengths"], dtype=dtype)
    benchmark.pedantic(materialize, args=(data["flat"], plan), kwargs={"dtype": dtype, "out": out},
                       rounds=3, warmup_rounds=1)
    _rate(benchmark, data, f"materialize all rows, preallocated {np.dtype(dtype)}")


def test_materialize_from_int32_ids(benchmark, data):
    """int64 rows from int32 flat ids (a datasets table's width, read as they are: 4 bytes less per
    token) against the same rows from int64 ids, all rows into preallocated buffers and 16-row
    batches. The two inputs alternate within each round, so load from other jobs on the VM hits
    both alike; medians of the rounds."""
    f = data["flat"]
    inputs = {"int64": f, "int32": FlatConversations(f.input_ids.astype(np.int32), f.loss_mask, f.offsets)}
    plan = plan_bins(data["lengths"], CAP)
    out = row_buffers(plan, data["lengths"])
    batch = row_buffers(plan, data["lengths"], rows=BATCH_ROWS)
    times: dict[tuple[str, str], list[float]] = {}

    def one_round():
        for ids, flat in inputs.items():
            t = time.perf_counter()
            materialize(flat, plan, out=out)
            times.setdefault(("all rows", ids), []).append(time.perf_counter() - t)
            t = time.perf_counter()
            for a in range(0, len(plan), BATCH_ROWS):
                materialize(flat, plan, rows=slice(a, a + BATCH_ROWS), out=batch)
            times.setdefault((f"{BATCH_ROWS}-row batches", ids), []).append(time.perf_counter() - t)

    benchmark.pedantic(one_round, rounds=5, warmup_rounds=1)
    if best(benchmark) is None:
        return
    for (what, ids), ts in times.items():
        rate = data["tokens"] / float(np.median(ts[1:])) / 1e6  # ts[0] is the warm-up round
        RESULTS[f"materialize {what}, int64 rows, from {ids} ids (alternating, median)"] = f"{rate:.0f} M tokens/s"


@pytest.mark.parametrize("dtype", [np.int64, np.int32], ids=["int64", "int32"])
def test_materialize_batches(benchmark, data, dtype):
    """Trainer-style: BATCH_ROWS rows per call into one small reused buffer, over the whole epoch."""
    flat, plan = data["flat"], plan_bins(data["lengths"], CAP)
    out = row_buffers(plan, data["lengths"], rows=BATCH_ROWS, dtype=dtype)

    def epoch():
        for a in range(0, len(plan), BATCH_ROWS):
            materialize(flat, plan, rows=slice(a, a + BATCH_ROWS), dtype=dtype, out=out)

    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
    _rate(benchmark, data, f"materialize {BATCH_ROWS}-row batches, reused {np.dtype(dtype)} buffer")


def test_pack_end_to_end(benchmark, data):
    """pack() from the list of per-conversation arrays: check + copy into one buffer (C++), plan.

    Rows are built on access (see Packed), so this is everything pack() does before rows are read.
    """
    packed = benchmark.pedantic(pack, args=(data["convs"], CAP), rounds=3, warmup_rounds=1)
    assert packed.stats.efficiency >= 0.995
    t = best(benchmark)
    if t is None:
        return
    benchmark.extra_info.update(M_conv_per_s=N / t / 1e6, efficiency=packed.stats.efficiency)
    RESULTS["pack() end to end, list of arrays"] = f"{t * 1e3:.0f} ms ({N / t / 1e3:.0f} k conversations/s)"
    RESULTS["pack() efficiency"] = f"{packed.stats.efficiency:.4%}"
    TIMES["pack"] = t


def test_pack_end_to_end_flat(benchmark, data):
    """pack() from a FlatConversations (one buffer + offsets: the same layout as an Arrow table)."""
    benchmark.pedantic(pack, args=(data["flat"], CAP), rounds=10, warmup_rounds=1)
    t = best(benchmark)
    if t is None:
        return
    RESULTS["pack() end to end, flat input"] = f"{t * 1e3:.1f} ms ({N / t / 1e6:.0f} M conversations/s)"
    TIMES["pack_flat"] = t


@pytest.mark.parametrize("ids", ["int64", "int32"])
def test_pack_from_arrow_table(benchmark, data, ids):
    """pack() from the same in-memory Arrow table TRL gets: FlatConversations.from_arrow (no copy of
    the int64 or int32 ids; ids and mask values checked) and pack. Runs when pyarrow imports."""
    pa = pytest.importorskip("pyarrow")
    table = _arrow_table(pa, data["flat"], ids)
    values = table["input_ids"].chunk(0).values.to_numpy()

    def run():
        return pack(FlatConversations.from_arrow(table["input_ids"], table["completion_mask"]), CAP)

    packed = benchmark.pedantic(run, rounds=7, warmup_rounds=1)
    assert packed.flat.input_ids.dtype == ids and np.shares_memory(packed.flat.input_ids, values)
    t, m = best(benchmark), median(benchmark)
    if t is None:
        return
    RESULTS[f"pack() end to end, {ids} Arrow table (values checked)"] = f"{m * 1e3:.0f} ms median ({t * 1e3:.0f} ms best)"
    TIMES[f"pack_arrow_{ids}"] = m
    if ids == "int64":
        TIMES["pack_arrow"] = t


def _arrow_table(pa, flat, ids="int64"):
    offsets = pa.array(flat.offsets.astype(np.int32))
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat.input_ids.astype(ids))),
        "completion_mask": pa.ListArray.from_arrays(offsets, pa.array(flat.loss_mask.astype(np.int8))),
    })


def test_pack_and_read_every_row(benchmark, data):
    """pack() from flat input, then every row built by iterating (64 rows per C++ call)."""

    def run():
        n = 0
        for row in pack(data["flat"], CAP):
            n += row["input_ids"].shape[0]
        return n

    n = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert n == data["tokens"]
    t = best(benchmark)
    if t is None:
        return
    RESULTS["pack() + iterate over every row, flat input"] = (
        f"{t:.2f} s ({data['tokens'] / t / 1e6:.0f} M tokens/s)")
    TIMES["pack_rows"] = t


@pytest.mark.parametrize("ids", ["int64", "int32"])
def test_trl_pack_dataset(benchmark, data, ids):
    """TRL's pack_dataset(strategy="bfd") on the same conversations, from an in-memory Arrow table
    with int64 or int32 ids (the latter is what datasets' tokenization produces)."""
    try:
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable
        from trl import pack_dataset
    except Exception as e:  # noqa: BLE001 - any import failure means "no TRL here"
        pytest.skip(f"trl/datasets not importable: {e}")
    datasets.disable_progress_bars()
    table = _arrow_table(pa, data["flat"], ids)
    # Explicit fingerprints skip datasets' dill hashing of the table, which is outside what we compare
    # (and fails with some dill/pyarrow combinations).
    ds = datasets.Dataset(InMemoryTable(table), fingerprint="bench-input")
    out = benchmark.pedantic(
        pack_dataset, args=(ds, CAP), kwargs={"strategy": "bfd", "map_kwargs": {"new_fingerprint": "bench-out"}},
        rounds=5, warmup_rounds=1,
    )
    t, m = best(benchmark), median(benchmark)
    if t is None:
        return
    rows = len(out)
    eff = data["tokens"] / (rows * CAP)
    benchmark.extra_info.update(M_conv_per_s=N / t / 1e6, efficiency=eff)
    RESULTS[f"TRL pack_dataset(bfd) end to end, {ids} Arrow table"] = (
        f"{m:.2f} s median ({t:.2f} s best; {N / m / 1e3:.0f} k conversations/s)")
    RESULTS["TRL pack_dataset(bfd) efficiency"] = f"{eff:.4%} ({rows} rows; packs per map batch of 1000)"
    RESULTS["TRL version"] = __import__("trl").__version__
    TIMES[f"trl_{ids}"] = m
    if ids == "int64":
        TIMES["trl"] = t
