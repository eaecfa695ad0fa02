"""Training data: conversations -> training units -> per-epoch bin plans -> step batches -> rank rows.

A *unit* is what the packer never splits: one conversation (sft, filtered_sft, star_gate, refit, swift) or one
DPO pair (chosen and rejected conversation side by side in the same row, so the pair's loss is exact
inside one micro-batch). Each epoch plans the units into bins of at most ``max_tokens`` tokens
(``plan_bins``, seeded by ``seed + epoch``); optimizer step ``s`` of an epoch takes the consecutive
bins ``[s*R, (s+1)*R)`` with ``R = world_size * grad_accum`` (the last step of an epoch may have
fewer). Every rank computes the same plan, so step-level statistics (number of conversations, Swift's
reward mean and std, trained-token count) are known everywhere without communication; the rows are
then dealt to ranks by a greedy balance on token counts.

:class:`Batches` is what the training loop reads: one call per step returns this rank's finished
micro-batches (:class:`MicroBatch`: the packer's rows with local ``seq_ids``, built by
``materialize(rows=..., out=...)`` into buffers reused all epoch, with the rows' weights and DPO
reference log-probs) and the step's :class:`StepStats`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

import torch

from refit_fast.packing import (BinPlan, FlatConversations, flatten, materialize, plan_bins, row_buffers, to_torch,
                                truncate_overlong)

__all__ = [
    "Batches",
    "MicroBatch",
    "Step",
    "StepBatch",
    "StepStats",
    "TrainData",
    "Schedule",
    "assign_rows",
    "best_per_group",
    "dpo_pairs",
    "filter_top",
    "group_index",
    "make_units",
    "refuse_overlong",
    "step_stats",
]


@dataclass
class TrainData:
    """Conversations as the trainer uses them (index ``i`` everywhere is the conversation index).

    ``trained[i]`` is the number of trained tokens of conversation ``i`` *after* the packer's shift
    (:meth:`FlatConversations.trained_tokens`); the trainer keeps only conversations with ``trained > 0``.
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
        convs = [c for c in convs if len(c.input_ids) > 0]
        flat = flatten([(np.asarray(c.input_ids), np.asarray(c.loss_mask)) for c in convs])
        data = cls(
            flat=flat,
            rewards=np.array([float(c.reward) for c in convs], np.float64),
            trained=flat.trained_tokens(),
            prompt_keys=[str(c.prompt_key) for c in convs],
            ids=[str(c.id) for c in convs],
            # prefixed, so that a group field never collides with another conversation's prompt key
            groups=[f"p:{c.prompt_key}" if getattr(c, "group", None) is None else f"g:{c.group}" for c in convs],
        )
        return data if data.trained.all() else data.subset(np.flatnonzero(data.trained > 0))

    def truncated(self, max_tokens: int) -> tuple["TrainData", int, int]:
        """``data.overlong=truncate_turns``: the same conversations, each longer than ``max_tokens``
        cut by whole exchanges until it fits (the packer's :func:`refit_fast.packing.truncate_overlong`;
        one that cannot fit stays whole and is dropped by the planner), with their trained-token counts
        recounted; also how many conversations and tokens were cut.

        Example:
            >>> from types import SimpleNamespace as C
            >>> d = TrainData.from_tokenized([C(id="a", input_ids=np.arange(1, 7), loss_mask=np.array([0, 1, 0, 1, 0, 1]),
            ...                                 reward=1.0, prompt_key="p")])
            >>> cut, n, tokens = d.truncated(4)
            >>> cut.flat.lengths.tolist(), cut.trained.tolist(), n, tokens
            ([4], [2], 1, 2)
        """
        flat, n, tokens = truncate_overlong(self.flat, max_tokens)
        return dataclasses.replace(self, flat=flat, trained=flat.trained_tokens()), n, tokens

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


def refuse_overlong(data: TrainData, unit_offsets, unit_items, max_tokens: int) -> None:
    """``data.overlong=error``: a ValueError naming how many units (conversations, or DPO pairs) are
    longer than ``max_tokens`` and the first few, by id and length.

    Example:
        >>> from types import SimpleNamespace as C
        >>> data = TrainData.from_tokenized([C(id="a", input_ids=np.arange(9), loss_mask=np.ones(9, int), reward=0.0,
        ...                                    prompt_key="p")])
        >>> refuse_overlong(data, *make_units(data), 8)
        Traceback (most recent call last):
        ValueError: 1 training units are longer than batch.max_tokens=8 (data.overlong=error): a (9 tokens)
    """
    lengths = data.flat.lengths[unit_items]
    unit_lengths = np.add.reduceat(lengths, unit_offsets[:-1]) if len(unit_offsets) > 1 else lengths[:0]
    too_long = np.flatnonzero(unit_lengths > max_tokens)
    if not len(too_long):
        return
    shown = []
    for u in too_long[:3]:
        ids = [data.ids[i] for i in unit_items[unit_offsets[u]:unit_offsets[u + 1]]]
        shown.append(f"{' + '.join(ids)} ({int(unit_lengths[u])} tokens)")
    more = f", and {len(too_long) - 3} more" if len(too_long) > 3 else ""
    raise ValueError(f"{len(too_long)} training units are longer than batch.max_tokens={max_tokens} "
                     f"(data.overlong=error): {', '.join(shown)}{more}")


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
        # Units longer than max_tokens are in no bin: the planner leaves them out.
        self.dropped_units = n_units - len(self.plan(0).items)
        if self.dropped_units == n_units:
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


