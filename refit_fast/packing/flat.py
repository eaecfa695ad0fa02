"""Step 1 of packing: flatten (C++: csrc/flatten.cpp).

:class:`FlatConversations` holds every conversation in one token buffer plus offsets, the layout
planning and row building read. :func:`flatten` validates per-conversation arrays and copies them
into one (one C++ pass with the GIL released; a numpy fallback when the extension is not built);
:meth:`FlatConversations.from_buffers` and :meth:`FlatConversations.from_arrow` wrap buffers that
already have this layout, such as a Hugging Face dataset's Arrow columns, without copying the tokens.
This module also loads the extension (:func:`_ext`) for the other steps.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FlatConversations", "flatten"]

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


_ID_DTYPES = (np.int64, np.int32)  # the widths csrc/materialize.cpp reads ids in


def _id_dtype(dtype: np.dtype, top: int | None = None) -> np.dtype:
    """Width that ids of integer ``dtype`` are kept in by :meth:`FlatConversations.from_buffers`:
    int32 and int64 as they are; any other dtype int32 when its values always fit (8- and 16-bit)
    or, given ``top`` (the largest id, for uint32/uint64), when they do; else int64."""
    native = dtype.newbyteorder("=")
    if native in _ID_DTYPES:
        return native
    if native.itemsize <= 2 or (top is not None and top <= np.iinfo(np.int32).max):
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _fits_int32(dtype: np.dtype) -> bool:
    """Whether every value of integer ``dtype`` fits in int32: what :func:`flatten` decides by."""
    return dtype.itemsize <= (4 if dtype.kind == "i" else 2)


@dataclass(frozen=True)
class FlatConversations:
    """All conversations in one buffer: conversation ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``.

    ``input_ids`` is int64 or int32 (as the data set stores them: Hugging Face ``datasets`` keeps
    ``list<int32>``, and planning and row building read either width, so neither is widened),
    ``loss_mask`` uint8 (0/1), ``offsets`` int64 ``[n + 1]``. Build it with :func:`flatten`, which
    validates, or by hand from buffers you already have (e.g. an Arrow list column's values and
    offsets: no copy). A hand-built one is checked as rows are built: the
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
        for name, want in (("input_ids", _ID_DTYPES), ("loss_mask", (np.uint8,)), ("offsets", (np.int64,))):
            a = getattr(self, name)
            if not (isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype in want and a.dtype.isnative
                    and a.flags.c_contiguous):
                got = f"{a.dtype}{'' if a.dtype.isnative else ' (swapped bytes)'} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                kind = " or ".join(np.dtype(w).name for w in want)
                raise ValueError(f"FlatConversations.{name} must be a contiguous 1-D {kind} array, "
                                 f"got {got}; FlatConversations.from_buffers converts and checks")
        if self.loss_mask.shape != self.input_ids.shape or self.offsets.shape[0] < 1:
            raise ValueError("FlatConversations: loss_mask must match input_ids and offsets needs n + 1 >= 1 "
                             "entries; FlatConversations.from_buffers converts and checks")

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def trained_tokens(self) -> np.ndarray:
        """int64 ``[n]``: how many labels each conversation's rows get, i.e. its tokens with
        ``loss_mask == 1`` except the first token (nothing precedes it, so it is never a target: the
        packer's labels are ``input_ids[j+1]`` where ``loss_mask[j+1] == 1``). The one home of that rule.

        >>> flatten([([5, 6, 7], [1, 1, 0]), ([8, 9], [0, 1])]).trained_tokens().tolist()
        [1, 1]
        """
        if len(self) == 0:
            return np.zeros(0, np.int64)
        starts = self.offsets[:-1]
        mask = self.loss_mask.astype(bool)
        return np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts]

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

        The token values are not copied when they are int32 (the ``datasets`` default) or int64
        and in one chunk (several chunks are combined first); other integer types are converted as
        :meth:`from_buffers` says. The mask column must have the same row lengths. Null rows or tokens raise
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

        No copy of the tokens when ``input_ids`` is int32 or int64 (kept as it is) and ``loss_mask``
        bool/int8/uint8. Other id dtypes are converted to int32 when every value fits (always for
        8- and 16-bit ones; uint32/uint64 when the largest id is below 2**31), else to int64. ``offsets`` (any integer dtype, ``[n + 1]``) must never decrease and
        stay within the buffers; offsets that start after 0, as a sliced Arrow array has, are
        rebased. ``loss_mask`` must share ``offsets`` with ``input_ids``. Raises ``ValueError``
        naming the first empty conversation; with ``check_values`` (one vectorized pass) also the
        first negative id or mask value other than 0/1. Without it, ids are checked as rows are
        built.

        For Arrow list columns (a Hugging Face dataset's), :meth:`from_arrow` does the unpacking.

        >>> from refit_fast.packing import pack
        >>> flat = FlatConversations.from_buffers(np.array([5, 6, 7, 8]), np.array([0, 1, 1, 0], bool),
        ...                                       np.array([0, 3, 4], np.int32))
        >>> flat.lengths.tolist(), flat.input_ids.dtype.name, flat.loss_mask.dtype.name, len(pack(flat, 4))
        ([3, 1], 'int64', 'uint8', 1)
        >>> ids = np.array([5, 6, 7, 8], np.int32)  # e.g. a datasets list<int32> column's values
        >>> flat = FlatConversations.from_buffers(ids, np.array([0, 1, 1, 0], np.uint8), [0, 3, 4])
        >>> flat.input_ids.dtype.name, np.shares_memory(flat.input_ids, ids)
        ('int32', True)
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
        # Unsigned 32/64-bit ids: the largest one decides between int32 and int64 (or does not fit).
        top = int(ids.max()) if ids.dtype.kind == "u" and ids.itemsize >= 4 and ids.size else None
        if top is not None and top > np.iinfo(np.int64).max:
            pos = _first(ids > np.iinfo(np.int64).max)
            raise ValueError(f"conversation {_conversation_at(offs, pos)}: input_ids do not fit in int64")
        ids = np.ascontiguousarray(ids, dtype=_id_dtype(ids.dtype, top))
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

    The flat ids are int32 when every conversation's ids have a dtype whose values all fit in it
    (int8, int16, int32, uint8, uint16: half the memory, and no widening of an int32 data set);
    otherwise, and for no conversations, int64. Rows come out in the ``dtype`` that
    :func:`~refit_fast.packing.materialize` is given either way.

    >>> flat = flatten([([1, 2], [0, 1]), ([3, 4, 5], [True, False, True])])
    >>> flat.input_ids, flat.loss_mask
    (array([1, 2, 3, 4, 5]), array([0, 1, 1, 0, 1], dtype=uint8))
    >>> flatten([(np.array([1, 2], np.int32), [0, 1]), (np.array([3], np.uint16), [1])]).input_ids.dtype
    dtype('int32')
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
    id_dtype = np.int32 if all(_fits_int32(dt) for dt in ids_dtypes) else np.int64  # as the C++ path
    ids = np.concatenate(ids_col, dtype=id_dtype, casting="unsafe")  # dtypes checked above
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
