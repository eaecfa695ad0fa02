"""Training data: conversations -> training units -> per-epoch bin plans -> step batches -> rank rows.

A *unit* is what the packer never splits: one conversation (sft, filtered_sft, star_gate, refit, swift) or one
DPO pair (chosen and rejected conversation side by side in the same row, so the pair's loss is exact
inside one micro-batch). Each epoch plans the units into bins of at most ``max_tokens`` tokens
(``plan_bins``, seeded by ``seed + epoch``); optimizer step ``s`` of an epoch takes the consecutive
bins ``[s*R, (s+1)*R)`` with ``R = world_size * grad_accum`` (the last step of an epoch may have
fewer). Every rank computes the same plan, so step-level statistics (number of conversations, Swift's
reward mean and std, trained-token count) are known everywhere without communication; the rows are
then dealt to ranks by a greedy balance on token counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refit_fast.packing import BinPlan, FlatConversations, flatten, materialize, plan_bins

__all__ = [
    "StepBatch",
    "TrainData",
    "Schedule",
    "assign_rows",
    "best_per_group",
    "dpo_pairs",
    "filter_top",
    "group_index",
    "make_units",
]


@dataclass
class TrainData:
    """Conversations as the trainer uses them (index ``i`` everywhere is the conversation index).

    ``trained[i]`` is the number of trained tokens of conversation ``i`` *after* the packer's shift
    (``loss_mask[1:].sum()``); the trainer keeps only conversations with ``trained > 0``.
    ``groups[i]`` is the conversation's group (the context it was logged for): its ``group`` field
    when it has one, else its prompt key. Swift's group statistics, STaR-GATE and DPO use it.
    """

    flat: FlatConversations
    rewards: np.ndarray  # float64 [n]
    trained: np.ndarray  # int64 [n]
    prompt_keys: list[str]
    ids: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.flat)

    @classmethod
    def from_tokenized(cls, convs) -> "TrainData":
        """From ``TokenizedConversation``-like objects (``input_ids``, ``loss_mask``, ``reward``,
        ``prompt_key``, ``id``, optional ``group``); conversations with no trainable token are left out.

        Example:
            >>> from types import SimpleNamespace as C
            >>> d = TrainData.from_tokenized([C(id="a", input_ids=np.array([1, 2, 3]), loss_mask=np.array([0, 1, 1]),
            ...                                 reward=1.0, prompt_key="p"),
            ...                               C(id="b", input_ids=np.array([1, 2, 4]), loss_mask=np.array([0, 1, 1]),
            ...                                 reward=0.0, prompt_key="q", group="p")])
            >>> len(d), d.trained.tolist(), d.groups
            (2, [2, 2], ['p:p', 'g:p'])
        """
        keep = [c for c in convs if int(np.asarray(c.loss_mask)[1:].sum()) > 0]
        flat = flatten([(np.asarray(c.input_ids), np.asarray(c.loss_mask)) for c in keep])
        trained = np.array([int(np.asarray(c.loss_mask)[1:].sum()) for c in keep], np.int64)
        return cls(
            flat=flat,
            rewards=np.array([float(c.reward) for c in keep], np.float64),
            trained=trained,
            prompt_keys=[str(c.prompt_key) for c in keep],
            ids=[str(c.id) for c in keep],
            # prefixed, so that a group field never collides with another conversation's prompt key
            groups=[f"p:{c.prompt_key}" if getattr(c, "group", None) is None else f"g:{c.group}" for c in keep],
        )

    def content_keys(self) -> list[bytes]:
        """A digest of each conversation's tokens and mask (equal content, equal key)."""
        import hashlib

        out = []
        for i in range(len(self)):
            ids, mask = self.flat.conversation(i)
            out.append(hashlib.blake2b(ids.tobytes() + mask.tobytes(), digest_size=16).digest())
        return out

    def subset(self, index) -> "TrainData":
        index = np.asarray(index, np.int64)
        flat = flatten([self.flat.conversation(int(i)) for i in index])
        return TrainData(flat, self.rewards[index], self.trained[index], [self.prompt_keys[i] for i in index],
                         [self.ids[i] for i in index], [self.groups[i] for i in index])


def group_index(groups) -> np.ndarray:
    """``int64 [n]``: each conversation's group as 0..G-1, numbered by first appearance.

    Example:
        >>> group_index(["b", "a", "b", "c"]).tolist()
        [0, 1, 0, 2]
    """
    first: dict = {}
    return np.array([first.setdefault(g, len(first)) for g in groups], np.int64)


