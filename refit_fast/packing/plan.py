"""Step 2 of packing: plan (C++: csrc/plan.cpp).

:func:`plan_bins` assigns conversations, given only their lengths, to bins of at most
``max_tokens`` tokens (best-fit-decreasing or first-fit over shuffled input), then shuffles the
bins with the seed. A :class:`BinPlan` is the result: which conversations share a row, in CSR form;
:meth:`BinPlan.take` and :meth:`BinPlan.expand` derive plans from it without planning again.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from refit_fast.packing.flat import _ext, _first
from refit_fast.packing.options import STRATEGIES, check_max_tokens, check_strategy

__all__ = ["BinPlan", "plan_bins"]


@dataclass(frozen=True)
class BinPlan:
    """Which conversations share a row: bin ``k`` holds ``items[offsets[k]:offsets[k+1]]``.

    Conversations longer than ``max_tokens`` are in no bin. ``len(plan)`` is the number of bins.

    >>> plan = plan_bins([3, 2, 5, 1], max_tokens=5, seed=0)
    >>> len(plan), sorted(sorted(b.tolist()) for b in plan)
    (3, [[0, 1], [2], [3]])
    """

    offsets: np.ndarray
    items: np.ndarray
    max_tokens: int
    strategy: str
    seed: int

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, k: int) -> np.ndarray:
        k = operator.index(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"bin {k} out of range for a plan of {len(self)} bins")
        return self.items[self.offsets[k] : self.offsets[k + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(len(self)):
            yield self.items[self.offsets[k] : self.offsets[k + 1]]

    def loads(self, lengths) -> np.ndarray:
        """Tokens per bin, given the conversation lengths the plan was made from."""
        lens = np.asarray(lengths, dtype=np.int64)[self.items]
        return np.add.reduceat(lens, self.offsets[:-1]) if len(self) else np.zeros(0, np.int64)

    def take(self, bins) -> "BinPlan":
        """A plan holding bins ``bins`` (indices into this plan; negative ones count from the end)
        in that order, e.g. one rank's rows of a step laid out back to back so that
        ``materialize(rows=slice(...))`` reads them in one call. Keeps max_tokens, strategy, seed.

        >>> plan = BinPlan(np.array([0, 2, 3, 5]), np.array([4, 0, 1, 2, 3]), 8, "bfd", 0)
        >>> [b.tolist() for b in plan.take([2, 0])]
        [[2, 3], [4, 0]]
        """
        idx = _index_array(bins, "bins")
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"bin {bad} out of range for a plan of {n} bins")
        offsets, items = _gather_segments(self.offsets, self.items, np.where(idx < 0, idx + n, idx))
        return BinPlan(offsets, items, self.max_tokens, self.strategy, self.seed)

    def expand(self, unit_offsets, unit_items) -> "BinPlan":
        """For a plan made over *units* (unit ``u`` is the items
        ``unit_items[unit_offsets[u]:unit_offsets[u+1]]``, e.g. a DPO pair of two conversations
        planned as one), the same bins in the same order over the items: each bin holds its units'
        items, concatenated in bin order. Keeps max_tokens, strategy and seed.

        >>> pairs = np.array([0, 2, 4, 6])                      # 3 units of 2 conversations each
        >>> unit_plan = BinPlan(np.array([0, 2, 3]), np.array([2, 0, 1]), 8, "bfd", 0)
        >>> [b.tolist() for b in unit_plan.expand(pairs, np.arange(6))]
        [[4, 5, 0, 1], [2, 3]]
        """
        offs = _index_array(unit_offsets, "unit_offsets")
        items = _index_array(unit_items, "unit_items")
        if offs.size == 0:
            raise ValueError("unit_offsets needs at least one element (n units: n + 1)")
        if offs[0] < 0 or offs[-1] > items.shape[0] or (np.diff(offs) < 0).any():
            raise ValueError(f"unit_offsets must be non-decreasing within [0, {items.shape[0]}]")
        n_units = offs.shape[0] - 1
        if self.items.size and (self.items.min() < 0 or self.items.max() >= n_units):
            bad = self.items[(self.items < 0) | (self.items >= n_units)][0]
            raise ValueError(f"plan refers to unit {bad} but there are {n_units}")
        per_unit, out_items = _gather_segments(offs, items, self.items)
        # Bin k's units are plan.items[offsets[k]:offsets[k+1]]: its items end where its last unit's do.
        return BinPlan(per_unit[self.offsets], out_items, self.max_tokens, self.strategy, self.seed)


def _index_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array")
    return arr.astype(np.int64, copy=False)


def _gather_segments(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray):
    """CSR segments ``idx`` of ``(offsets, values)``, back to back: (new offsets, new values).
    Vectorized (no loop over segments): plans hold up to millions of bins."""
    starts, lens = offsets[idx], offsets[idx + 1] - offsets[idx]
    new_offsets = np.zeros(idx.shape[0] + 1, np.int64)
    np.cumsum(lens, out=new_offsets[1:])
    # Output position p of segment s reads values[starts[s] + (p - new_offsets[s])].
    pos = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], lens)
    return new_offsets, np.ascontiguousarray(values[pos], dtype=np.int64)


def plan_bins(lengths, max_tokens: int, *, strategy: str = "bfd", seed: int = 0) -> BinPlan:
    """Assign conversations (given by their lengths) to bins of at most ``max_tokens`` tokens.

    ``strategy="bfd"``: best-fit-decreasing (longest first, each into the open bin it fills most
    tightly; O(n + max_tokens) sort plus O(log_64 max_tokens) per conversation). ``"ffs"``:
    first-fit over the conversations in seeded random order (keeps length mixing within a row,
    uses a few percent more rows). Either way the bins are then shuffled with ``seed`` so training
    does not see them sorted by fill. Same lengths, options and seed give the same plan, bit for bit.
    Lengths above ``max_tokens`` are skipped (in no bin); a length < 1 raises ``ValueError``.

    >>> plan = plan_bins(np.array([4, 4, 2, 2, 3, 1]), 6, strategy="bfd", seed=1)
    >>> len(plan), sorted(plan.loads([4, 4, 2, 2, 3, 1]).tolist())
    (3, [4, 6, 6])
    """
    cap = check_max_tokens(max_tokens)
    strategy = check_strategy(strategy)
    seed = operator.index(seed)
    lens = np.asarray(lengths)
    if lens.ndim != 1 or (lens.size and lens.dtype.kind not in "iu"):
        raise ValueError("lengths must be a 1-D integer array")
    lens = np.ascontiguousarray(lens, dtype=np.int64)
    if lens.size and lens.min() < 1:
        i = _first(lens < 1)
        raise ValueError(f"conversation {i}: length {lens[i]} (must be >= 1)")
    offsets, items = _ext().plan(lens, cap, STRATEGIES[strategy], seed % (1 << 64))
    return BinPlan(offsets, items, cap, strategy, seed)
