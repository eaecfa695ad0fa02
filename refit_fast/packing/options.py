"""The packer's options and their validators: one home for the rules.

:func:`pack`, :func:`plan_bins`, :func:`materialize` and :func:`row_buffers` check their arguments
with these, and the trainer's config calls the same functions, so a bad value fails the same way
(``ValueError`` naming the argument) wherever it is given.
"""
from __future__ import annotations

import operator

__all__ = ["check_max_tokens", "check_overlong", "check_pad_to", "check_strategy"]

STRATEGIES = {"bfd": 0, "ffs": 1}
OVERLONG = ("drop", "error", "truncate_turns")
SEQ_IDS = ("global", "local")
MAX_TOKENS_LIMIT = 1 << 24  # same bound as kMaxTokensLimit in csrc/packing.h


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
