"""All steps together: :func:`pack` flattens, handles over-long conversations and plans, and
returns :class:`~refit_fast.packing.rows.Packed` rows that are built when read (packing costs what
planning costs, and holds no copy of the tokens beyond the flat input).

Over-long conversations (longer than ``max_tokens``) are dropped, raise, or are truncated by whole
exchanges (:mod:`refit_fast.packing.turns`), as ``overlong`` says.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from refit_fast.packing.flat import FlatConversations, _first, flatten
from refit_fast.packing.options import (
    _check_seq_ids,
    check_max_tokens,
    check_overlong,
    check_pad_to,
    check_strategy,
)
from refit_fast.packing.plan import plan_bins
from refit_fast.packing.rows import Packed, _stats
from refit_fast.packing.turns import truncate_turns

__all__ = ["pack", "truncate_overlong"]


def truncate_overlong(flat: FlatConversations, max_tokens: int, system_lens=None):
    """``overlong="truncate_turns"`` on flat conversations: every conversation longer than
    ``max_tokens`` loses its oldest whole exchanges until it fits (:func:`truncate_turns`; the final
    exchange and, where ``system_lens[i]`` says how long conversation i's system turn is, the system
    turn are kept). One that cannot fit stays whole (the planner then leaves it out). Returns
    ``(flat, truncated_conversations, truncated_tokens)``; ``flat`` is the input itself when nothing
    was cut, and conversation ``i`` is still conversation ``i``. A Python loop over the over-long
    conversations only (they are rare).

    >>> flat = flatten([([1, 2, 3, 4, 5, 6], [0, 1, 0, 1, 0, 1]), ([7, 8], [0, 1])])
    >>> cut, n, tokens = truncate_overlong(flat, 4)
    >>> cut.conversation(0)[0].tolist(), cut.lengths.tolist(), n, tokens
    ([3, 4, 5, 6], [4, 2], 1, 2)
    """
    cap = check_max_tokens(max_tokens)
    return _truncate(flat, (lambda i: int(system_lens[i])) if system_lens is not None else (lambda i: 0), cap)


def _truncate(flat: FlatConversations, system_len_of, cap: int):
    """Apply exchange truncation to every over-long conversation; ``system_len_of(i)`` is the length of
    conversation i's system turn."""
    lengths = flat.lengths
    over = np.flatnonzero(lengths > cap)
    keep = None
    new_lengths = lengths.copy()
    n_trunc = tok_trunc = 0
    for i in over.tolist():
        system_len = system_len_of(i)
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
        # the system turn's length, when a conversation gives one as its third element
        system_len_of = (lambda i: int(convs[i][2]) if len(convs[i]) > 2 else 0) if convs is not None else (lambda i: 0)
        flat, n_trunc, tok_trunc = _truncate(flat, system_len_of, cap)
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
