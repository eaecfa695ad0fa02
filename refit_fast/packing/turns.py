"""Exchange-level truncation of over-long conversations (``overlong="truncate_turns"``).

The loss mask alone says which tokens are trained (agent) and which are not (system, user, tool), so
exchanges are defined on it:

* an **exchange** is a maximal run of mask-0 tokens (the context turns: user, tool, ...) followed by
  the maximal run of mask-1 tokens (the agent reply) after it. If the conversation opens with an
  agent turn, its first exchange has an empty context part. Untrained tokens after the last agent
  turn belong to the final exchange (they are not an exchange of their own).
* a **leading system turn** cannot be told apart from the first user turn by the mask, so it is only
  protected when the caller says how long it is: pass a conversation as
  ``(input_ids, loss_mask, system_len)``; the first ``system_len`` tokens are then always kept and the
  exchanges start after them. Without it (``system_len = 0``) the oldest exchange, system prompt
  included, is the first to go.

Truncation drops whole exchanges, oldest first, until ``system_len + remaining <= max_tokens``; the
final exchange is never dropped. If even ``system + final exchange`` is too long, the conversation is
dropped.
"""
from __future__ import annotations

import numpy as np

__all__ = ["exchange_starts", "truncate_turns"]


def exchange_starts(loss_mask, system_len: int = 0) -> np.ndarray:
    """Start offsets of the exchanges of one conversation (the first is always ``system_len``).

    >>> exchange_starts(np.array([0, 0, 1, 1, 0, 1, 0, 0, 1]))
    array([0, 4, 6])
    >>> exchange_starts(np.array([0, 0, 1, 1, 0, 1, 0, 0]))  # trailing user turn: same exchange
    array([0, 4])
    >>> exchange_starts(np.array([0, 0, 0, 1, 0, 1]), system_len=2)
    array([2, 4])
    """
    m = np.asarray(loss_mask).astype(bool, copy=False)
    n = m.shape[0]
    if not 0 <= system_len <= n:
        raise ValueError(f"system_len={system_len} is outside the conversation (length {n})")
    body = m[system_len:]
    # A new exchange begins where untrained tokens follow trained ones ...
    cuts = np.flatnonzero(~body[1:] & body[:-1]) + 1
    # ... but only if an agent turn follows, so a trailing user turn stays with the last reply.
    if cuts.size and not body[cuts[-1]:].any():
        cuts = cuts[:-1]
    return np.concatenate(([0], cuts)).astype(np.int64) + system_len


def truncate_turns(loss_mask, max_tokens: int, system_len: int = 0):
    """Token ranges to keep so that the conversation fits ``max_tokens``, or ``None`` if it cannot.

    Returns a list of ``(start, stop)`` ranges (the system turn, then the kept exchanges), which
    concatenated give the truncated conversation. A conversation that already fits is returned
    whole.

    >>> mask = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1])   # exchanges at 0, 4, 7
    >>> truncate_turns(mask, 5)                        # drop the oldest exchange
    [(4, 9)]
    >>> truncate_turns(mask, 4)                        # drop the two oldest exchanges
    [(7, 9)]
    >>> truncate_turns(mask, 5, system_len=1)          # keep token 0 as the system turn
    [(0, 1), (7, 9)]
    >>> truncate_turns(mask, 1) is None                # the final exchange alone is too long
    True
    """
    m = np.asarray(loss_mask)
    n = m.shape[0]
    if n <= max_tokens:
        return [(0, n)]
    starts = exchange_starts(m, system_len)
    # Keeping exchanges from starts[d] onward costs system_len + (n - starts[d]) tokens; take the
    # smallest d (the most history) that fits. starts is increasing, so the kept size decreases.
    kept = system_len + (n - starts)
    fits = np.flatnonzero(kept <= max_tokens)
    if fits.size == 0:
        return None
    d = int(fits[0])
    ranges = [(0, system_len)] if system_len > 0 else []
    ranges.append((int(starts[d]), n))
    return ranges
