"""Tests of the C++ packer (csrc/) through refit_fast.packing.

The references below are deliberately naive (linear scans, per-token Python loops) so they share no
code or data structure with the C++ planner: they define what "best fit", "first fit", the tie
rule and the seeded shuffle mean, and the compiled packer must agree with them exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from refit_fast.packing import (
    BinPlan,
    FlatConversations,
    check_max_tokens,
    check_overlong,
    check_pad_to,
    check_strategy,
    exchange_starts,
    flatten,
    materialize,
    pack,
    plan_bins,
    row_buffers,
    to_torch,
    truncate_turns,
)
from refit_fast.packing import flat as flat_module
from refit_fast.packing import options as options_module
from refit_fast.packing import pipeline as pipeline_module
from refit_fast.packing import plan as plan_module
from refit_fast.packing import rows as rows_module
from refit_fast.packing import turns as turns_module

IGNORE = -100
M64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# Pure-Python reference packer
# --------------------------------------------------------------------------------------------------


class RefRng:
    """splitmix64 with multiply-shift range reduction, as specified in csrc/packing.h."""

    def __init__(self, seed: int):
        self.state = seed & M64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return (self.next() * n) >> 64

    def shuffle(self, a: list) -> None:
        for i in range(len(a) - 1, 0, -1):
            j = self.below(i + 1)
            a[i], a[j] = a[j], a[i]


def ref_plan(lengths, cap: int, strategy: str = "bfd", seed: int = 0) -> list[list[int]]:
    """Bins as lists of conversation indices, in final (shuffled) order."""
    rng = RefRng(seed)
    kept = [i for i, n in enumerate(lengths) if n <= cap]
    bins: list[list[int]] = []
    left: list[int] = []
    if strategy == "bfd":
        # Longest first, ties by index. Best fit = least room left over; among equally tight bins
        # the one whose room changed most recently.
        changed: list[int] = []
        for t, i in enumerate(sorted(kept, key=lambda i: (-lengths[i], i))):
            s = lengths[i]
            best = None
            for b in range(len(bins)):
                if left[b] >= s and (
                    best is None
                    or left[b] < left[best]
                    or (left[b] == left[best] and changed[b] > changed[best])
                ):
                    best = b
            if best is None:
                bins.append([])
                left.append(cap)
                changed.append(t)
                best = len(bins) - 1
            bins[best].append(i)
            left[best] -= lengths[i]
            changed[best] = t
    else:
        rng.shuffle(kept)
        for i in kept:
            b = next((b for b in range(len(bins)) if left[b] >= lengths[i]), None)
            if b is None:
                bins.append([])
                left.append(cap)
                b = len(bins) - 1
            bins[b].append(i)
            left[b] -= lengths[i]
    perm = list(range(len(bins)))
    rng.shuffle(perm)
    return [bins[k] for k in perm]


def ref_rows(convs, bins, pad_to=None, pad_id=0, local=False) -> list[dict]:
    """Rows built token by token from the definition of every field (``local``: seq_ids="local")."""
    rows = []
    for b in bins:
        r = {"input_ids": [], "labels": [], "position_ids": [], "seq_ids": [], "cu_seqlens": [0]}
        seglens = []
        for place, c in enumerate(b):
            ids, mask = (list(map(int, x)) for x in convs[c][:2])
            for j in range(len(ids)):
                r["input_ids"].append(ids[j])
                r["labels"].append(ids[j + 1] if j + 1 < len(ids) and mask[j + 1] else IGNORE)
                r["position_ids"].append(j)
                r["seq_ids"].append(place if local else c)
            r["cu_seqlens"].append(len(r["input_ids"]))
            seglens.append(len(ids))
        if pad_to is not None and len(r["input_ids"]) < pad_to:
            pad = pad_to - len(r["input_ids"])
            r["input_ids"] += [pad_id] * pad
            r["labels"] += [IGNORE] * pad
            r["position_ids"] += list(range(pad))
            r["seq_ids"] += [-1] * pad
            r["cu_seqlens"].append(pad_to)
            seglens.append(pad)
        r["max_seqlen"] = max(seglens)
        rows.append(r)
    return rows


def brute_force_min_bins(lengths, cap: int) -> int:
    """Optimal bin count by dynamic programming over subsets (tiny inputs only)."""
    items = [n for n in lengths if n <= cap]
    k = len(items)
    full = (1 << k) - 1
    fits = [sum(items[j] for j in range(k) if s >> j & 1) <= cap for s in range(full + 1)]
    best = [0] + [k + 1] * full
    for s in range(1, full + 1):
        low = s & -s  # the lowest item must go somewhere: enumerate only subsets holding it
        rest = s ^ low
        sub = rest
        while True:
            if fits[sub | low]:
                best[s] = min(best[s], best[rest ^ sub] + 1)
            if sub == 0:
                break
            sub = (sub - 1) & rest
    return best[full]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def make_convs(lengths, rng, vocab=50_000):
    """Conversations with chat-like masks: alternating runs of untrained and trained tokens."""
    convs = []
    for n in lengths:
        ids = rng.integers(0, vocab, n, dtype=np.int64)
        mask = np.zeros(n, dtype=np.int64)
        j, trained = 0, False
        while j < n:
            run = int(rng.integers(1, 12))
            mask[j : j + run] = trained
            j += run
            trained = not trained
        convs.append((ids, mask))
    return convs


ID_DTYPES = [np.int64, np.int32]  # widths of FlatConversations.input_ids: rows must not depend on it
ID_NAMES = ["ids64", "ids32"]


def ids_as(convs, dtype):
    """The same conversations with ids of ``dtype`` (flatten keeps int32 ids int32)."""
    return [(np.asarray(c[0]).astype(dtype), *c[1:]) for c in convs]


def flat_as(flat, dtype):
    """The same FlatConversations with ids of ``dtype``."""
    return FlatConversations(flat.input_ids.astype(dtype), flat.loss_mask, flat.offsets)


def plan_as_lists(plan) -> list[list[int]]:
    return [b.tolist() for b in plan]


def check_rows(packed, convs, cap, pad_to=None, expect_kept=None):
    """The invariants every packed result must satisfy, checked without any reference."""
    seen = {}
    for r, row in enumerate(packed):
        n = row["input_ids"].shape[0]
        for k in ("labels", "position_ids", "seq_ids"):
            assert row[k].shape == (n,)
        cu = row["cu_seqlens"]
        assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == n and np.all(np.diff(cu) > 0)
        assert isinstance(row["max_seqlen"], int) and row["max_seqlen"] == int(np.diff(cu).max())
        if pad_to is None:
            assert n <= cap
        else:
            assert n == pad_to
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            sid = int(row["seq_ids"][a])
            assert np.all(row["seq_ids"][a:b] == sid)
            np.testing.assert_array_equal(row["position_ids"][a:b], np.arange(b - a))
            if sid == -1:  # padding: only as the last segment
                assert b == n and pad_to is not None
                assert np.all(row["labels"][a:b] == IGNORE)
                continue
            assert sid not in seen, f"conversation {sid} appears twice"
            seen[sid] = r
            ids, mask = convs[sid][0], np.asarray(convs[sid][1])
            np.testing.assert_array_equal(row["input_ids"][a:b], ids)  # unchanged, contiguous
            want = np.where(mask[1:] != 0, ids[1:], IGNORE)
            np.testing.assert_array_equal(row["labels"][a : b - 1], want)
            assert row["labels"][b - 1] == IGNORE
        assert np.sum(row["seq_ids"] >= 0) <= cap
    if expect_kept is not None:
        assert sorted(seen) == sorted(expect_kept)
    return seen


def rows_equal(packed, ref):
    assert len(packed) == len(ref)
    for row, want in zip(packed, ref):
        for k in ("input_ids", "labels", "position_ids", "seq_ids", "cu_seqlens"):
            np.testing.assert_array_equal(row[k], np.asarray(want[k]), err_msg=k)
        assert row["max_seqlen"] == want["max_seqlen"]


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------

CAPS = [1, 2, 7, 63, 64, 65, 4095, 4096, 4097, 8193, 100_003, 300_000]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("strategy", ["bfd", "ffs"])
def test_plan_matches_reference(cap, strategy):
    rng = np.random.default_rng(cap * 7 + len(strategy))
    n = 250
    kinds = [
        rng.integers(1, int(cap * 1.2) + 2, n),  # uniform, some over-long
        np.clip(np.rint(rng.lognormal(np.log(max(cap / 7, 1)), 0.9, n)), 1, None),  # chat-like
        rng.choice([1, max(cap // 3, 1), max(cap // 2, 1), cap], n),  # many exact ties
    ]
    for k, lengths in enumerate(kinds):
        lengths = lengths.astype(np.int64)
        for seed in (0, 12345, -1):
            plan = plan_bins(lengths, cap, strategy=strategy, seed=seed)
            want = ref_plan(lengths.tolist(), cap, strategy, seed)
            assert plan_as_lists(plan) == want, (k, seed)
            assert np.all(plan.loads(lengths) <= cap)


@pytest.mark.parametrize("cap", [5, 10, 97, 4096, 8193])
def test_bin_count_against_brute_force(cap):
    rng = np.random.default_rng(cap)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        lengths = rng.integers(1, cap + 1, n).tolist()
        if trial % 2:  # big items make the instance hard for greedy packers
            lengths = [max(1, min(cap, int(x))) for x in rng.integers(cap // 4, cap // 2 + 2, n)]
        opt = brute_force_min_bins(lengths, cap)
        bfd = plan_bins(lengths, cap, strategy="bfd", seed=trial)
        ffs = plan_bins(lengths, cap, strategy="ffs", seed=trial)
        assert len(bfd) == len(ref_plan(lengths, cap, "bfd", trial))
        assert len(bfd) >= opt and len(ffs) >= opt
        # Known worst cases: BFD <= 11/9 OPT + 6/9, first fit <= floor(1.7 OPT).
        assert 9 * len(bfd) <= 11 * opt + 6
        assert len(ffs) <= int(1.7 * opt)
        for plan in (bfd, ffs):
            assert np.all(plan.loads(lengths) <= cap)
            assert sorted(plan.items.tolist()) == list(range(n))


def test_brute_force_is_optimal_where_bfd_is_not():
    # The classic case where decreasing best fit opens a third bin but two suffice.
    lengths, cap = [4, 4, 3, 3, 3, 3], 10
    assert brute_force_min_bins(lengths, cap) == 2
    assert len(plan_bins(lengths, cap)) == 3


def test_plan_is_deterministic_and_shuffled():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(np.log(600), 0.8, 5000)), 1, 4096).astype(np.int64)
    a = plan_bins(lengths, 4096, seed=3)
    b = plan_bins(lengths, 4096, seed=3)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.items, b.items)
    c = plan_bins(lengths, 4096, seed=4)
    assert len(c) == len(a) and not np.array_equal(c.items, a.items)
    # Unshuffled BFD emits bins whose first (longest) item never grows; shuffled bins must not.
    first = lengths[a.items[a.offsets[:-1]]]
    assert np.any(np.diff(first) > 0)
    # Same multiset of bins whatever the seed: the shuffle only reorders rows.
    assert sorted(map(tuple, plan_as_lists(a))) == sorted(map(tuple, plan_as_lists(c)))


def test_plan_same_from_many_threads():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 9000, 20_000)
    flat = flatten(make_convs(rng.integers(1, 300, 300), rng))
    want = plan_bins(lengths, 8193, seed=7)
    want_rows = materialize(flat, plan_bins(flat.lengths, 1000, seed=7))
    with ThreadPoolExecutor(4) as ex:
        plans = list(ex.map(lambda _: plan_bins(lengths, 8193, seed=7), range(8)))
        packs = list(ex.map(lambda _: materialize(flat, plan_bins(flat.lengths, 1000, seed=7)), range(8)))
    for p in plans:
        np.testing.assert_array_equal(p.items, want.items)
        np.testing.assert_array_equal(p.offsets, want.offsets)
    for p in packs:
        np.testing.assert_array_equal(p.input_ids, want_rows.input_ids)
        np.testing.assert_array_equal(p.labels, want_rows.labels)


def test_efficiency_on_chat_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(np.log(600), 0.8, 20_000)), 1, 4096).astype(np.int64)
    plan = plan_bins(lengths, 4096)
    eff = lengths.sum() / (len(plan) * 4096)
    assert eff >= 0.995, eff
    # Within 0.5% of the trivial lower bound on the row count.
    assert len(plan) <= np.ceil(lengths.sum() / 4096) * 1.005


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 3, 64, 257, 4096, 8193])
@pytest.mark.parametrize("strategy", ["bfd", "ffs"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_rows_match_reference(cap, strategy, pad, id_dtype):
    rng = np.random.default_rng(cap + 11 * pad)
    lengths = np.clip(rng.integers(1, min(cap, 600) + max(cap // 10, 2), 120), 1, None)
    convs = ids_as(make_convs(lengths, rng), id_dtype)
    pad_to = cap + 5 if pad else None
    packed = pack(convs, cap, strategy=strategy, seed=99, pad_to=pad_to)
    assert packed.flat.input_ids.dtype == id_dtype and packed.input_ids.dtype == np.int64
    kept = [i for i, n in enumerate(lengths) if n <= cap]
    check_rows(packed, convs, cap, pad_to, expect_kept=kept)
    rows_equal(packed, ref_rows(convs, ref_plan(lengths.tolist(), cap, strategy, 99), pad_to))
    s = packed.stats
    assert s.rows == len(packed) and s.kept_conversations == len(kept)
    assert s.dropped_conversations == len(lengths) - len(kept)
    assert s.dropped_tokens == int(lengths[lengths > cap].sum())
    assert s.real_tokens == int(lengths[lengths <= cap].sum())
    assert s.efficiency == pytest.approx(s.real_tokens / (s.rows * cap))
    assert s.pad_tokens == (s.rows * pad_to - s.real_tokens if pad else 0)


def test_labels_never_cross_conversations():
    convs = [(np.array([10, 11, 12]), np.array([1, 1, 1])), (np.array([20, 21]), np.array([1, 1]))]
    packed = pack(convs, 5, seed=0)
    assert len(packed) == 1
    row = packed[0]
    assert row["input_ids"].tolist() == [10, 11, 12, 20, 21]
    # The first token of each conversation is nobody's target, even with a mask of 1.
    assert row["labels"].tolist() == [11, 12, IGNORE, 21, IGNORE]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["seq_ids"].tolist() == [0, 0, 0, 1, 1]
    assert row["cu_seqlens"].tolist() == [0, 3, 5] and row["max_seqlen"] == 3


def test_padding_is_one_final_segment():
    convs = [(np.array([1, 2]), np.array([0, 1]))]
    row = pack(convs, 8, pad_to=16, overlong="error")[0]
    assert row["cu_seqlens"].tolist() == [0, 2, 16]
    assert row["max_seqlen"] == 14
    assert row["seq_ids"].tolist() == [0, 0] + [-1] * 14
    assert row["labels"].tolist() == [2] + [IGNORE] * 15
    assert row["position_ids"][2:].tolist() == list(range(14))
    full = pack([(np.arange(1, 9), np.ones(8, int))], 8, pad_to=8)[0]
    assert full["cu_seqlens"].tolist() == [0, 8]  # a full row has no padding segment
    with pytest.raises(ValueError, match="pad_to"):
        pack(convs, 8, pad_to=7)


def test_input_types_and_int32_rows():
    rng = np.random.default_rng(5)
    convs = make_convs([5, 9, 3, 7], rng)
    want = pack(convs, 12, seed=1)
    variants = [
        [(torch.from_numpy(a), torch.from_numpy(m).bool()) for a, m in convs],
        [(a.astype(np.int32), m.astype(np.uint8)) for a, m in convs],
        [(a.tolist(), m.tolist()) for a, m in convs],
        tuple((a, m.astype(bool)) for a, m in convs),
        iter(convs),
    ]
    for v in variants:
        got = pack(v, 12, seed=1)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.labels, want.labels)
    small = materialize(flatten(convs), want.plan, dtype=np.int32)
    assert small.input_ids.dtype == np.int32
    for k in ("input_ids", "labels", "position_ids", "seq_ids", "cu_seqlens"):
        np.testing.assert_array_equal(getattr(small, k), getattr(want, k))
    big = [(np.array([1, 2**31]), np.array([0, 1]))]
    with pytest.raises(ValueError, match="int32"):
        materialize(flatten(big), plan_bins([2], 4), dtype=np.int32)


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_rows_slice_and_preallocated_buffers(id_dtype):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 500, 400)
    flat = flatten(ids_as(make_convs(lengths, rng), id_dtype))
    assert flat.input_ids.dtype == id_dtype
    plan = plan_bins(flat.lengths, 1024, seed=2)
    whole = materialize(flat, plan)
    buf = row_buffers(plan, flat.lengths, rows=7)
    for a in range(0, len(plan), 7):
        part = materialize(flat, plan, rows=slice(a, a + 7), out=buf)
        assert part.input_ids.base is not None  # a view of the buffer: no allocation
        for r in range(len(part)):
            for k, v in part[r].items():
                np.testing.assert_array_equal(v, whole[a + r][k], err_msg=k)
    padbuf = row_buffers(plan, pad_to=1024, rows=3)
    part = materialize(flat, plan, rows=slice(0, 3), pad_to=1024, out=padbuf)
    assert part.input_ids.shape == (3 * 1024,)
    with pytest.raises(ValueError, match="elements"):
        materialize(flat, plan, out=buf)  # too small for every row
    with pytest.raises(ValueError, match="int32"):
        materialize(flat, plan, dtype=np.int32, out=row_buffers(plan, flat.lengths))


def test_to_torch():
    row = pack([([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])], 8)[0]
    t = to_torch(row, "cpu")
    assert t["input_ids"].dtype == torch.int64 and t["cu_seqlens"].dtype == torch.int32
    assert isinstance(t["max_seqlen"], int) and t["max_seqlen"] == 3
    assert torch.equal(t["labels"], torch.from_numpy(row["labels"]))
    flat = flatten([([1, 2, 3], [0, 1, 1])])
    small = materialize(flat, plan_bins(flat.lengths, 4), dtype=np.int32)[0]
    t32 = to_torch(small, "cpu", dtype=torch.int64)
    assert t32["labels"].dtype == torch.int64 and t32["cu_seqlens"].dtype == torch.int32
    assert t32["labels"].tolist() == [2, 3, IGNORE]


# --------------------------------------------------------------------------------------------------
# What the trainer builds on: local seq_ids, plan take/expand, the shared validators
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("pad_to", [None, 70])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_local_seq_ids(dtype, pad_to, id_dtype):
    rng = np.random.default_rng(17)
    lengths = rng.integers(1, 40, 90)
    convs = ids_as(make_convs(lengths, rng), id_dtype)
    flat = flatten(convs)
    plan = plan_bins(flat.lengths, 64, seed=5)
    bins = plan_as_lists(plan)
    assert max(map(len, bins)) > 2  # rows with several conversations, so local != global
    local = materialize(flat, plan, seq_ids="local", pad_to=pad_to, dtype=dtype)
    rows_equal(local, ref_rows(convs, bins, pad_to, local=True))
    assert local.seq_ids.dtype == dtype
    rows_equal(materialize(flat, plan, seq_ids="global", pad_to=pad_to, dtype=dtype), ref_rows(convs, bins, pad_to))
    # Batches into reused buffers, as the trainer reads them.
    buf = row_buffers(plan, flat.lengths, pad_to=pad_to, rows=4, dtype=dtype)
    for a in range(0, len(plan), 4):
        part = materialize(flat, plan, rows=slice(a, a + 4), out=buf, seq_ids="local", pad_to=pad_to, dtype=dtype)
        assert np.shares_memory(part.seq_ids, buf["seq_ids"])
        rows_equal(part, ref_rows(convs, bins[a : a + 4], pad_to, local=True))
    # Rows built on access keep the numbering too.
    lazy = pack(convs, 64, seed=5, seq_ids="local", pad_to=pad_to)
    assert lazy.seq_ids_mode == "local"
    rows_equal(lazy, ref_rows(convs, bins, pad_to, local=True))
    rows_equal([lazy[3]], ref_rows(convs, [bins[3]], pad_to, local=True))


@pytest.mark.parametrize("bad", ["row", "", None, 1, "LOCAL"])
def test_seq_ids_must_be_global_or_local(bad):
    flat = flatten([GOOD])
    plan = plan_bins(flat.lengths, 8)
    with pytest.raises(ValueError, match="seq_ids must be one of"):
        materialize(flat, plan, seq_ids=bad)
    with pytest.raises(ValueError, match="seq_ids must be one of"):
        pack([GOOD], 8, seq_ids=bad)


def test_plan_take():
    rng = np.random.default_rng(23)
    lengths = rng.integers(1, 100, 300)
    flat = flatten(make_convs(lengths, rng))
    plan = plan_bins(flat.lengths, 256, seed=3, strategy="ffs")
    whole = materialize(flat, plan)
    pick = rng.permutation(len(plan))[:17]
    pick[3] = pick[3] - len(plan)  # negative indices count from the end, as plan[k] does
    sub = plan.take(pick)
    assert isinstance(sub, BinPlan) and len(sub) == 17
    assert (sub.max_tokens, sub.strategy, sub.seed) == (256, "ffs", 3)
    assert plan_as_lists(sub) == [plan[int(k)].tolist() for k in pick]
    assert sub.offsets.dtype == np.int64 and sub.items.dtype == np.int64
    # Its rows are the picked rows of the whole plan, read in one slice.
    got = materialize(flat, sub, rows=slice(0, 17))
    for r, k in enumerate(pick):
        for key, v in got[r].items():
            np.testing.assert_array_equal(v, whole[int(k)][key], err_msg=key)
    assert len(plan.take([])) == 0 and plan.take(np.array([], np.int32)).items.shape == (0,)
    assert plan_as_lists(plan.take([1, 1])) == [plan[1].tolist()] * 2
    with pytest.raises(IndexError, match="out of range"):
        plan.take([0, len(plan)])
    with pytest.raises(IndexError, match="out of range"):
        plan.take([-len(plan) - 1])
    with pytest.raises(ValueError, match="bins must be a 1-D integer array"):
        plan.take([0.5])
    with pytest.raises(ValueError, match="bins must be a 1-D integer array"):
        plan.take([[0]])


def test_plan_expand_over_units():
    rng = np.random.default_rng(29)
    # DPO-style units: unit u holds conversations 2u and 2u+1 (chosen, rejected), listed in any
    # order; here shuffled so that unit order and item order differ.
    n_units = 120
    lengths = rng.integers(1, 60, 2 * n_units)
    convs = make_convs(lengths, rng)
    order = rng.permutation(n_units)
    unit_items = np.stack([2 * order, 2 * order + 1], axis=1).ravel()
    unit_offsets = np.arange(0, 2 * n_units + 1, 2)
    unit_lengths = np.add.reduceat(lengths[unit_items], unit_offsets[:-1])
    unit_plan = plan_bins(unit_lengths, 128, seed=11)
    plan = unit_plan.expand(unit_offsets, unit_items)
    assert (plan.max_tokens, plan.strategy, plan.seed) == (128, "bfd", 11) and len(plan) == len(unit_plan)
    want = [[int(c) for u in b for c in unit_items[unit_offsets[u] : unit_offsets[u + 1]]] for b in unit_plan]
    assert plan_as_lists(plan) == want
    np.testing.assert_array_equal(plan.loads(lengths), unit_plan.loads(unit_lengths))
    rows_equal(materialize(flatten(convs), plan, seq_ids="local"), ref_rows(convs, want, local=True))
    # Units of different sizes (including empty ones) and offsets that start after 0.
    ragged = BinPlan(np.array([0, 2, 3, 3]), np.array([2, 0, 1]), 9, "ffs", 4)
    items = np.array([9, 7, 8, 5, 6, 4], np.int32)
    offs = np.array([1, 3, 3, 6])  # unit 0 = [7, 8], unit 1 = [], unit 2 = [5, 6, 4]
    got = ragged.expand(offs, items)
    assert plan_as_lists(got) == [[5, 6, 4, 7, 8], [], []]
    assert got.offsets.tolist() == [0, 5, 5, 5]
    # The same plan over units of one item each is the plan itself.
    same = unit_plan.expand(np.arange(n_units + 1), np.arange(n_units))
    np.testing.assert_array_equal(same.items, unit_plan.items)
    np.testing.assert_array_equal(same.offsets, unit_plan.offsets)
    with pytest.raises(ValueError, match="plan refers to unit 2 but there are 2"):
        ragged.expand(offs[:3], items)
    with pytest.raises(ValueError, match="unit_offsets must be non-decreasing"):
        ragged.expand(np.array([0, 3, 2, 6]), items)
    with pytest.raises(ValueError, match="unit_offsets must be non-decreasing"):
        ragged.expand(np.array([0, 3, 4, 7]), items)
    with pytest.raises(ValueError, match="unit_offsets needs at least one element"):
        BinPlan(np.array([0]), np.array([], np.int64), 9, "bfd", 0).expand([], items)
    with pytest.raises(ValueError, match="unit_items must be a 1-D integer array"):
        ragged.expand(offs, items.astype(float))


def test_validators():
    assert check_max_tokens(np.int32(64)) == 64 and type(check_max_tokens(np.int32(64))) is int
    assert check_strategy("bfd") == "bfd" and check_overlong("drop") == "drop"
    assert check_pad_to(None, 8) is None and check_pad_to(np.int64(8), 8) == 8
    for bad in (0, -1, 2.0, "8", None, (1 << 24) + 1):
        with pytest.raises(ValueError, match="^max_tokens must be"):
            check_max_tokens(bad)
    for bad in ("greedy", "BFD", None, 0, ["bfd"]):  # a list is unhashable: still ValueError
        with pytest.raises(ValueError, match="^strategy must be one of"):
            check_strategy(bad)
    for bad in ("split", None, ["drop"]):
        with pytest.raises(ValueError, match="^overlong must be one of"):
            check_overlong(bad)
    for bad in (7, 2.5, "16"):
        with pytest.raises(ValueError, match="pad_to"):
            check_pad_to(bad, 8)
    with pytest.raises(ValueError, match="^max_tokens must be"):
        check_pad_to(16, 0)
    # The same rules hold where the packer takes these arguments.
    flat = flatten([GOOD])
    plan = plan_bins(flat.lengths, 8)
    with pytest.raises(ValueError, match="^strategy must be one of"):
        plan_bins([3], 8, strategy=None)
    with pytest.raises(ValueError, match="pad_to=7 is smaller than max_tokens=8"):
        row_buffers(plan, pad_to=7)
    with pytest.raises(ValueError, match="pad_to=7 is smaller than max_tokens=8"):
        materialize(flat, plan, pad_to=7)
    with pytest.raises(ValueError, match="^overlong must be one of"):
        pack([GOOD], 8, overlong=None)


# --------------------------------------------------------------------------------------------------
# int32 token ids (as Hugging Face datasets stores them), read without widening
# --------------------------------------------------------------------------------------------------

ROW_FIELDS = ("input_ids", "labels", "position_ids", "seq_ids", "cu_seqlens", "max_seqlen", "row_offsets", "cu_offsets")


def assert_same_packed(a, b):
    for key in ROW_FIELDS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)
    assert a.stats == b.stats


@pytest.mark.parametrize("cap", [1, 3, 257, 4096])
def test_int32_ids_give_the_same_rows(cap):
    rng = np.random.default_rng(cap + 47)
    lengths = np.clip(rng.integers(1, min(cap, 600) + max(cap // 10, 2), 150), 1, None)
    convs = make_convs(lengths, rng, vocab=2**31 - 1)
    f64 = flatten(convs)
    f32 = flat_as(f64, np.int32)
    for strategy, pad, seq_ids, dtype in itertools.product(["bfd", "ffs"], [None, cap + 3], ["global", "local"],
                                                           [np.int64, np.int32]):
        plan = plan_bins(f64.lengths, cap, strategy=strategy, seed=cap)
        want = materialize(f64, plan, pad_to=pad, seq_ids=seq_ids, dtype=dtype)
        assert_same_packed(materialize(f32, plan, pad_to=pad, seq_ids=seq_ids, dtype=dtype), want)
        # Batches of an odd number of rows into buffers one element off their allocation.
        buf = {k: v[1:] for k, v in row_buffers(plan, f64.lengths, pad_to=pad, rows=5 + 1, dtype=dtype).items()}
        for a in range(0, len(plan), 5):
            got = materialize(f32, plan, rows=slice(a, a + 5), out=buf, pad_to=pad, seq_ids=seq_ids, dtype=dtype)
            for r in range(len(got)):
                for key, v in got[r].items():
                    np.testing.assert_array_equal(v, want[a + r][key], err_msg=key)
        lazy32 = pack(f32, cap, strategy=strategy, seed=cap, pad_to=pad, seq_ids=seq_ids)
        assert lazy32.flat is f32  # planned and built from the int32 buffer itself
        if dtype == np.int64:  # pack's rows are int64
            rows_equal(lazy32, [want[k] for k in range(len(want))])
    # Over-long handling keeps the ids' width and cuts the same tokens.
    with_system = [(c[0], c[1], min(2, len(c[0]))) for c in convs]
    t64 = pack(with_system, cap, overlong="truncate_turns", seed=1)
    t32 = pack(ids_as(with_system, np.int32), cap, overlong="truncate_turns", seed=1)
    assert t32.flat.input_ids.dtype == np.int32
    assert_same_packed(t32.materialize_all(), t64.materialize_all())


def test_int32_ids_without_a_copy():
    pa = pytest.importorskip("pyarrow")
    rng = np.random.default_rng(53)
    convs = make_convs(rng.integers(1, 30, 15), rng)
    want = flatten(convs)
    ids32 = want.input_ids.astype(np.int32)
    flat = FlatConversations.from_buffers(ids32, want.loss_mask, want.offsets)
    assert flat.input_ids.dtype == np.int32 and np.shares_memory(flat.input_ids, ids32)
    sub = FlatConversations.from_buffers(ids32, want.loss_mask.view(bool), want.offsets[4:9])  # rebased views
    assert np.shares_memory(sub.input_ids, ids32) and sub.input_ids[0] == ids32[want.offsets[4]]
    # An Arrow list<int32> column, as datasets writes input_ids, whole and sliced.
    table = pa.table({
        "input_ids": pa.array([c[0].tolist() for c in convs], pa.list_(pa.int32())),
        "loss_mask": pa.array([c[1].tolist() for c in convs], pa.list_(pa.int8())),
    })
    values = table["input_ids"].chunk(0).values.to_numpy()
    for part, lo, hi in [(table, 0, 15), (table.slice(3, 7), 3, 10)]:
        got = FlatConversations.from_arrow(part["input_ids"], part["loss_mask"])
        assert got.input_ids.dtype == np.int32 and np.shares_memory(got.input_ids, values)
        expect = flatten(convs[lo:hi])
        np.testing.assert_array_equal(got.input_ids, expect.input_ids)
        np.testing.assert_array_equal(got.loss_mask, expect.loss_mask)
        packed = pack(got, 64, seed=2)
        assert np.shares_memory(packed.flat.input_ids, values)
        assert_same_packed(packed.materialize_all(), pack(expect, 64, seed=2).materialize_all())
    large = pa.array([[5, 6], [7]], pa.large_list(pa.int32()))
    got = FlatConversations.from_arrow(large, pa.array([[0, 1], [1]], pa.large_list(pa.int8())))
    assert got.input_ids.dtype == np.int32 and got.offsets.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="conversation 1: negative token id -4 at position 1"):
        FlatConversations.from_arrow(pa.array([[1], [2, -4]], pa.list_(pa.int32())), pa.array([[0], [1, 1]]))


@pytest.mark.parametrize(
    "ids, want",
    [
        (np.array([1, 2, 3], np.int64), np.int64),
        (np.array([1, 2, 3], np.int32), np.int32),
        (np.array([1, 2, 3], np.int8), np.int32),
        (np.array([1, 2, 3], np.int16), np.int32),
        (np.array([1, 2, 255], np.uint8), np.int32),
        (np.array([1, 2, 65535], np.uint16), np.int32),
        (np.array([1, 2, 2**31 - 1], np.uint32), np.int32),
        (np.array([1, 2, 2**31], np.uint32), np.int64),
        (np.array([1, 2, 2**31 - 1], np.uint64), np.int32),
        (np.array([1, 2, 2**40], np.uint64), np.int64),
        (np.array([1, 2, 2**31 - 1], ">i4"), np.int32),
        (np.array([1, 2, 2**40], ">i8"), np.int64),
        (np.array([1, 2, 2**31], ">u4"), np.int64),
    ],
    ids=lambda v: v.dtype.str if isinstance(v, np.ndarray) else None,
)
def test_id_width_rule_of_from_buffers(ids, want):
    flat = FlatConversations.from_buffers(ids, [0, 1, 1], [0, 1, 3])
    assert flat.input_ids.dtype == want and flat.input_ids.dtype.isnative
    assert flat.input_ids.tolist() == ids.tolist()
    assert np.shares_memory(flat.input_ids, ids) == (ids.dtype in (np.dtype(np.int64), np.dtype(np.int32)))
    rows = pack(flat, 4, seed=0).materialize_all()
    assert sorted(rows.input_ids.tolist()) == sorted(ids.tolist())


def test_id_width_rule_of_flatten(flatten_path):
    rng = np.random.default_rng(59)
    base = make_convs(rng.integers(1, 20, 8), rng, vocab=100)
    narrow = [np.int32, np.int16, np.int8, np.uint8, np.uint16, ">i4"]
    cases = [
        ([np.int32], np.int32),
        (narrow, np.int32),
        (narrow + [np.uint32], np.int64),  # uint32 may exceed int32: not looked at, widened
        (narrow + [np.int64], np.int64),
        ([np.uint64], np.int64),
    ]
    for types, want in cases:
        convs = [(ids.astype(types[i % len(types)]), mask) for i, (ids, mask) in enumerate(base)]
        flat = flatten(convs)
        assert flat.input_ids.dtype == want, types
        np.testing.assert_array_equal(flat.input_ids, np.concatenate([c[0] for c in base]))
    assert flatten([(c[0].tolist(), c[1].tolist()) for c in base]).input_ids.dtype == np.int64
    torch32 = [(torch.from_numpy(c[0].astype(np.int32)), torch.from_numpy(c[1])) for c in base]
    assert flatten(torch32).input_ids.dtype == np.int32
    assert flatten([]).input_ids.dtype == np.int64
    with pytest.raises(ValueError, match="conversation 1: negative token id -7 at position 2"):
        flatten([GOOD, (np.array([4, 5, -7], np.int32), np.array([0, 1, 1]))])


def test_extension_reads_int32_or_int64_ids_only():
    """The C++ call reads the ids' own width and never converts them (a copy is what int32 avoids)."""
    ext = flat_module._ext()
    mask, offs, bins, items = np.ones(3, np.uint8), np.array([0, 3]), np.array([0, 1]), np.array([0])
    for ids in (np.array([1, 2, 3], np.int32), np.array([1, 2, 3], np.int64)):
        got = ext.materialize(ids, mask, offs, bins, items, 0, 0, False, False)
        assert got["input_ids"].tolist() == [1, 2, 3] and got["labels"].tolist() == [2, 3, IGNORE]
    for bad in (np.array([1, 2, 3], np.int16), np.array([1, 2, 3], np.uint32), np.array([1, 2, 3], ">i4"),
                np.array([1, 2, 3], np.float64)):
        with pytest.raises(ValueError, match="ids must be int64 or int32"):
            ext.materialize(bad, mask, offs, bins, items, 0, 0, False, False)
    with pytest.raises(ValueError, match="ids must be contiguous"):
        ext.materialize(np.arange(6, dtype=np.int32)[::2], mask, offs, bins, items, 0, 0, False, False)