@dataclass(frozen=True)
class StepStats:
    """What every micro-batch of a step needs to know about the whole step (all ranks)."""

    n_units: int  # conversations (or DPO pairs) in the step
    n_tokens: int  # trained tokens in the step
    denominator: float  # n_units, or n_tokens with normalize=token
    reward_mean: float
    reward_std: float  # population std over the step's conversations
    reward_min: float
    reward_max: float


def step_stats(rewards: np.ndarray, trained: np.ndarray, n_units: int, normalize: str = "sequence") -> StepStats:
    """Statistics of one step batch from its conversations' rewards and trained-token counts.

    Computed in float64 from data alone, identically on every rank (each rank holds the step plan),
    which equals all-reducing count, sum and squared deviations but needs no communication.

    Example:
        >>> s = step_stats(np.array([1.0, 0.0, 0.5]), np.array([4, 2, 3]), 3)
        >>> s.denominator, s.reward_mean, round(s.reward_std, 4)
        (3.0, 0.5, 0.4082)
    """
    r = np.asarray(rewards, np.float64)
    n_tokens = int(np.asarray(trained).sum())
    mean = float(r.mean()) if len(r) else 0.0
    std = float(np.sqrt(((r - mean) ** 2).mean())) if len(r) else 0.0
    denom = float(max(n_tokens if normalize == "token" else n_units, 1))
    return StepStats(n_units, n_tokens, denom, mean, std,
                     float(r.min()) if len(r) else 0.0, float(r.max()) if len(r) else 0.0)



@dataclass
class MicroBatch:
    """One packed row of one rank, ready for the loss.

    ``row``: torch tensors ``input_ids``, ``labels``, ``position_ids``, ``seq_ids`` (int64; *local*
    conversation ids 0..k-1 in row order, -1 on padding), ``cu_seqlens`` (int32) and ``max_seqlen``
    (an int). ``weights`` [k] float32: what the loss weights each conversation by (the rewards for
    refit, Swift's standardized rewards for swift; None for sft, filtered_sft, star_gate and dpo), and
    ``weights64`` the same in float64 (for the logged loss parts). ``ref_logps`` [k] float32: log
    pi_ref of each conversation (dpo; the row holds pairs as consecutive chosen, rejected).
    """

    row: dict
    weights: torch.Tensor | None = None
    weights64: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return MicroBatch({k: move(v) for k, v in self.row.items()}, move(self.weights), move(self.weights64),
                          move(self.ref_logps))


@dataclass
class Step:
    """What one rank trains on in one optimizer step: ``micro`` holds its micro-batches, the same
    number on every rank (``None``: this rank has no row left in this micro-step, the last step of an
    epoch can have fewer rows than ranks x grad_accum). ``stats`` describe the whole step (all ranks);
    ``conversations`` are the step's conversation indices and ``weights`` their weights (float64,
    None when unweighted), ``rows`` and ``tokens`` its row and token counts, all ranks together."""

    step: int
    epoch: int
    index_in_epoch: int
    stats: StepStats
    micro: list
    rows: int
    tokens: int
    conversations: np.ndarray
    weights: np.ndarray | None


@dataclass
class _EpochLayout:
    """An epoch's bins reordered so that each rank's rows of a step are consecutive: rank r's rows of
    step k are bins ``starts[k][r]:starts[k][r+1]`` of ``units`` (unit indices) and ``convs`` (the same
    bins over conversations), which the packer fills with one call into ``buffers``."""

    units: BinPlan
    convs: BinPlan
    starts: list
    buffers: dict


