"""Conversation packer: padding-free rows for varlen training (C++ core in csrc/).

    from refit_fast.packing import pack, to_torch
    packed = pack(conversations, 4096, strategy="bfd", seed=epoch)
    for row in packed:                  # rows are built as they are read
        batch = to_torch(row, "cuda")   # input_ids, labels, position_ids, seq_ids, cu_seqlens, max_seqlen

    # From a Hugging Face dataset's Arrow columns, without copying the tokens:
    flat = FlatConversations.from_arrow(ds.data["input_ids"], ds.data["loss_mask"])
    packed = pack(flat, 4096)

Three steps, each usable on its own (the trainer flattens once, plans once per epoch, and
materializes each batch), one module each, mirroring the C++ files:

* :mod:`refit_fast.packing.flat` (csrc/flatten.cpp): :class:`FlatConversations` (all tokens in one
  buffer plus offsets) and :func:`flatten`, which validates conversations and builds one; also the
  loader of the compiled extension;
* :mod:`refit_fast.packing.plan` (csrc/plan.cpp): :func:`plan_bins` and the :class:`BinPlan` it
  returns (which conversations share a row);
* :mod:`refit_fast.packing.rows` (csrc/materialize.cpp): :func:`materialize`, :func:`row_buffers`,
  :class:`Packed`, :class:`PackStats` and :func:`to_torch`.

:mod:`refit_fast.packing.pipeline` has :func:`pack` (the steps together, with over-long handling),
:mod:`refit_fast.packing.turns` the exchange truncation of ``overlong="truncate_turns"``, and
:mod:`refit_fast.packing.options` the option validators (``check_*``) that the trainer's config
shares.
"""
from refit_fast.packing.flat import FlatConversations, flatten
from refit_fast.packing.options import check_max_tokens, check_overlong, check_pad_to, check_strategy
from refit_fast.packing.pipeline import pack, truncate_overlong
from refit_fast.packing.plan import BinPlan, plan_bins
from refit_fast.packing.rows import PackStats, Packed, materialize, row_buffers, to_torch
from refit_fast.packing.turns import exchange_starts, truncate_turns

__all__ = [
    "BinPlan",
    "FlatConversations",
    "PackStats",
    "Packed",
    "check_max_tokens",
    "check_overlong",
    "check_pad_to",
    "check_strategy",
    "exchange_starts",
    "flatten",
    "materialize",
    "pack",
    "plan_bins",
    "row_buffers",
    "to_torch",
    "truncate_overlong",
    "truncate_turns",
]
