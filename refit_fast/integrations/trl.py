"""Refit and Swift inside TRL: :class:`RefitTrainer` is TRL's ``SFTTrainer`` whose loss weights each
conversation's log-likelihood by its reward (Refit) or by its reward standardized within its group
(Swift, the paper's m conversations logged per prompt), on TRL's own datasets, tokenization and packing.

    from refit_fast.integrations.trl import RefitConfig, RefitTrainer
    args = RefitConfig(output_dir="runs/swift-trl", algorithm="swift", packing=True, max_length=2048)
    trainer = RefitTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()     # ds: a "messages" (or "prompt" + "completion") column and a "reward" column

What changes from ``SFTTrainer``:

- each row's weight is computed before tokenizing: its reward (``algorithm="refit"``) or, for Swift
  with ``swift_stats="group"`` (the default, the paper's), ``(r - mean_g) / (std_g + swift_eps)`` over
  the rows of its group in the whole data set (``refit_fast.ops.standardize_rewards``; the group is
  ``group_column`` when the data set has it, else the prompt: the messages before the first assistant
  turn); ``swift_stats="batch"`` standardizes within each micro-batch instead;
- the weight travels with the tokens as a ``refit_weight`` list column, through TRL's ``pack_dataset``
  and collator, so packed rows keep one weight per conversation;
- the loss is ``weighted_ce`` on the decoder's hidden states (no logits): ``sum_i w_i sum_t nll_t / n``,
  with ``n`` the step's target tokens (``num_items_in_batch``: the token mean, as ``SFTTrainer``). With
  all weights 1 it is ``SFTTrainer``'s loss. The model is patched in place
  (:func:`refit_fast.integrations.hf.patch_causal_lm`) and its attention set to refit_fast's packed
  varlen attention, so padding-free packed rows stay separate on every device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

try:
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset
except ImportError as e:  # the extra is missing: say how to get it
    raise ImportError("refit_fast.integrations.trl needs TRL: pip install 'refit-fast[trl]'") from e

from refit_fast.integrations.hf import patch_causal_lm

__all__ = ["RefitConfig", "RefitTrainer", "row_weights"]

WEIGHT_COLUMN = "refit_weight"
ALGORITHMS = ("refit", "swift")
SWIFT_STATS = ("group", "batch")


@dataclass
class RefitConfig(SFTConfig):
    """``SFTConfig`` plus what Refit and Swift need (see :mod:`refit_fast.integrations.trl`).

    Example:
        >>> RefitConfig(output_dir="/tmp/refit-trl", algorithm="swift", report_to=[], use_cpu=True).swift_stats
        'group'
    """

    algorithm: str = field(default="refit", metadata={"help": "refit | swift"})
    reward_column: str = field(default="reward", metadata={"help": "the column holding each row's reward"})
    swift_stats: str = field(default="group", metadata={
        "help": "group: each row's group over the whole data set (the paper's); batch: each micro-batch"})
    group_column: str = field(default="group", metadata={
        "help": "the column naming a row's group, when the data set has it (else rows sharing a prompt)"})
    swift_eps: float = field(default=1e-6, metadata={"help": "Swift's (r - mean) / (std + swift_eps)"})

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"RefitConfig.algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.swift_stats not in SWIFT_STATS:
            raise ValueError(f"RefitConfig.swift_stats must be one of {list(SWIFT_STATS)}, got {self.swift_stats!r}")
        if not self.swift_eps >= 0:
            raise ValueError(f"RefitConfig.swift_eps must be >= 0, got {self.swift_eps!r}")
        super().__post_init__()


def row_weights(rows, args: RefitConfig) -> np.ndarray:
    """float64 ``[n]``: the weight of each row of a data set (a ``datasets.Dataset`` or a list of
    dicts) under ``args``: the rewards, or Swift's group-standardized rewards (``swift_stats="group"``;
    with ``"batch"`` the rewards, standardized later within each micro-batch).

    Example:
        >>> rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [], "reward": r} for r in (1.0, 0.0)]
        >>> args = RefitConfig(output_dir="/tmp/x", algorithm="swift", report_to=[], use_cpu=True)
        >>> row_weights(rows, args).round(4).tolist()
        [1.0, -1.0]
    """
    from refit_fast.data import prompt_key_of_messages
    from refit_fast.ops import standardize_rewards

    columns = set(rows.column_names) if hasattr(rows, "column_names") else set(rows[0]) if len(rows) else set()
    if args.reward_column not in columns:
        raise ValueError(f"the data set has no {args.reward_column!r} column (RefitConfig.reward_column); "
                         f"its columns: {sorted(columns)}")
    rewards = np.asarray(rows[args.reward_column] if hasattr(rows, "column_names") else
                         [r[args.reward_column] for r in rows], np.float64)
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise ValueError(f"row {int(bad[0])}: reward {rewards[bad[0]]} is not finite")
    if args.algorithm == "refit" or args.swift_stats == "batch":
        return rewards
    if args.group_column in columns:
        keys = [f"g:{g}" for g in (rows[args.group_column] if hasattr(rows, "column_names")
                                   else [r[args.group_column] for r in rows])]
    else:
        keys = []
        for i in range(len(rewards)):
            row = rows[i]
            messages = row.get("messages") or row.get("prompt")
            if not isinstance(messages, list):
                raise ValueError("swift_stats='group' groups rows by their prompt: the data set needs conversational "
                                 f"'messages' or 'prompt' columns, or a {args.group_column!r} column")
            keys.append(f"p:{prompt_key_of_messages(messages)}")
    first: dict = {}
    groups = torch.tensor([first.setdefault(k, len(first)) for k in keys])
    return standardize_rewards(torch.from_numpy(rewards), groups, eps=args.swift_eps).double().numpy()


class RefitTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` with the Refit / Swift objective (see :mod:`refit_fast.integrations.trl`).
    Takes ``SFTTrainer``'s arguments; ``args`` is a :class:`RefitConfig`.

    Example:
        >>> trainer = RefitTrainer(model=model, args=RefitConfig(output_dir="runs/x", algorithm="swift"),
        ...                        train_dataset=ds, processing_class=tokenizer)          # doctest: +SKIP
        >>> trainer.train()                                                                 # doctest: +SKIP
    """

    def __init__(self, model, args: RefitConfig | None = None, train_dataset=None, eval_dataset=None, **kwargs):
        if args is None or not isinstance(args, RefitConfig):
            raise TypeError("RefitTrainer needs args=RefitConfig(...) (it adds algorithm, reward_column and swift_stats "
                            "to SFTConfig)")
        self._refit_args = args
        if train_dataset is not None:
            train_dataset = self._with_weights(train_dataset, args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._with_weights(v, args) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._with_weights(eval_dataset, args)
        super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        from refit_fast.model import prepare_model

        prepare_model(self.model)  # packed rows attend within their own conversation on every device
        patch_causal_lm(self.model)
        self.data_collator = _WeightCollator(self.data_collator)

    @staticmethod
    def _with_weights(dataset, args):
        if WEIGHT_COLUMN in dataset.column_names:
            return dataset
        return dataset.add_column(WEIGHT_COLUMN, row_weights(dataset, args).tolist())

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # TRL keeps only input_ids and labels when it packs: tokenize with its own steps, unpacked, then
        # spread each row's weight over its tokens and pack with TRL's pack_dataset, weights included.
        dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        if WEIGHT_COLUMN not in dataset.column_names:
            return dataset
        dataset = dataset.map(lambda row: {WEIGHT_COLUMN: [row[WEIGHT_COLUMN]] * len(row["input_ids"])},
                              desc=f"Spreading the weights of the {dataset_name} dataset")
        if packing:
            dataset = dataset.select_columns(["input_ids", "labels", WEIGHT_COLUMN])
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, {})
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        token_weights = inputs.pop(WEIGHT_COLUMN)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        seq_ids = _sequence_ids(inputs, labels)
        starts = torch.ones_like(seq_ids, dtype=torch.bool)
        starts.view(-1)[1:] = seq_ids.view(-1)[1:] != seq_ids.view(-1)[:-1]
        rewards = token_weights.to(torch.float64)[starts]  # one per sequence, in seq_ids order
        a = self._refit_args
        if a.algorithm == "swift" and a.swift_stats == "batch":
            # the micro-batch's statistics over its conversations, not over padding (which TRL's
            # padding-free collator numbers as sequences of its own)
            from refit_fast.ops import standardize_rewards

            trained = torch.zeros(len(rewards), dtype=torch.bool, device=labels.device)
            trained[seq_ids[labels != -100]] = True
            w = torch.zeros_like(rewards)
            w[trained] = standardize_rewards(rewards[trained], eps=a.swift_eps).to(w.dtype)
            rewards = w
        # refit_fast's varlen attention reads the packing as cu_seqlens / max_seqlen
        if "cu_seq_lens_q" in inputs:
            inputs["cu_seqlens"] = inputs.pop("cu_seq_lens_q")
            inputs["max_seqlen"] = int(inputs.pop("max_length_q"))
        for k in ("cu_seq_lens_k", "max_length_k", "seq_idx"):
            inputs.pop(k, None)
        out = model(**inputs, labels=labels, rewards=rewards.float(), seq_ids=seq_ids,
                    num_items_in_batch=num_items_in_batch)
        return (out.loss, out) if return_outputs else out.loss