# --------------------------------------------------------------------------------------------------
# Rows built on access, streamed fills, per-batch cost
# --------------------------------------------------------------------------------------------------


def _rows_of(packed) -> list[dict]:
    return [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in row.items()} for row in packed]


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_lazy_rows_equal_eager_rows(id_dtype):
    rng = np.random.default_rng(21)
    convs = ids_as(make_convs(rng.integers(1, 300, 500), rng), id_dtype)
    lazy = pack(convs, 1000, seed=4, pad_to=1003)
    eager = materialize(flatten(convs), lazy.plan, pad_to=1003)
    # 500 conversations make more rows than one iteration block, so block edges are crossed.
    assert len(lazy) > rows_module._ITER_BLOCK
    assert lazy._arrays is None  # nothing built yet
    by_iter, by_index = _rows_of(lazy), [lazy[i] for i in range(len(lazy))]
    assert lazy._arrays is None  # iteration and indexing build rows without keeping them
    for k in range(len(eager)):
        for key, want in eager[k].items():
            np.testing.assert_array_equal(by_iter[k][key], want, err_msg=key)
            np.testing.assert_array_equal(by_index[k][key], want, err_msg=key)
    np.testing.assert_array_equal(lazy[-1]["input_ids"], eager[len(eager) - 1]["input_ids"])
    with pytest.raises(IndexError):
        lazy[len(lazy)]
    # Rows are fresh arrays: changing one does not change the next access.
    row = lazy[3]
    row["labels"][:] = 7
    assert not np.all(lazy[3]["labels"] == 7)
    # The flat attributes build everything once, after which rows are views of them.
    np.testing.assert_array_equal(lazy.input_ids, eager.input_ids)
    np.testing.assert_array_equal(lazy.cu_offsets, eager.cu_offsets)
    assert lazy._arrays is not None and lazy[0]["input_ids"].base is not None
    assert lazy.materialize_all() is lazy
    assert lazy.stats == dataclasses.replace(eager.stats, dropped_conversations=0, dropped_tokens=0)