class Batches:
    """The trainer's data path: :meth:`step` returns, for an optimizer step and this rank, the finished
    micro-batches (row tensors from the C++ packer, their conversations' weights and DPO reference
    log-probs) and the step's statistics.

    The rows of a step are those of :meth:`Schedule.step_batch`, dealt to ranks by :func:`assign_rows`;
    each epoch's plan is reordered once so that every rank's rows of a step are consecutive bins, and
    the packer materializes them (``materialize(rows=slice, out=reused buffers, seq_ids="local")``)
    in one call per step. ``weighting(conversations, stats)`` returns the float64 weights of the given
    conversations for the step (None: unweighted); ``pad_to`` and ``row_dtype`` are the packer's. The
    row tensors are views of buffers that the next step overwrites: use them within the step.

    Example:
        >>> from types import SimpleNamespace as C
        >>> convs = [C(id=str(i), input_ids=np.arange(1, 6), loss_mask=np.array([0, 0, 1, 1, 1]),
        ...            reward=float(i), prompt_key="p") for i in range(6)]
        >>> data = TrainData.from_tokenized(convs)
        >>> schedule = Schedule(data, *make_units(data), max_tokens=10, rows_per_step=2, seed=0, epochs=1.0)
        >>> step = Batches(schedule, weighting=lambda conv, stats: data.rewards[conv]).step(0)
        >>> len(step.micro), step.micro[0].row["seq_ids"].tolist(), step.stats.n_units
        (2, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 4)
    """

    def __init__(self, schedule: Schedule, *, world_size: int = 1, rank: int = 0, normalize: str = "sequence",
                 weighting=None, pad_to: int | None = None, row_dtype=np.int64):
        self.schedule, self.data = schedule, schedule.data
        self.world_size, self.rank, self.normalize = world_size, rank, normalize
        self.weighting, self.pad_to, self.row_dtype = weighting, pad_to, np.dtype(row_dtype)
        self.reference: np.ndarray | None = None  # [P, 2] log pi_ref per DPO pair (unit), once computed
        self._layouts: dict = {}

    def _layout(self, epoch: int) -> _EpochLayout:
        if epoch not in self._layouts:
            if len(self._layouts) > 1:
                self._layouts.pop(min(self._layouts))
            s = self.schedule
            plan = s.plan(epoch)
            loads = plan.loads(s.unit_lengths)
            order, starts = [], []
            for lo in range(0, len(plan), s.rows_per_step):
                hi = min(lo + s.rows_per_step, len(plan))
                bounds = [len(order)]
                for rows in assign_rows(loads[lo:hi], self.world_size):
                    order += [lo + k for k in rows]
                    bounds.append(len(order))
                starts.append(bounds)
            units = plan.take(np.asarray(order, np.int64))
            convs = units.expand(s.unit_offsets, s.unit_items)
            per_rank = math.ceil(s.rows_per_step / self.world_size)
            buffers = row_buffers(convs, self.data.flat.lengths, pad_to=self.pad_to, rows=per_rank, dtype=self.row_dtype)
            self._layouts[epoch] = _EpochLayout(units, convs, starts, buffers)
        return self._layouts[epoch]

    def _rows(self, convs: BinPlan, bins: slice, out: dict | None):
        """Packed rows of ``convs``'s bins, local seq_ids, as torch tensors (ids int64)."""
        packed = materialize(self.data.flat, convs, rows=bins, out=out, seq_ids="local", pad_to=self.pad_to,
                             dtype=self.row_dtype)
        as_int64 = torch.int64 if self.row_dtype != np.int64 else None  # int32 rows widen after the move
        return [to_torch(packed[j], dtype=as_int64) for j in range(len(packed))]

    def step(self, step: int) -> Step:
        """This rank's micro-batches of optimizer step ``step`` (0-based) and the step's statistics."""
        sb = self.schedule.step_batch(step)
        lay = self._layout(sb.epoch)
        # The step's conversations in plan order, for statistics that do not depend on the ranks.
        conv = np.concatenate(sb.items) if sb.items else np.zeros(0, np.int64)
        stats = step_stats(self.data.rewards[conv], self.data.trained[conv], len(sb.units), self.normalize)
        weights = self.weighting(conv, stats) if self.weighting is not None else None
        k = sb.index_in_epoch
        a, b = lay.starts[k][self.rank], lay.starts[k][self.rank + 1]
        rows = self._rows(lay.convs, slice(a, b), lay.buffers)
        mine = lay.convs.items[lay.convs.offsets[a]:lay.convs.offsets[b]]
        w = self.weighting(mine, stats) if self.weighting is not None else None
        micro, pos = [], 0
        for j, row in enumerate(rows):
            n = len(lay.convs[a + j])
            mb = MicroBatch(row)
            if w is not None:
                mb.weights64 = torch.from_numpy(np.ascontiguousarray(w[pos:pos + n], np.float64))
                mb.weights = mb.weights64.float()
            if self.reference is not None:
                mb.ref_logps = torch.from_numpy(self.reference[lay.units[a + j]].reshape(-1)).float()
            micro.append(mb)
            pos += n
        n_micro = math.ceil(len(sb.rows) / self.world_size)  # the same on every rank
        micro += [None] * (n_micro - len(micro))
        return Step(step, sb.epoch, k, stats, micro, len(sb.rows), int(sb.loads.sum()), conv, weights)

    def reference_rows(self, block: int = 64):
        """This rank's share of epoch 0's rows (every ``world_size``-th bin), as ``(units, row)``: the
        DPO pairs a row holds and its tensors, packed exactly as training packs them (the bins'
        contents do not change between epochs, only their order)."""
        plan = self.schedule.plan(0)
        mine = np.arange(self.rank, len(plan), self.world_size, dtype=np.int64)
        s = self.schedule
        for lo in range(0, len(mine), block):
            units = plan.take(mine[lo:lo + block])
            rows = self._rows(units.expand(s.unit_offsets, s.unit_items), slice(None), None)
            for j, row in enumerate(rows):
                yield units[j], row
