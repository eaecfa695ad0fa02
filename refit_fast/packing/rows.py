"""Step 3 of packing: materialize (C++: csrc/materialize.cpp).

:func:`materialize` fills the rows of a :class:`~refit_fast.packing.plan.BinPlan` from
:class:`~refit_fast.packing.flat.FlatConversations` in one C++ call with the GIL released (all
rows, or a slice of them into buffers from :func:`row_buffers`, as the trainer does per batch).
:class:`Packed` holds rows, built when read or all at once; :class:`PackStats` says what packing
did; :func:`to_torch` turns a row into tensors.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from refit_fast.packing.flat import FlatConversations, _ext
from refit_fast.packing.options import _check_seq_ids, check_pad_to
from refit_fast.packing.plan import BinPlan

__all__ = ["PackStats", "Packed", "materialize", "row_buffers", "to_torch"]


@dataclass(frozen=True)
class PackStats:
    """What packing did. ``efficiency = real_tokens / (rows * max_tokens)``."""

    rows: int
    max_tokens: int
    conversations: int  # in the input
    kept_conversations: int
    real_tokens: int  # tokens in rows, padding excluded
    efficiency: float
    dropped_conversations: int = 0
    dropped_tokens: int = 0
    truncated_conversations: int = 0
    truncated_tokens: int = 0  # tokens removed from conversations that were kept after truncation
    pad_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


_ROW_KEYS = ("input_ids", "labels", "position_ids", "seq_ids")
_ITER_BLOCK = 64  # rows built per C++ call when iterating: amortizes the call, stays cache-sized


class Packed:
    """Packed rows. ``len(packed)`` rows; ``packed[i]`` is a dict of numpy arrays:

    ``input_ids``, ``labels``, ``position_ids``, ``seq_ids`` of length ``L`` (the row's length, or
    ``pad_to``), ``cu_seqlens`` int32 ``[k + 1]`` and ``max_seqlen`` (a Python int). ``seq_ids``
    (``"global"`` or ``"local"``, kept as ``seq_ids_mode``) says how seq_ids number conversations,
    as in :func:`materialize`.

    :func:`pack` returns rows that are *built on access*: it plans the bins and keeps a reference to
    the flat conversations, and ``packed[i]`` (or iteration, 64 rows per C++ call) fills the arrays
    then. Packing is therefore as cheap as planning, and the packed dataset costs no memory beyond
    its input (eagerly built rows would be four int64 arrays per token: 4x the input). Every access
    builds fresh arrays, so a row may be kept or modified freely. The flat arrays behind all rows
    (``packed.input_ids``, ``labels``, ``position_ids``, ``seq_ids``, ``cu_seqlens``,
    ``max_seqlen``, ``row_offsets``, ``cu_offsets``) are built on first use of any of them and kept;
    :meth:`materialize_all` does that explicitly, after which rows are views of those arrays.
    With ``__len__`` and ``__getitem__`` it is a map-style dataset: ``DataLoader(packed,
    batch_size=None, num_workers=k)`` builds rows in worker processes (it pickles with its input).

    >>> from refit_fast.packing import pack
    >>> packed = pack([(np.array([1, 2, 3]), np.array([0, 1, 1]))], 4, pad_to=4)
    >>> row = packed[0]
    >>> row["labels"].tolist(), row["cu_seqlens"].tolist(), row["max_seqlen"]
    ([2, 3, -100, -100], [0, 3, 4], 3)
    """

    def __init__(self, flat: FlatConversations, plan: BinPlan, stats: PackStats, pad_to: int | None,
                 *, pad_id: int = 0, dtype=np.int64, seq_ids: str = "global", arrays: dict | None = None):
        self.flat = flat
        self.plan = plan
        self.stats = stats
        self.pad_to = pad_to
        self.pad_id = int(pad_id)
        self.dtype = np.dtype(dtype)
        self._local = _check_seq_ids(seq_ids)
        self.seq_ids_mode = seq_ids
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self.plan)

    def _build(self, start: int, stop: int, out: dict | None = None) -> dict:
        """Raw C++ output for bins [start, stop): flat arrays plus row/cu offsets of those rows."""
        offs = self.plan.offsets
        lo, hi = int(offs[start]), int(offs[stop])
        return _ext().materialize(
            self.flat.input_ids, self.flat.loss_mask, self.flat.offsets, offs[start : stop + 1] - lo,
            self.plan.items[lo:hi], self.pad_to or 0, self.pad_id, self.dtype == np.int32,
            self._local, out,
        )

    @staticmethod
    def _row(arrays: dict, k: int) -> dict:
        ro, co = arrays["row_offsets"], arrays["cu_offsets"]
        a, b, c, d = ro[k], ro[k + 1], co[k], co[k + 1]
        row = {key: arrays[key][a:b] for key in _ROW_KEYS}
        row["cu_seqlens"] = arrays["cu_seqlens"][c:d]
        row["max_seqlen"] = int(arrays["max_seqlen"][k])
        return row

    def __getitem__(self, i: int) -> dict:
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        if self._arrays is not None:
            return self._row(self._arrays, i)
        return self._row(self._build(i, i + 1), 0)

    def __iter__(self) -> Iterator[dict]:
        if self._arrays is not None:
            for i in range(len(self)):
                yield self._row(self._arrays, i)
            return
        for a in range(0, len(self), _ITER_BLOCK):
            b = min(a + _ITER_BLOCK, len(self))
            arrays = self._build(a, b)
            for k in range(b - a):
                yield self._row(arrays, k)

    def materialize_all(self) -> "Packed":
        """Build every row now into flat arrays kept by this object (returns ``self``).

        >>> from refit_fast.packing import pack
        >>> packed = pack([([1, 2], [0, 1]), ([3], [0])], 4).materialize_all()
        >>> packed.input_ids.shape, packed.row_offsets.tolist()
        ((3,), [0, 3])
        """
        if self._arrays is None:
            self._arrays = self._build(0, len(self))
        return self

    def _flat(self, key: str) -> np.ndarray:
        return self.materialize_all()._arrays[key]

    input_ids = property(lambda self: self._flat("input_ids"), doc="All rows' input_ids, back to back.")
    labels = property(lambda self: self._flat("labels"), doc="All rows' labels, back to back.")
    position_ids = property(lambda self: self._flat("position_ids"), doc="All rows' position_ids.")
    seq_ids = property(lambda self: self._flat("seq_ids"), doc="All rows' seq_ids, back to back.")
    cu_seqlens = property(lambda self: self._flat("cu_seqlens"), doc="All rows' cu_seqlens, back to back.")
    max_seqlen = property(lambda self: self._flat("max_seqlen"), doc="max_seqlen of every row (int64).")
    row_offsets = property(lambda self: self._flat("row_offsets"), doc="Row k is tokens [row_offsets[k], row_offsets[k+1]).")
    cu_offsets = property(lambda self: self._flat("cu_offsets"), doc="Row k's cu_seqlens is cu_seqlens[cu_offsets[k]:cu_offsets[k+1]].")

    def __repr__(self) -> str:
        s = self.stats
        return f"Packed(rows={s.rows}, max_tokens={s.max_tokens}, efficiency={s.efficiency:.4f})"


def _stats(flat: FlatConversations, plan: BinPlan, pad_to: int | None, real: int, counts: dict) -> PackStats:
    rows = len(plan)
    return PackStats(
        rows=rows,
        max_tokens=plan.max_tokens,
        conversations=len(flat),
        kept_conversations=int(plan.items.shape[0]),
        real_tokens=real,
        efficiency=real / (rows * plan.max_tokens) if rows else 0.0,
        pad_tokens=rows * pad_to - real if pad_to else 0,
        **counts,
    )


def materialize(
    flat: FlatConversations,
    plan: BinPlan,
    *,
    pad_to: int | None = None,
    pad_id: int = 0,
    dtype=np.int64,
    rows: slice | None = None,
    out: dict | None = None,
    seq_ids: str = "global",
) -> Packed:
    """Fill the rows of ``plan`` from ``flat`` now, in one C++ call (GIL released).

    Row ``k`` holds the conversations of bin ``k``, in bin order. ``dtype`` (int64 or int32) is the
    dtype of ``input_ids``, ``labels``, ``position_ids`` and ``seq_ids``, whichever width
    ``flat.input_ids`` has (int32 ids are read as they are, not widened first); ``cu_seqlens`` is
    always int32. With ``pad_to`` every row is padded to that length with ``pad_id`` (labels -100,
    seq_ids -1, positions restarting at 0) as one final ``cu_seqlens`` segment.

    ``seq_ids``: ``"global"`` (default) gives every token the index of its conversation in
    ``flat``; ``"local"`` numbers the conversations of each row 0, 1, ..., k-1 in row order (what
    a per-row segment sum indexes by). Padding is -1 either way.

    ``rows`` (a slice of bins, step 1) materializes only those bins, e.g. one training batch at a
    time; its cost is proportional to those rows only. ``out`` is a dict of preallocated 1-D buffers
    (``input_ids``, ``labels``, ``position_ids``, ``seq_ids`` of ``dtype``, ``cu_seqlens`` int32;
    see :func:`row_buffers`) that are filled in place and returned as views: reusing them skips
    allocation and page faults, which cost more than the packing itself. Stats then describe the
    selected rows only (``dropped_*`` counts only for a whole plan).

    >>> from refit_fast.packing import flatten, plan_bins
    >>> flat = flatten([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])])
    >>> packed = materialize(flat, plan_bins(flat.lengths, 8))
    >>> packed[0]["position_ids"].tolist(), packed[0]["seq_ids"].tolist()
    ([0, 1, 2, 0, 1], [0, 0, 0, 1, 1])
    >>> flat = flatten([([1, 2], [0, 1]), ([3], [0]), ([4, 5], [0, 1])])
    >>> plan = BinPlan(np.array([0, 1, 3]), np.array([1, 2, 0]), 4, "given", 0)
    >>> [materialize(flat, plan, seq_ids=s, pad_to=4)[1]["seq_ids"].tolist() for s in ("global", "local")]
    [[2, 2, 0, 0], [0, 0, 1, 1]]
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise ValueError(f"dtype must be int64 or int32, got {dt}")
    _check_seq_ids(seq_ids)
    pad_to = check_pad_to(pad_to, plan.max_tokens)
    whole = rows is None
    if rows is not None:
        start, stop, step = rows.indices(len(plan))
        if step != 1:
            raise ValueError("rows must be a slice with step 1")
        stop = max(start, stop)
        lo, hi = plan.offsets[start], plan.offsets[stop]
        plan = BinPlan(plan.offsets[start : stop + 1] - lo, plan.items[lo:hi],
                       plan.max_tokens, plan.strategy, plan.seed)
    packed = Packed(flat, plan, None, pad_to, pad_id=pad_id, dtype=dt, seq_ids=seq_ids)
    arrays = packed._build(0, len(plan), out)
    packed._arrays = arrays
    real = int(arrays["real_tokens"])
    counts = {}
    if whole:  # conversations in no bin were dropped by the planner (over-long)
        counts = {"dropped_conversations": len(flat) - int(plan.items.shape[0]),
                  "dropped_tokens": int(flat.offsets[-1]) - real}
    packed.stats = _stats(flat, plan, pad_to, real, counts)
    return packed