def test_packed_is_a_dataset():
    import pickle

    rng = np.random.default_rng(2)
    packed = pack(make_convs(rng.integers(1, 50, 40), rng), 64, seed=1)
    copy = pickle.loads(pickle.dumps(packed))
    loader = torch.utils.data.DataLoader(packed, batch_size=None, shuffle=False)
    for k, row in enumerate(loader):
        assert torch.equal(row["labels"], torch.from_numpy(copy[k]["labels"]))
        assert row["max_seqlen"] == copy[k]["max_seqlen"]
    assert k == len(packed) - 1
    empty = pack([], 8)
    assert len(empty) == 0 and list(empty) == [] and empty.materialize_all().input_ids.shape == (0,)


def test_stats_without_building_rows():
    convs = [([1] * 5, [1] * 5), ([2] * 11, [1] * 11), ([3] * 4, [0] * 4)]
    packed = pack(convs, 10, pad_to=12)
    s = packed.stats
    assert (s.rows, s.real_tokens, s.pad_tokens) == (1, 9, 3)
    assert (s.dropped_conversations, s.dropped_tokens, s.kept_conversations) == (1, 11, 2)
    assert packed._arrays is None


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
@pytest.mark.parametrize("pad", [None, 4100])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_streamed_fill_matches_cached_fill(dtype, pad, id_dtype):
    """Outputs above 64 MiB take the streaming-store path; it must write exactly what batches do."""
    rng = np.random.default_rng(8)
    n_tokens = (80 << 20) // (4 * np.dtype(dtype).itemsize) + 12_345  # > 64 MiB of row arrays
    lengths = np.clip(rng.integers(1, 4096, n_tokens // 2000), 1, None)
    lengths[-1] += max(0, n_tokens - int(lengths.sum()))
    lengths = np.minimum(lengths, 4096)
    total = int(lengths.sum())
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(0, 2**31 - 1, total).astype(id_dtype)
    flat = FlatConversations(ids, (rng.random(total) < 0.6).view(np.uint8), offsets)
    plan = plan_bins(flat.lengths, 4096, seed=1)
    whole = materialize(flat, plan, dtype=dtype, pad_to=pad)
    assert whole.input_ids.nbytes * 4 > 64 << 20
    for a in range(0, len(plan), 200):  # < 64 MiB per call: plain stores
        part = materialize(flat, plan, rows=slice(a, a + 200), dtype=dtype, pad_to=pad)
        lo, hi = whole.row_offsets[a], whole.row_offsets[min(a + 200, len(plan))]
        for key in ("input_ids", "labels", "position_ids", "seq_ids"):
            np.testing.assert_array_equal(getattr(part, key), getattr(whole, key)[lo:hi], err_msg=key)
        np.testing.assert_array_equal(part.max_seqlen, whole.max_seqlen[a : a + 200])
    # Streamed into caller buffers that start off a 16-byte boundary (views one element in).
    keys = ("input_ids", "labels", "position_ids", "seq_ids", "cu_seqlens")
    bufs = {k: np.full(getattr(whole, k).shape[0] + 1, 7, getattr(whole, k).dtype)[1:] for k in keys}
    assert bufs["input_ids"].ctypes.data % 16 != 0
    odd = materialize(flat, plan, dtype=dtype, pad_to=pad, out=bufs)
    for key in keys:
        np.testing.assert_array_equal(getattr(odd, key), getattr(whole, key), err_msg=key)
    # And one row against the definition, in the middle of the streamed output.
    k = len(plan) // 2
    convs = {int(c): flat.conversation(int(c)) for c in plan[k]}
    rows_equal([whole[k]], ref_rows(convs, [plan[k].tolist()], pad))


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_batch_cost_does_not_scan_other_conversations(id_dtype):
    """materialize(rows=...) checks only the conversations it copies (a batch costs O(batch))."""
    flat = flat_as(flatten([GOOD, GOOD, GOOD]), id_dtype)
    plan = BinPlan(np.array([0, 1, 2, 3]), np.array([0, 1, 2]), 8, "given", 0)
    offsets = flat.offsets.copy()
    offsets[2] = 100  # conversation 1 now ends, and 2 starts, outside the buffer
    broken = FlatConversations(flat.input_ids, flat.loss_mask, offsets)
    assert materialize(broken, plan, rows=slice(0, 1))[0]["input_ids"].tolist() == [1, 2, 3]
    for k in (1, 2):
        with pytest.raises(ValueError, match=f"conversation {k} has bad offsets"):
            materialize(broken, plan, rows=slice(k, k + 1))
    swapped = offsets.copy()
    swapped[1:3] = [5, 4]  # conversation 1 would have length -1
    with pytest.raises(ValueError, match=r"conversation 1 has bad offsets \[5, 4\)"):
        materialize(FlatConversations(flat.input_ids, flat.loss_mask, swapped), plan, rows=slice(1, 2))


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_hand_built_flat_values_are_checked_when_rows_are_built(id_dtype):
    ids = np.array([1, 2, 3, 4, -5, 6], id_dtype)
    flat = FlatConversations(ids, np.ones(6, np.uint8), np.array([0, 3, 6]))
    packed = pack(flat, 3)  # planning reads lengths only
    for dtype in (np.int64, np.int32):
        with pytest.raises(ValueError, match="conversation 1: negative token id -5 at position 1"):
            materialize(flat, packed.plan, dtype=dtype)
    with pytest.raises(ValueError, match="conversation 1: negative token id"):
        list(packed)
    row = next(i for i in range(2) if packed.plan[i][0] == 0)
    assert packed[row]["input_ids"].tolist() == [1, 2, 3]  # other rows still build
    wide = FlatConversations(np.array([1, 2**31 + 1]), np.ones(2, np.uint8), np.array([0, 2]))
    with pytest.raises(ValueError, match="conversation 0: token id 2147483649 does not fit in int32"):
        materialize(wide, plan_bins([2], 2), dtype=np.int32)


def test_hand_built_flat_layout_is_checked():
    ids, mask, offsets = np.array([1, 2, 3]), np.array([0, 1, 1], np.uint8), np.array([0, 3])
    FlatConversations(ids, mask, offsets)
    FlatConversations(ids.astype(np.int32), mask, offsets)  # int32 ids too, as datasets stores them
    for bad in [(ids.astype(np.int16), mask, offsets), (ids.astype(np.uint32), mask, offsets),
                (ids.astype(">i4"), mask, offsets), (ids, mask.astype(bool), offsets),
                (ids, mask, offsets.astype(np.int32)), (ids.astype(">i8"), mask, offsets),
                (np.repeat(ids, 2)[::2], mask, offsets), (ids, mask[:2], offsets),
                (ids, mask, np.zeros(0, np.int64)), (ids.tolist(), mask, offsets)]:
        with pytest.raises(ValueError, match="from_buffers"):
            FlatConversations(*bad)


def test_flat_from_buffers():
    rng = np.random.default_rng(41)
    convs = make_convs(rng.integers(1, 30, 25), rng)
    want = flatten(convs)
    flat = FlatConversations.from_buffers(want.input_ids, want.loss_mask.astype(bool), want.offsets.astype(np.int32))
    assert np.shares_memory(flat.input_ids, want.input_ids)  # int64 ids: no copy
    for k in ("input_ids", "loss_mask", "offsets"):
        np.testing.assert_array_equal(getattr(flat, k), getattr(want, k))
        assert getattr(flat, k).dtype == getattr(want, k).dtype
    # A slice of the buffers, as a sliced Arrow list array gives (full values, offsets from k).
    sub = FlatConversations.from_buffers(want.input_ids.astype(np.int32), want.loss_mask.astype(np.int64),
                                         want.offsets[5:12])
    rows_equal(pack(sub, 64, seed=2), ref_rows(convs[5:11], ref_plan([len(c[0]) for c in convs[5:11]], 64, "bfd", 2)))
    # Integer masks: any non-zero is trained, never wrapped to 0 (256 as uint8 would be 0).
    wide = FlatConversations.from_buffers([1, 2, 3], np.array([0, 256, 1], np.int64), [0, 3], check_values=False)
    assert wide.loss_mask.tolist() == [0, 1, 1]
    swapped = FlatConversations.from_buffers(np.array([7, 8], ">i4"), np.array([0, 1], ">i2"), np.array([0, 2], ">i8"))
    assert swapped.input_ids.tolist() == [7, 8] and swapped.loss_mask.tolist() == [0, 1] and swapped.input_ids.dtype.isnative


def test_flat_from_arrow():
    pa = pytest.importorskip("pyarrow")
    rng = np.random.default_rng(43)
    convs = make_convs(rng.integers(1, 30, 12), rng)
    table = pa.table({"input_ids": [c[0].tolist() for c in convs], "loss_mask": [c[1].astype(np.int8).tolist() for c in convs]})
    want = flatten(convs)
    flat = FlatConversations.from_arrow(table["input_ids"], table["loss_mask"])
    for k in ("input_ids", "loss_mask", "offsets"):
        np.testing.assert_array_equal(getattr(flat, k), getattr(want, k))
    values = table["input_ids"].chunk(0).values.to_numpy()
    assert np.shares_memory(flat.input_ids, values)  # one int64 chunk: no copy
    # A sliced table (values buffers start before the slice) and several chunks.
    part = table.slice(3, 5)
    got = FlatConversations.from_arrow(part["input_ids"], part["loss_mask"])
    np.testing.assert_array_equal(got.input_ids, flatten(convs[3:8]).input_ids)
    np.testing.assert_array_equal(got.loss_mask, flatten(convs[3:8]).loss_mask)
    chunked = pa.concat_tables([table.slice(0, 4), table.slice(4)])
    assert chunked["input_ids"].num_chunks == 2
    np.testing.assert_array_equal(FlatConversations.from_arrow(chunked["input_ids"], chunked["loss_mask"]).offsets, want.offsets)
    # Columns sliced at different places but with equal row lengths line up.
    same = pa.table({"a": [[1, 2], [3], [4, 5]], "m": [[0, 1], [1], [1, 1]]})
    got = FlatConversations.from_arrow(same["a"].slice(1, 2), same["m"].slice(1, 2))
    assert got.input_ids.tolist() == [3, 4, 5] and got.loss_mask.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="conversation 0: loss_mask has length 2 but input_ids has length 1"):
        FlatConversations.from_arrow(same["a"].slice(1, 2), same["m"].slice(0, 2))
    with pytest.raises(ValueError, match="rows but input_ids has"):
        FlatConversations.from_arrow(same["a"], same["m"].slice(0, 2))
    with pytest.raises(ValueError, match="null"):
        FlatConversations.from_arrow(pa.array([[1, 2], None]), pa.array([[0, 1], [1]]))
    with pytest.raises(ValueError, match="list array"):
        FlatConversations.from_arrow(np.array([1, 2]), same["m"])
    with pytest.raises(ValueError, match="conversation 1: negative token id -4"):
        FlatConversations.from_arrow(pa.array([[1], [2, -4]]), pa.array([[0], [1, 1]]))


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2, 3], [0, 1], [0, 3]), "loss_mask has 2 tokens but input_ids has 3"),
        (([1.0, 2.0], [0, 1], [0, 2]), "input_ids must be integer"),
        (([1, 2], [0.5, 1], [0, 2]), "loss_mask must be bool or integer"),
        (([1, 2], [0, 1], [[0, 2]]), "offsets must be 1-D"),
        (([1, 2], [0, 1], []), "offsets needs at least one element"),
        (([1, 2], [0, 1], [0, 3]), "non-decreasing within"),
        (([1, 2], [0, 1], [0, 2, 1]), "non-decreasing within"),
        (([1, 2], [0, 1], [0, 2, 2]), "conversation 1: is empty"),
        (([1, 2, -3], [0, 1, 1], [0, 1, 3]), "conversation 1: negative token id -3 at position 1"),
        (([1, 2, 3], [0, 1, 2], [0, 1, 3]), "conversation 1: loss_mask value 2 at position 1"),
        (([1, 2, 3], np.array([0, -1, 1], np.int8), [0, 1, 3]), "conversation 1: loss_mask value -1 at position 0"),
        (([1, 2, 3], np.array([0, 1, 3], np.uint8), [0, 1, 3]), "conversation 1: loss_mask value 3 at position 1"),
        ((np.array([1, 2**63], np.uint64), [0, 1], [0, 1, 2]), "conversation 1: input_ids do not fit in int64"),
        ((np.array([1, 2**63], ">u8"), [0, 1], [0, 1, 2]), "conversation 1: input_ids do not fit in int64"),
    ],
)
def test_flat_from_buffers_errors(args, match):
    with pytest.raises(ValueError, match=match):
        FlatConversations.from_buffers(*args)