def best_per_group(rewards: np.ndarray, groups) -> np.ndarray:
    """Indices kept by STaR-GATE: the highest-reward conversation of each group, exactly one per group
    (ties broken by data order), in data order.

    Example:
        >>> best_per_group(np.array([0.2, 0.9, 0.9, 0.1, 0.5]), ["a", "a", "a", "b", "c"]).tolist()
        [1, 3, 4]
    """
    rewards = np.asarray(rewards, np.float64)
    g = group_index(groups)
    # stable sort by (group, -reward): the first entry of each group is its best, earliest one
    order = np.lexsort((-rewards, g))
    first = np.ones(len(order), bool)
    first[1:] = g[order][1:] != g[order][:-1]
    return np.sort(order[first])


def filter_top(rewards: np.ndarray, fraction: float, min_reward: float | None = None) -> np.ndarray:
    """Indices kept by filtered SFT (rejection sampling): the ``ceil(fraction * n)`` highest rewards
    (ties broken by data order, so exactly that many are kept), or every reward ``>= min_reward``.

    Example:
        >>> filter_top(np.array([0.1, 0.9, 0.5, 0.9]), 0.5).tolist()
        [1, 3]
        >>> filter_top(np.array([0.1, 0.9, 0.5]), 0.5, min_reward=0.5).tolist()
        [1, 2]
    """
    rewards = np.asarray(rewards, np.float64)
    if min_reward is not None:
        return np.flatnonzero(rewards >= min_reward)
    k = max(1, math.ceil(fraction * len(rewards) - 1e-9)) if len(rewards) else 0
    order = np.argsort(-rewards, kind="stable")[:k]
    return np.sort(order)


def dpo_pairs(rewards: np.ndarray, groups: list[str], mode: str = "disjoint", content_keys=None) -> np.ndarray:
    """``[P, 2]`` (chosen, rejected) conversation indices in the same group and with different rewards.

    ``groups``: one key per conversation (the trainer passes ``TrainData.groups``: the group field,
    else the prompt). ``disjoint``: per group, conversations by decreasing reward (stable); the best
    unused one is paired with the worst unused one that has a strictly lower reward, until none is
    left; each conversation is in at most one pair. ``all``: every (i, j) of a group with ``r_i > r_j``.
    With ``content_keys`` (e.g. a hash of the tokens), two conversations with the same content are
    never paired: identical texts with different rewards carry no preference, only a zero gradient.
    Pairs are ordered by first appearance of the group.

    Example:
        >>> dpo_pairs(np.array([1.0, 0.0, 0.5, 0.2]), ["a", "a", "b", "b"]).tolist()
        [[0, 1], [2, 3]]
        >>> dpo_pairs(np.array([1.0, 0.0, 0.5]), ["a", "a", "a"], "all").tolist()
        [[0, 2], [0, 1], [2, 1]]
        >>> dpo_pairs(np.array([1.0, 0.0, 0.5]), ["a", "a", "a"], content_keys=["x", "x", "y"]).tolist()
        [[0, 2]]
    """
    members_of: dict[str, list[int]] = {}
    for i, k in enumerate(groups):
        members_of.setdefault(k, []).append(i)
    same = (lambda a, b: content_keys[a] == content_keys[b]) if content_keys is not None else (lambda a, b: False)
    out = []
    for members in members_of.values():
        if len(members) < 2:
            continue
        order = [members[j] for j in np.argsort(-rewards[members], kind="stable")]
        if mode == "disjoint":
            used = [False] * len(order)
            for a in range(len(order)):
                if used[a]:
                    continue
                # the worst unused conversation below it, with different content
                b = next((b for b in range(len(order) - 1, a, -1) if not used[b]
                          and rewards[order[b]] < rewards[order[a]] and not same(order[a], order[b])), None)
                if b is None:
                    continue
                used[a] = used[b] = True
                out.append((order[a], order[b]))
        else:
            for a in range(len(order)):
                for b in range(a + 1, len(order)):
                    if rewards[order[a]] > rewards[order[b]] and not same(order[a], order[b]):
                        out.append((order[a], order[b]))
    return np.array(out, np.int64).reshape(-1, 2)


