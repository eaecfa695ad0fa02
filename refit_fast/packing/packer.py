"""Padding-free packing of conversations into rows of at most ``max_tokens`` tokens.

Three steps, each usable on its own (the trainer flattens once, plans once per epoch, materializes):

1. :func:`flatten` validates the conversations and concatenates them into one flat token buffer plus
   offsets (C++: one pass that copies and checks every token, GIL released);
2. :func:`plan_bins` assigns conversations to bins (C++: best-fit-decreasing over a capacity-indexed
   tree, or first-fit over shuffled input), then shuffles the bins with the seed;
3. :func:`materialize` fills rows' arrays in one C++ call with the GIL released (all rows, or a
   slice of them into reused buffers, as the trainer does per batch).

:func:`pack` runs the first two, handles over-long conversations, and returns rows that are built
when read: packing costs what planning costs, and holds no copy of the tokens beyond the flat input.
"""
from __future__ import annotations

import importlib
import operator
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from refit_fast.packing.turns import truncate_turns

__all__ = [
    "BinPlan",
    "FlatConversations",
    "PackStats",
    "Packed",
    "check_max_tokens",
    "check_overlong",
    "check_pad_to",
    "check_strategy",
    "flatten",
    "materialize",
    "pack",
    "plan_bins",
    "row_buffers",
    "to_torch",
]

IGNORE_INDEX = -100
STRATEGIES = {"bfd": 0, "ffs": 1}
OVERLONG = ("drop", "error", "truncate_turns")
SEQ_IDS = ("global", "local")
MAX_TOKENS_LIMIT = 1 << 24  # same bound as kMaxTokensLimit in csrc/packing.h

_BUILD_HINT = (
    "refit_fast._packing (the C++ packer) is not built. From the repository root run "
    "`pip install -e .` (needs a C++17 compiler; pybind11 comes through build isolation) or, in an "
    "environment that already has pybind11, `python setup.py build_ext --inplace`."
)
_EXT = None


def _ext():
    """The compiled module, imported on first use so that `import refit_fast` works without it."""
    global _EXT
    if _EXT is None:
        try:
            _EXT = importlib.import_module("refit_fast._packing")
        except ImportError as e:
            raise ImportError(_BUILD_HINT) from e
    return _EXT