def row_buffers(plan: BinPlan, lengths=None, *, pad_to: int | None = None, rows: int | None = None,
                dtype=np.int64) -> dict:
    """Preallocated output buffers for :func:`materialize` ``(out=...)``, sized for the largest
    ``rows`` consecutive bins of ``plan`` (all bins if ``rows`` is None; with ``pad_to`` the size is
    exact). Pages are touched once here so that later fills run at memory speed.

    >>> from refit_fast.packing import flatten, plan_bins
    >>> flat = flatten([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])])
    >>> plan = plan_bins(flat.lengths, 4)
    >>> buf = row_buffers(plan, flat.lengths, rows=1)
    >>> materialize(flat, plan, rows=slice(0, 1), out=buf)[0]["input_ids"].base is not None
    True
    """
    pad_to = check_pad_to(pad_to, plan.max_tokens)
    n_bins = len(plan)
    rows = n_bins if rows is None else max(0, min(int(rows), n_bins))
    counts = np.diff(plan.offsets)
    if pad_to is not None:
        tokens = rows * int(pad_to)
        cu = int(np.convolve(counts, np.ones(rows, np.int64), "valid").max(initial=0)) + 2 * rows if rows else 0
    else:
        if lengths is None:
            raise ValueError("lengths are needed to size buffers without pad_to")
        loads = plan.loads(lengths)
        win = np.ones(rows, np.int64) if rows else np.ones(1, np.int64)
        tokens = int(np.convolve(loads, win, "valid").max(initial=0)) if rows else 0
        cu = int(np.convolve(counts, win, "valid").max(initial=0)) + rows if rows else 0
    out = {k: np.full(tokens, 0, dtype) for k in ("input_ids", "labels", "position_ids", "seq_ids")}
    out["cu_seqlens"] = np.full(cu, 0, np.int32)
    return out


def to_torch(row: dict, device=None, *, non_blocking: bool = False, dtype=None) -> dict:
    """A row of :class:`Packed` as torch tensors on ``device`` (``max_seqlen`` stays a Python int,
    so varlen attention needs no device sync). On CPU the tensors share memory with the arrays.

    ``dtype`` (e.g. ``torch.int64``) converts ``input_ids``, ``labels``, ``position_ids`` and
    ``seq_ids`` after the move, so int32 rows cross the host-device link at half the bytes and
    arrive as int64; ``cu_seqlens`` stays int32.

    >>> from refit_fast.packing import pack
    >>> packed = pack([([1, 2, 3], [0, 1, 1])], 4)
    >>> batch = to_torch(packed[0])
    >>> batch["input_ids"].dtype, batch["cu_seqlens"].dtype, batch["max_seqlen"]
    (torch.int64, torch.int32, 3)
    """
    import torch

    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            if device is not None:
                t = t.to(device, non_blocking=non_blocking)
            if dtype is not None and k != "cu_seqlens":
                t = t.to(dtype)
            out[k] = t
        else:
            out[k] = v
    return out