def make_units(data: TrainData, pairs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(unit_offsets [U+1], unit_items)``: unit ``u`` packs conversations
    ``unit_items[unit_offsets[u]:unit_offsets[u+1]]`` together (one each, or a DPO pair)."""
    if pairs is None:
        return np.arange(len(data) + 1, dtype=np.int64), np.arange(len(data), dtype=np.int64)
    return np.arange(0, 2 * len(pairs) + 1, 2, dtype=np.int64), pairs.reshape(-1).astype(np.int64)


@dataclass
class StepBatch:
    """The rows of one optimizer step (all ranks). ``rows[k]`` holds unit indices; ``items[k]``
    the conversation indices in row order; ``loads[k]`` its token count."""

    step: int
    epoch: int
    index_in_epoch: int
    rows: list[np.ndarray]
    items: list[np.ndarray]
    loads: np.ndarray

    @property
    def units(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)


@dataclass
class Schedule:
    """Which units every optimizer step uses: deterministic in (data, max_tokens, strategy, seed), so a
    resumed run recomputes the same plan and only needs the step number.

    Example:
        >>> from types import SimpleNamespace as C
        >>> convs = [C(id=str(i), input_ids=np.arange(1, 6), loss_mask=np.array([0, 0, 1, 1, 1]),
        ...            reward=float(i), prompt_key="p") for i in range(6)]
        >>> data = TrainData.from_tokenized(convs)
        >>> s = Schedule(data, *make_units(data), max_tokens=10, rows_per_step=2, seed=0, epochs=1.0)
        >>> s.total_steps, [len(s.step_batch(k).rows) for k in range(s.total_steps)]
        (2, [2, 1])
    """

    data: TrainData
    unit_offsets: np.ndarray
    unit_items: np.ndarray
    max_tokens: int
    rows_per_step: int
    seed: int = 0
    strategy: str = "bfd"
    steps: int | None = None
    epochs: float = 1.0
    _plans: dict = field(default_factory=dict, repr=False)
    _epoch_steps: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        conv_len = self.data.flat.lengths
        per_item = conv_len[self.unit_items]
        n_units = len(self.unit_offsets) - 1
        self.unit_lengths = (np.add.reduceat(per_item, self.unit_offsets[:-1]) if n_units
                             else np.zeros(0, np.int64))
        self.kept_units = np.flatnonzero(self.unit_lengths <= self.max_tokens)
        self.dropped_units = n_units - len(self.kept_units)
        if len(self.kept_units) == 0:
            raise ValueError(
                f"no training unit fits in batch.max_tokens={self.max_tokens} "
                f"({n_units} units, shortest {int(self.unit_lengths.min()) if n_units else 0} tokens)"
            )
        if self.steps is not None:
            self.total_steps = int(self.steps)
        else:
            full, frac = int(self.epochs), self.epochs - int(self.epochs)
            total = sum(self.steps_in_epoch(e) for e in range(full))
            if frac > 1e-12:
                total += max(1, math.ceil(frac * self.steps_in_epoch(full) - 1e-9))
            self.total_steps = total

    def plan(self, epoch: int) -> BinPlan:
        """The epoch's bins of *unit* indices (cached; only the latest epochs are kept)."""
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            p = plan_bins(self.unit_lengths, self.max_tokens, strategy=self.strategy, seed=self.seed + epoch)
            self._plans[epoch] = p
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        if epoch not in self._epoch_steps:  # cached apart from the plans: locate() asks for every epoch
            self._epoch_steps[epoch] = math.ceil(len(self.plan(epoch)) / self.rows_per_step)
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, index in epoch)`` of a global step (0-based)."""
        epoch = 0
        while True:
            n = self.steps_in_epoch(epoch)
            if step < n:
                return epoch, step
            step -= n
            epoch += 1

    def step_batch(self, step: int) -> StepBatch:
        epoch, k = self.locate(step)
        plan = self.plan(epoch)
        lo = k * self.rows_per_step
        hi = min(lo + self.rows_per_step, len(plan))
        rows = [plan[b] for b in range(lo, hi)]
        items = [np.concatenate([self.unit_items[self.unit_offsets[u]:self.unit_offsets[u + 1]] for u in r])
                 for r in rows]
        loads = np.array([int(self.unit_lengths[r].sum()) for r in rows], np.int64)
        return StepBatch(step, epoch, k, rows, items, loads)


def assign_rows(loads, world_size: int) -> list[list[int]]:
    """Deal rows to ranks: whole rows, at most ``ceil(R / world)`` per rank, similar token counts.

    Greedy and deterministic: rows by decreasing load (ties by index), each to the rank with the
    fewest tokens among those with room (ties to the lowest rank); each rank's rows keep their
    original order.

    Example:
        >>> assign_rows([10, 3, 8, 4], 2)
        [[0, 1], [2, 3]]
    """
    loads = np.asarray(loads, np.int64)
    cap = math.ceil(len(loads) / world_size) if len(loads) else 0
    tokens = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for k in np.argsort(-loads, kind="stable").tolist():
        r = min((r for r in range(world_size) if len(out[r]) < cap), key=lambda r: (tokens[r], r))
        out[r].append(k)
        tokens[r] += int(loads[k])
    return [sorted(o) for o in out]


def materialize_rows(data: TrainData, items: list[np.ndarray], max_tokens: int):
    """Pack the given rows (conversation indices in row order) with the C++ packer.

    Returns the ``Packed`` rows; row ``k``'s ``cu_seqlens`` segment ``j`` is conversation ``items[k][j]``.
    """
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(x) for x in items], out=offsets[1:])
    flat_items = np.concatenate(items) if items else np.zeros(0, np.int64)
    plan = BinPlan(offsets, flat_items.astype(np.int64), int(max_tokens), "given", 0)
    return materialize(data.flat, plan)