def _sequence_ids(inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` 0..S-1: the conversation of every token. Packed rows (``position_ids`` restarting at 0)
    hold several; otherwise each row is one. Padding joins the conversation before it (its labels are -100)."""
    pos = inputs.get("position_ids")
    if pos is None:
        return torch.arange(labels.shape[0], device=labels.device)[:, None].expand(labels.shape).contiguous()
    starts = pos == 0
    starts[:, 0] = True
    return (starts.reshape(-1).long().cumsum(0) - 1).reshape(labels.shape)


class _WeightCollator:
    """TRL's collator, plus the ``refit_weight`` column laid out like the labels it builds."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # padding_free, pad_token_id...: the inner collator's
        return getattr(self.inner, name)

    def __call__(self, examples):
        weights = [torch.as_tensor(e.pop(WEIGHT_COLUMN), dtype=torch.float64) for e in examples]
        batch = self.inner(examples)
        labels = batch["labels"]
        if labels.shape[0] == 1 and len(weights) > 1:  # padding-free: the rows in one sequence
            weights = [torch.cat(weights)]
        out = torch.zeros(labels.shape, dtype=torch.float64)
        for i, w in enumerate(weights):
            out[i, : len(w)] = w
        batch[WEIGHT_COLUMN] = out
        return batch