# --------------------------------------------------------------------------------------------------
# Step 1: flatten
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatConversations:
    """All conversations in one buffer: conversation ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``.

    ``input_ids`` is int64, ``loss_mask`` uint8 (0/1), ``offsets`` int64 ``[n + 1]``. Build it with
    :func:`flatten`, which validates, or by hand from buffers you already have (e.g. an Arrow list
    column's values and offsets: no copy). A hand-built one is checked as rows are built: the
    offsets of every conversation a row holds (a bad one raises instead of reading out of bounds)
    and its token ids (a negative one raises ``ValueError`` naming the conversation); a mask value
    other than 0 counts as 1.

    >>> flat = flatten([(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([8]), np.array([0]))])
    >>> flat.lengths, flat.offsets
    (array([3, 1]), array([0, 3, 4]))
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray

    def __post_init__(self):
        # O(1) layout checks, so a hand-built one fails here with a hint, not in the C++ call.
        for name, want in (("input_ids", np.int64), ("loss_mask", np.uint8), ("offsets", np.int64)):
            a = getattr(self, name)
            if not (isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype == want and a.dtype.isnative
                    and a.flags.c_contiguous):
                got = f"{a.dtype}{'' if a.dtype.isnative else ' (swapped bytes)'} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"FlatConversations.{name} must be a contiguous 1-D {np.dtype(want)} array, "
                                 f"got {got}; FlatConversations.from_buffers converts and checks")
        if self.loss_mask.shape != self.input_ids.shape or self.offsets.shape[0] < 1:
            raise ValueError("FlatConversations: loss_mask must match input_ids and offsets needs n + 1 >= 1 "
                             "entries; FlatConversations.from_buffers converts and checks")

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, loss_mask)`` of conversation ``i`` (views)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.loss_mask[a:b]

    @classmethod
    def from_arrow(cls, input_ids, loss_mask, *, check_values: bool = True) -> "FlatConversations":
        """From two Arrow list columns (``ListArray``, ``LargeListArray`` or a ``ChunkedArray`` of
        them), e.g. ``ds.data["input_ids"]`` of a Hugging Face ``datasets.Dataset``. ``ds.data`` is
        the table *without* the row mapping that ``select``/``shuffle``/``filter`` add: call
        ``ds = ds.flatten_indices()`` first on such a dataset.

        The token values are not copied when they are int64 and in one chunk (several chunks are
        combined first); the mask column must have the same row lengths. Null rows or tokens raise
        ``ValueError``. Checks as :meth:`from_buffers`. pyarrow is not imported here: any object
        with pyarrow's list-array interface works.

        >>> import pyarrow as pa  # doctest: +SKIP
        >>> table = pa.table({"input_ids": [[5, 6, 7], [8]], "loss_mask": [[0, 1, 1], [1]]})  # doctest: +SKIP
        >>> FlatConversations.from_arrow(table["input_ids"], table["loss_mask"]).lengths.tolist()  # doctest: +SKIP
        [3, 1]
        """
        def one_array(col, name):
            if hasattr(col, "chunks"):  # ChunkedArray: one chunk is used as is, several are combined
                col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            if not (hasattr(col, "offsets") and hasattr(col, "values")):
                raise ValueError(f"{name} must be an Arrow list array, got {type(col).__name__}")
            if col.null_count or col.values.null_count:
                raise ValueError(f"{name} has null entries")
            # .values ignores a slice's offset; .offsets does not: from_buffers rebases.
            return col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy(zero_copy_only=False)

        ids, offsets = one_array(input_ids, "input_ids")
        mask, mask_offsets = one_array(loss_mask, "loss_mask")
        lengths, mask_lengths = np.diff(offsets), np.diff(mask_offsets)
        if lengths.shape != mask_lengths.shape:
            raise ValueError(f"loss_mask has {mask_lengths.shape[0]} rows but input_ids has {lengths.shape[0]}")
        i = _first(lengths != mask_lengths)
        if i >= 0:
            raise ValueError(f"conversation {i}: loss_mask has length {mask_lengths[i]} but input_ids has length {lengths[i]}")
        # Each column may be a slice of a longer buffer at its own place: cut both to their rows.
        ids, mask = ids[offsets[0] : offsets[-1]], mask[mask_offsets[0] : mask_offsets[-1]]
        return cls.from_buffers(ids, mask, offsets - offsets[0], check_values=check_values)

    @classmethod
    def from_buffers(cls, input_ids, loss_mask, offsets, *, check_values: bool = True) -> "FlatConversations":
        """From flat buffers you already have, such as an Arrow list column's values and offsets.

        No copy of the tokens when ``input_ids`` is int64 and ``loss_mask`` bool/uint8 (other integer
        dtypes are converted). ``offsets`` (any integer dtype, ``[n + 1]``) must never decrease and
        stay within the buffers; offsets that start after 0, as a sliced Arrow array has, are
        rebased. ``loss_mask`` must share ``offsets`` with ``input_ids``. Raises ``ValueError``
        naming the first empty conversation; with ``check_values`` (one vectorized pass) also the
        first negative id or mask value other than 0/1. Without it, ids are checked as rows are
        built.

        For Arrow list columns (a Hugging Face dataset's), :meth:`from_arrow` does the unpacking.

        >>> flat = FlatConversations.from_buffers(np.array([5, 6, 7, 8]), np.array([0, 1, 1, 0], bool),
        ...                                       np.array([0, 3, 4], np.int32))
        >>> flat.lengths.tolist(), flat.loss_mask.dtype.name, len(pack(flat, 4))
        ([3, 1], 'uint8', 1)
        """
        ids, mask, offs = (np.asarray(a) for a in (input_ids, loss_mask, offsets))
        for name, a, kinds in (("input_ids", ids, "iu"), ("loss_mask", mask, "biu"), ("offsets", offs, "iu")):
            if a.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
            if a.size and a.dtype.kind not in kinds:
                raise ValueError(f"{name} must be {'bool or ' if 'b' in kinds else ''}integer, got dtype {a.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(f"loss_mask has {mask.shape[0]} tokens but input_ids has {ids.shape[0]}")
        if offs.size == 0:
            raise ValueError("offsets needs at least one element (n conversations: n + 1)")
        offs = offs.astype(np.int64, copy=False)
        steps = np.diff(offs)
        if offs[0] < 0 or offs[-1] > ids.shape[0] or (steps < 0).any():
            raise ValueError(f"offsets must be non-decreasing within [0, {ids.shape[0]}]")
        i = _first(steps == 0)
        if i >= 0:
            raise ValueError(f"conversation {i}: is empty")
        if offs[0] != 0 or offs[-1] != ids.shape[0]:  # a slice of the buffers: rebase (views only)
            ids, mask = ids[offs[0] : offs[-1]], mask[offs[0] : offs[-1]]
            offs = offs - offs[0]
        if ids.dtype.kind == "u" and ids.itemsize == 8 and ids.size and ids.max() > np.iinfo(np.int64).max:
            pos = _first(ids > np.iinfo(np.int64).max)
            raise ValueError(f"conversation {_conversation_at(offs, pos)}: input_ids do not fit in int64")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if check_values and ids.size:
            # min/max first (one read each, no temporary); the offender is located only on failure.
            pos, what = -1, ""
            if ids.min() < 0:
                pos = _first(ids < 0)
                what = f"negative token id {ids[pos]}"
            elif mask.itemsize == 1:  # one OR pass over the bytes; int8 -1 reads as 255
                raw = mask.view(np.uint8)
                if np.bitwise_or.reduce(raw) > 1:
                    pos = _first(raw > 1)
            elif mask.min() < 0 or mask.max() > 1:
                pos = _first((mask < 0) | (mask > 1))
            if pos >= 0 and not what:
                what = f"loss_mask value {mask[pos]}"
            if pos >= 0:
                i = _conversation_at(offs, pos)
                raise ValueError(f"conversation {i}: {what} at position {pos - offs[i]}")
        if mask.itemsize == 1:  # bool, int8, uint8: the same bytes; non-zero means trained
            mask = mask.view(np.uint8)
        else:
            mask = (mask != 0).view(np.uint8)  # not astype: 256 must not wrap to 0 (untrained)
        return cls(ids, np.ascontiguousarray(mask), np.ascontiguousarray(offs))


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _arrays(column: list, what: str) -> list[np.ndarray]:
    # Fast path: a list of numpy arrays is used as is (no per-item call).
    if all(type(a) is np.ndarray for a in column):
        return column
    out = []
    for i, a in enumerate(column):
        try:
            out.append(_to_numpy(a))
        except Exception as e:  # noqa: BLE001 - any conversion failure is bad input
            raise ValueError(f"conversation {i}: {what} is not an array ({e})") from e
    return out


def _conversation_at(offsets: np.ndarray, pos: int) -> int:
    """Index of the conversation whose tokens [offsets[i], offsets[i+1]) contain flat position pos."""
    return int(np.searchsorted(offsets, pos, side="right") - 1)


def _first(flags: np.ndarray) -> int:
    idx = np.flatnonzero(flags)
    return int(idx[0]) if idx.size else -1


def flatten(conversations) -> FlatConversations:
    """Validate conversations and concatenate them into a :class:`FlatConversations`.

    ``conversations`` is a sequence of ``(input_ids, loss_mask)`` pairs (numpy arrays, torch tensors
    or lists; a third element, the system-turn length, is allowed and ignored here). A
    ``FlatConversations`` is returned unchanged. Raises ``ValueError`` naming the first bad
    conversation: not 1-D, empty, mask length differs from ids, non-integer ids, a mask that is not
    bool/integer 0/1, or negative ids.

    >>> flat = flatten([([1, 2], [0, 1]), ([3, 4, 5], [True, False, True])])
    >>> flat.input_ids, flat.loss_mask
    (array([1, 2, 3, 4, 5]), array([0, 1, 1, 0, 1], dtype=uint8))
    >>> flatten([([1, 2], [0])])
    Traceback (most recent call last):
    ValueError: conversation 0: loss_mask has length 1 but input_ids has length 2
    """
    if isinstance(conversations, FlatConversations):
        return conversations
    convs = conversations if isinstance(conversations, (list, tuple)) else list(conversations)
    try:
        ids_col = [c[0] for c in convs]
        mask_col = [c[1] for c in convs]
    except (TypeError, IndexError, KeyError):
        for i, c in enumerate(convs):
            if not (hasattr(c, "__getitem__") and hasattr(c, "__len__") and len(c) >= 2):
                raise ValueError(f"conversation {i}: expected an (input_ids, loss_mask) pair") from None
        raise
    ids_col = _arrays(ids_col, "input_ids")
    mask_col = _arrays(mask_col, "loss_mask")
    try:
        ext = _ext()
    except ImportError:  # flatten works without the extension (pack does not): numpy path below
        ext = None
    if ext is not None:
        # One C++ pass: shape/dtype checks, then copy + value checks (ids >= 0, mask 0/1) with the
        # GIL released; the same errors, in the same order, as the numpy path below.
        out = ext.flatten(ids_col, mask_col)
        if out is None:  # some array has swapped byte order: convert those, then copy
            native = lambda col: [a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")) for a in col]  # noqa: E731
            out = ext.flatten(native(ids_col), native(mask_col))
        return FlatConversations(*out)
    return _flatten_numpy(ids_col, mask_col)


def _flatten_numpy(ids_col: list, mask_col: list) -> FlatConversations:
    """flatten without the extension: vectorized over conversations, several passes over tokens."""
    n = len(ids_col)

    # Per-conversation checks, vectorized over conversations; the first offender over all checks wins.
    ids_shape = [a.shape for a in ids_col]
    mask_shape = [a.shape for a in mask_col]
    bad: dict[int, str] = {}

    def flag(index: int, why: str) -> None:
        if index >= 0 and index not in bad:
            bad[index] = why

    ndim_ok = np.fromiter((len(s) == 1 for s in ids_shape), bool, n) & np.fromiter(
        (len(s) == 1 for s in mask_shape), bool, n
    )
    i = _first(~ndim_ok)
    flag(i, "input_ids and loss_mask must be 1-D")
    ok = ndim_ok.all()
    if ok:
        lengths = np.fromiter((s[0] for s in ids_shape), np.int64, n)
        mlengths = np.fromiter((s[0] for s in mask_shape), np.int64, n)
        i = _first(lengths != mlengths)
        if i >= 0:
            flag(i, f"loss_mask has length {mlengths[i]} but input_ids has length {lengths[i]}")
        flag(_first(lengths == 0), "is empty")
    ids_dtypes = {a.dtype for a in ids_col}
    if any(dt.kind not in "iu" for dt in ids_dtypes):
        i = next(j for j, a in enumerate(ids_col) if a.dtype.kind not in "iu")
        flag(i, f"input_ids must be integers, got dtype {ids_col[i].dtype}")
    mask_dtypes = {a.dtype for a in mask_col}
    if any(dt.kind not in "biu" for dt in mask_dtypes):
        i = next(j for j, a in enumerate(mask_col) if a.dtype.kind not in "biu")
        flag(i, f"loss_mask must be bool or integer, got dtype {mask_col[i].dtype}")
    if bad:
        i = min(bad)
        raise ValueError(f"conversation {i}: {bad[i]}")
    # Value checks come after every shape and dtype check, as in the C++ path.
    if any(dt == np.uint64 for dt in ids_dtypes):  # would wrap to negative in int64
        for j, a in enumerate(ids_col):
            if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
                raise ValueError(f"conversation {j}: input_ids do not fit in int64 (id {a.max()})")

    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if n == 0:
        return FlatConversations(np.zeros(0, np.int64), np.zeros(0, np.uint8), offsets)
    ids = np.concatenate(ids_col, dtype=np.int64, casting="unsafe")  # dtypes checked above
    if mask_dtypes == {np.dtype(bool)}:
        mask = np.concatenate(mask_col).view(np.uint8)
    else:
        raw = np.concatenate(mask_col)
        if raw.size and (raw.min() < 0 or raw.max() > 1):
            pos = _first((raw != 0) & (raw != 1))
            i = _conversation_at(offsets, pos)
            raise ValueError(f"conversation {i}: loss_mask values must be 0 or 1, got {raw[pos]}")
        mask = raw.astype(np.uint8)
    if ids.size and ids.min() < 0:
        pos = _first(ids < 0)
        i = _conversation_at(offsets, pos)
        raise ValueError(f"conversation {i}: negative token id {ids[pos]} at position {pos - offsets[i]}")
    return FlatConversations(ids, mask, offsets)


# --------------------------------------------------------------------------------------------------
# Step 2: plan
# --------------------------------------------------------------------------------------------------


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


def check_max_tokens(max_tokens) -> int:
    """``max_tokens`` as an int, or ``ValueError`` naming it: an integer in [1, 2**24].

    >>> check_max_tokens(4096)
    4096
    >>> check_max_tokens(0)
    Traceback (most recent call last):
    ValueError: max_tokens must be >= 1, got 0
    """
    try:
        cap = operator.index(max_tokens)
    except TypeError:
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}") from None
    if cap < 1:
        raise ValueError(f"max_tokens must be >= 1, got {cap}")
    if cap > MAX_TOKENS_LIMIT:  # the planner keeps per-capacity tables
        raise ValueError(f"max_tokens must be <= {MAX_TOKENS_LIMIT}, got {cap}")
    return cap


def check_pad_to(pad_to, max_tokens) -> int | None:
    """``pad_to`` as an int (or None: no padding), or ``ValueError`` naming it: an integer
    >= ``max_tokens`` (itself checked as :func:`check_max_tokens` does).

    >>> check_pad_to(None, 8), check_pad_to(16, 8)
    (None, 16)
    >>> check_pad_to(4, 8)
    Traceback (most recent call last):
    ValueError: pad_to=4 is smaller than max_tokens=8
    """
    cap = check_max_tokens(max_tokens)
    if pad_to is None:
        return None
    try:
        pad_to = operator.index(pad_to)
    except TypeError:
        raise ValueError(f"pad_to must be an integer or None, got {pad_to!r}") from None
    if pad_to < cap:
        raise ValueError(f"pad_to={pad_to} is smaller than max_tokens={cap}")
    return pad_to


def check_strategy(strategy) -> str:
    """``strategy`` if it is a planner strategy (``"bfd"`` or ``"ffs"``), else ``ValueError``.

    >>> check_strategy("ffs")
    'ffs'
    >>> check_strategy("greedy")
    Traceback (most recent call last):
    ValueError: strategy must be one of ['bfd', 'ffs'], got 'greedy'
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    return strategy


def check_overlong(overlong) -> str:
    """``overlong`` if it is one of :data:`OVERLONG` (what :func:`pack` does with conversations
    longer than ``max_tokens``), else ``ValueError``.

    >>> check_overlong("truncate_turns")
    'truncate_turns'
    >>> check_overlong("split")
    Traceback (most recent call last):
    ValueError: overlong must be one of ['drop', 'error', 'truncate_turns'], got 'split'
    """
    if not isinstance(overlong, str) or overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {list(OVERLONG)}, got {overlong!r}")
    return overlong


def _check_seq_ids(seq_ids) -> bool:
    """True for ``"local"`` seq_ids (the C++ flag), False for ``"global"``."""
    if not isinstance(seq_ids, str) or seq_ids not in SEQ_IDS:
        raise ValueError(f"seq_ids must be one of {list(SEQ_IDS)}, got {seq_ids!r}")
    return seq_ids == "local"


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


# --------------------------------------------------------------------------------------------------
# Step 3: materialize
# --------------------------------------------------------------------------------------------------


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
    dtype of ``input_ids``, ``labels``, ``position_ids`` and ``seq_ids``; ``cu_seqlens`` is always
    int32. With ``pad_to`` every row is padded to that length with ``pad_id`` (labels -100,
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


# --------------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------------


def row_buffers(plan: BinPlan, lengths=None, *, pad_to: int | None = None, rows: int | None = None,
                dtype=np.int64) -> dict:
    """Preallocated output buffers for :func:`materialize` ``(out=...)``, sized for the largest
    ``rows`` consecutive bins of ``plan`` (all bins if ``rows`` is None; with ``pad_to`` the size is
    exact). Pages are touched once here so that later fills run at memory speed.

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


def _truncate(flat: FlatConversations, convs, cap: int):
    """Apply exchange truncation to every over-long conversation (rare: a Python loop over them only)."""
    lengths = flat.lengths
    over = np.flatnonzero(lengths > cap)
    keep = None
    new_lengths = lengths.copy()
    n_trunc = tok_trunc = 0
    for i in over.tolist():
        c = convs[i] if convs is not None else ()
        system_len = int(c[2]) if len(c) > 2 else 0
        a = int(flat.offsets[i])
        n_i = int(lengths[i])
        if not 0 <= system_len <= n_i:
            raise ValueError(f"conversation {i}: system_len={system_len} is outside the conversation")
        ranges = truncate_turns(flat.loss_mask[a : a + n_i], cap, system_len)
        if ranges is None:
            continue  # stays over-long: the planner skips it and it is counted as dropped
        if keep is None:
            keep = np.ones(flat.input_ids.shape[0], dtype=bool)
        keep[a : a + n_i] = False
        for s, e in ranges:
            keep[a + s : a + e] = True
        new_len = sum(e - s for s, e in ranges)
        new_lengths[i] = new_len
        n_trunc += 1
        tok_trunc += n_i - new_len
    if keep is None:
        return flat, 0, 0
    offsets = np.zeros_like(flat.offsets)
    np.cumsum(new_lengths, out=offsets[1:])
    return FlatConversations(flat.input_ids[keep], flat.loss_mask[keep], offsets), n_trunc, tok_trunc


def pack(
    conversations: Sequence,
    max_tokens: int,
    *,
    strategy: str = "bfd",
    seed: int = 0,
    overlong: str = "drop",
    pad_to: int | None = None,
    seq_ids: str = "global",
) -> Packed:
    """Pack conversations into rows of at most ``max_tokens`` tokens for varlen training.

    ``conversations``: a sequence of ``(input_ids, loss_mask)`` pairs of 1-D integer arrays (numpy
    or torch), ``loss_mask[j] = 1`` where token ``j`` is a trained agent token; a third element,
    the length of a leading system turn, is used by ``overlong="truncate_turns"``. Conversations are
    never split; bins are planned with ``strategy`` (``"bfd"`` or ``"ffs"``, see :func:`plan_bins`)
    and shuffled with ``seed``.

    Row ``i`` (``packed[i]``, a dict of numpy arrays): ``input_ids``; ``position_ids`` restarting at
    0 for every conversation; ``labels[j] = input_ids[j+1]`` of the same conversation where
    ``loss_mask[j+1] == 1``, else -100; ``seq_ids`` (index of the conversation in the input, -1 on
    padding); ``cu_seqlens`` int32 over the row (padding is one final segment); ``max_seqlen`` (int).

    ``overlong``: ``"drop"`` skips conversations longer than ``max_tokens`` (counted in
    ``packed.stats``); ``"error"`` raises ``ValueError`` naming the first one; ``"truncate_turns"``
    drops the oldest whole exchanges (see :mod:`refit_fast.packing.turns`), keeping the system turn
    (when its length is given) and the final exchange, else drops the conversation. ``pad_to`` pads
    every row to that length (must be >= ``max_tokens``). ``seq_ids="local"`` numbers each row's
    conversations 0..k-1 instead (see :func:`materialize`).

    The rows are built when read (``packed[i]``, iteration, or :meth:`Packed.materialize_all`), so
    ``pack`` itself only checks, flattens and plans; ``packed.stats`` is complete at once. A
    :class:`FlatConversations` input is used without a copy.

    >>> convs = [(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 1])),
    ...          (np.array([5, 6]), np.array([0, 1])),
    ...          (np.array([7, 8, 9, 10, 11, 12]), np.array([0, 1, 1, 1, 1, 1]))]
    >>> packed = pack(convs, 6, seed=0)
    >>> len(packed), packed.stats.efficiency
    (2, 1.0)
    >>> row = next(r for r in packed if 1 in r["seq_ids"])
    >>> row["seq_ids"].tolist(), row["labels"].tolist(), row["cu_seqlens"].tolist()
    ([0, 0, 0, 0, 1, 1], [-100, 3, 4, -100, 6, -100], [0, 4, 6])
    """
    cap = check_max_tokens(max_tokens)
    check_strategy(strategy)
    check_overlong(overlong)
    _check_seq_ids(seq_ids)
    pad_to = check_pad_to(pad_to, cap)
    convs = None
    if not isinstance(conversations, FlatConversations):
        convs = conversations if isinstance(conversations, (list, tuple)) else list(conversations)
    flat = flatten(convs if convs is not None else conversations)
    total = int(flat.offsets[-1])
    counts = {}
    tok_trunc = 0
    if overlong == "error":
        lengths = flat.lengths
        i = _first(lengths > cap)
        if i >= 0:
            raise ValueError(f"conversation {i} has {lengths[i]} tokens, more than max_tokens={cap}")
    elif overlong == "truncate_turns":
        flat, n_trunc, tok_trunc = _truncate(flat, convs, cap)
        counts = {"truncated_conversations": n_trunc, "truncated_tokens": tok_trunc}
    lengths = flat.lengths
    plan = plan_bins(lengths, cap, strategy=strategy, seed=seed)
    kept_tokens = int(lengths[plan.items].sum())
    # Conversations in no bin were dropped by the planner (still over-long after any truncation);
    # their tokens count at their original length.
    counts["dropped_conversations"] = len(flat) - int(plan.items.shape[0])
    counts["dropped_tokens"] = total - tok_trunc - kept_tokens
    # Rows are built when accessed (see Packed): packing costs what planning costs.
    return Packed(flat, plan, _stats(flat, plan, pad_to, kept_tokens, counts), pad_to, seq_ids=seq_ids)


def to_torch(row: dict, device=None, *, non_blocking: bool = False, dtype=None) -> dict:
    """A row of :class:`Packed` as torch tensors on ``device`` (``max_seqlen`` stays a Python int,
    so varlen attention needs no device sync). On CPU the tensors share memory with the arrays.

    ``dtype`` (e.g. ``torch.int64``) converts ``input_ids``, ``labels``, ``position_ids`` and
    ``seq_ids`` after the move, so int32 rows cross the host-device link at half the bytes and
    arrive as int64; ``cu_seqlens`` stays int32.

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