# --------------------------------------------------------------------------------------------------
# flatten: the C++ path against the numpy path
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["cpp", "numpy"])
def flatten_path(request, monkeypatch):
    """Runs a test through the C++ flatten and through the numpy fallback (extension missing)."""
    if request.param == "numpy":

        def no_extension():
            raise ImportError("simulated: extension not built")

        monkeypatch.setattr(flat_module, "_ext", no_extension)  # flatten only: nothing else runs
    return request.param


def test_flatten_paths_agree_on_dtypes_and_views(flatten_path):
    rng = np.random.default_rng(31)
    base = make_convs(rng.integers(1, 40, 30), rng)
    id_types = [np.int64, np.int32, np.int16, np.uint8, np.uint16, np.uint32, np.uint64, np.int8]
    mask_types = [bool, np.uint8, np.int8, np.int32, np.int64, np.uint64]
    convs = []
    for i, (ids, mask) in enumerate(base):
        it = id_types[i % len(id_types)]
        ids = (ids % 100).astype(it)
        mask = mask.astype(mask_types[i % len(mask_types)])
        if i % 5 == 0:  # strided views: every other element of a longer array
            ids = np.repeat(ids, 2)[::2]
            mask = np.repeat(mask, 2)[::2]
        if i % 7 == 3:  # swapped byte order (e.g. read from a big-endian file)
            ids = ids.astype(ids.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
            mask = mask.astype(mask.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
        convs.append((ids, mask))
    flat = flatten(convs)
    assert flat.input_ids.dtype == np.int64 and flat.loss_mask.dtype == np.uint8
    np.testing.assert_array_equal(flat.input_ids, np.concatenate([c[0].astype(np.int64) for c in convs]))
    np.testing.assert_array_equal(flat.loss_mask, np.concatenate([c[1].astype(np.uint8) for c in convs]))
    np.testing.assert_array_equal(flat.lengths, [len(c[0]) for c in convs])
    assert len(flatten([])) == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        ((np.array([1, 2, 3], np.int32), np.array([0, 5, 1], np.int16)), "conversation 1: loss_mask values must be 0 or 1, got 5"),
        ((np.array([1, 2, 3]), np.array([0, -1, 1], np.int8)), "conversation 1: loss_mask values must be 0 or 1, got -1"),
        ((np.array([1, 2, 3]), np.array([0, 256, 1], np.uint16)), "conversation 1: loss_mask values must be 0 or 1, got 256"),
        ((np.array([4, 5, -7], np.int16), np.array([0, 1, 1])), "conversation 1: negative token id -7 at position 2"),
        ((np.array([4, 2**63], np.uint64), np.array([0, 1])), "conversation 1: input_ids do not fit in int64"),
    ],
)
def test_flatten_paths_agree_on_errors(flatten_path, bad, match):
    # Conversation 3 has a shape error, conversation 1 a value error: shape errors are reported
    # first (whatever their index), as both paths check every shape and dtype before any value.
    with pytest.raises(ValueError, match="conversation 3: is empty"):
        flatten([GOOD, bad, GOOD, (np.array([], np.int64), np.array([], np.int64))])
    with pytest.raises(ValueError, match=match):
        flatten([GOOD, bad, GOOD, bad])
    text = (np.array([1, 2, 3]), np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="conversation 2: loss_mask must be bool or integer, got dtype <U1"):
        flatten([GOOD, bad, text, (np.array([], np.int64), np.array([], np.int64))])


# --------------------------------------------------------------------------------------------------
# Over-long conversations
# --------------------------------------------------------------------------------------------------


def test_overlong_drop_and_error():
    convs = [([1] * 5, [1] * 5), ([2] * 11, [1] * 11), ([3] * 10, [0] * 10), ([4] * 12, [1] * 12)]
    packed = pack(convs, 10)
    assert packed.stats.dropped_conversations == 2 and packed.stats.dropped_tokens == 23
    assert sorted(set(packed.seq_ids.tolist())) == [0, 2]
    with pytest.raises(ValueError, match=r"conversation 1 has 11 tokens"):
        pack(convs, 10, overlong="error")
    with pytest.raises(ValueError, match="overlong"):
        pack(convs, 10, overlong="split")


def test_exchanges():
    m = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0])  # trailing user turn joins the final exchange
    assert exchange_starts(m).tolist() == [0, 4, 6]
    assert exchange_starts(np.array([1, 1, 0, 1])).tolist() == [0, 2]  # agent speaks first
    assert exchange_starts(m, system_len=3).tolist() == [3, 4, 6]
    assert truncate_turns(m, 10) == [(0, 10)]
    assert truncate_turns(m, 6) == [(4, 10)]
    assert truncate_turns(m, 5) == [(6, 10)]
    assert truncate_turns(m, 7, system_len=2) == [(0, 2), (6, 10)]
    assert truncate_turns(m, 3) is None


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_truncate_turns_in_pack(id_dtype):
    sys_ids, sys_mask = [100, 101], [0, 0]
    ex = lambda u, a, base: ([base + k for k in range(u + a)], [0] * u + [1] * a)  # noqa: E731
    parts = [ex(3, 2, 10), ex(2, 3, 20), ex(2, 2, 30)]  # 5 + 5 + 4 tokens after a 2-token system turn
    ids = sys_ids + sum((p[0] for p in parts), [])
    mask = sys_mask + sum((p[1] for p in parts), [])
    short = ([7, 8, 9], [0, 1, 1])
    # 16 tokens; without system_len the turn is lost
    convs = ids_as([(ids, mask, 2), short, (ids, mask)], id_dtype)
    packed = pack(convs, 11, overlong="truncate_turns", seed=0)
    assert packed.flat.input_ids.dtype == id_dtype
    got = {}
    for row in packed:
        for a, b in zip(row["cu_seqlens"][:-1], row["cu_seqlens"][1:]):
            got[int(row["seq_ids"][a])] = (row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist())
    # With system_len=2: system turn + the last two exchanges (2 + 5 + 4 = 11 tokens).
    assert got[0][0] == [100, 101] + parts[1][0] + parts[2][0]
    # The kept system turn ends in an untrained token; labels follow the truncated sequence.
    assert got[0][1][:3] == [IGNORE, IGNORE, IGNORE]
    # Without it: the oldest exchange (which starts with the "system" tokens) goes first.
    assert got[2][0] == parts[1][0] + parts[2][0]
    assert got[1][0] == [7, 8, 9]
    s = packed.stats
    assert s.truncated_conversations == 2 and s.truncated_tokens == 5 + 7
    assert s.dropped_conversations == 0 and s.real_tokens == 11 + 3 + 9
    # Too long even as system + final exchange: dropped and counted at full length.
    dropped = pack(convs, 3, overlong="truncate_turns")
    assert dropped.stats.dropped_conversations == 2 and dropped.stats.dropped_tokens == 32
    assert dropped.stats.truncated_conversations == 0
    check_rows(dropped, convs, 3, expect_kept=[1])
    # At 5 tokens the protected system turn no longer fits with the final exchange (2 + 4).
    mixed = pack(convs, 5, overlong="truncate_turns").stats
    assert (mixed.dropped_conversations, mixed.dropped_tokens) == (1, 16)
    assert (mixed.truncated_conversations, mixed.truncated_tokens) == (1, 12)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

GOOD = (np.array([1, 2, 3]), np.array([0, 1, 1]))


@pytest.mark.parametrize(
    "bad, match",
    [
        ((np.array([1, 2, 3]), np.array([0, 1])), "conversation 2: loss_mask has length 2"),
        ((np.array([1, -2, 3]), np.array([0, 1, 1])), "conversation 2: negative token id -2"),
        ((np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])), "conversation 2: input_ids must be integers"),
        ((np.array([1, 2, 3]), np.array([0.0, 1.0, 1.0])), "conversation 2: loss_mask must be bool"),
        ((np.array([1, 2, 3]), np.array([0, 2, 1])), "conversation 2: loss_mask values must be 0 or 1"),
        ((np.array([[1, 2, 3]]), np.array([[0, 1, 1]])), "conversation 2: .* 1-D"),
        ((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), "conversation 2: is empty"),
        ((np.array([1, 2**63 + 5], dtype=np.uint64), np.array([0, 1])), "conversation 2: .*int64"),
        ((np.array([1, 2, 3]),), "conversation 2: expected an"),
    ],
)
def test_bad_input_names_the_conversation(bad, match):
    with pytest.raises(ValueError, match=match):
        pack([GOOD, GOOD, bad, bad], 8)


@pytest.mark.parametrize("max_tokens", [0, -3, 2.5, "8", (1 << 24) + 1])
def test_bad_max_tokens(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        pack([GOOD], max_tokens)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_bins([3], max_tokens)


def test_bad_options_and_plans():
    with pytest.raises(ValueError, match="strategy"):
        pack([GOOD], 8, strategy="greedy")
    with pytest.raises(ValueError, match="conversation 1: length 0"):
        plan_bins([3, 0], 8)
    flat = flatten([GOOD])
    broken = BinPlan(np.array([0, 1]), np.array([5]), 8, "bfd", 0)
    with pytest.raises(ValueError, match="conversation 5"):
        materialize(flat, broken)  # out-of-range index is caught before any read
    tight = BinPlan(np.array([0, 2]), np.array([0, 0]), 4, "bfd", 0)
    with pytest.raises(ValueError, match="pad_to"):
        materialize(flat, tight, pad_to=4)


def test_empty_input():
    packed = pack([], 16)
    assert len(packed) == 0 and packed.stats.rows == 0 and packed.stats.efficiency == 0.0


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(flat_module, "_EXT", None)
    monkeypatch.setitem(sys.modules, "refit_fast._packing", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install -e ."):
        pack([GOOD], 8)
    import refit_fast.packing  # noqa: F401  (importing the package itself never needs it)


def test_flat_input_is_accepted():
    rng = np.random.default_rng(9)
    convs = make_convs([4, 6, 8], rng)
    flat = flatten(convs)
    assert isinstance(flat, FlatConversations) and flatten(flat) is flat
    a, b = pack(flat, 10, seed=3), pack(convs, 10, seed=3)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    ids, mask = flat.conversation(1)
    np.testing.assert_array_equal(ids, convs[1][0])


MODULES = [flat_module, plan_module, rows_module, pipeline_module, options_module, turns_module]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module):
    import doctest

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_package_exports_every_step():
    import refit_fast.packing as package

    before_split = {"BinPlan", "FlatConversations", "PackStats", "Packed", "exchange_starts", "flatten",
                    "materialize", "pack", "plan_bins", "row_buffers", "to_torch", "truncate_turns"}
    public = set().union(*(m.__all__ for m in MODULES))
    assert before_split <= public and set(package.__all__) == public
    for name in public:
        assert getattr(package, name) is getattr(next(m for m in MODULES if name in m.__all__), name)
    assert callable(package.pack)  # the function, not a module of the same name
    with pytest.raises(ImportError):
        __import__("refit_fast.packing.packer")  # split into the modules above, no shim left


def test_reference_self_check():
    # The references must be able to fail: a wrong tie rule or shuffle changes the plan.
    lengths = [3, 3, 2, 2, 1, 1, 4, 4]
    assert ref_plan(lengths, 5, "bfd", 0) != ref_plan(lengths, 5, "bfd", 1)
    assert len(list(itertools.chain(*ref_plan(lengths, 5, "ffs", 0)))) == len(lengths)


@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=ID_NAMES)
def test_trained_tokens_and_truncate_overlong_match_pack(id_dtype):
    from refit_fast.packing import truncate_overlong

    rng = np.random.default_rng(17)
    convs = ids_as(make_convs(rng.integers(1, 60, 97), rng), id_dtype)
    flat = flatten(convs)
    # every label the rows get is a trained token but the first: the packer's shift, counted directly
    np.testing.assert_array_equal(flat.trained_tokens(), [int(np.asarray(m)[1:].astype(bool).sum()) for _, m in convs])
    packed = materialize(flat, plan_bins(flat.lengths, 64))
    labels = np.zeros(len(flat), np.int64)
    for row in packed:
        np.add.at(labels, row["seq_ids"][row["labels"] != IGNORE], 1)
    np.testing.assert_array_equal(labels, flat.trained_tokens())
    # truncate_overlong is pack's truncate_turns: the same conversations, the same counts
    cap = 25
    cut, n, tokens = truncate_overlong(flat, cap)
    ref = pack(convs, cap, overlong="truncate_turns")
    np.testing.assert_array_equal(cut.offsets, ref.flat.offsets)
    np.testing.assert_array_equal(cut.input_ids, ref.flat.input_ids)
    assert (n, tokens) == (ref.stats.truncated_conversations, ref.stats.truncated_tokens) and n > 0
    assert truncate_overlong(flat, 10_000)[0] is flat  # nothing to cut: the input itself
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_overlong(flat, 0)
