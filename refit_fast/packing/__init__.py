"""Conversation packer: padding-free rows for varlen training (C++ core in csrc/).

    from refit_fast.packing import pack, to_torch
    packed = pack(conversations, 4096, strategy="bfd", seed=epoch)
    for row in packed:                  # rows are built as they are read
        batch = to_torch(row, "cuda")   # input_ids, labels, position_ids, seq_ids, cu_seqlens, max_seqlen

    # From a Hugging Face dataset's Arrow columns, without copying the tokens:
    flat = FlatConversations.from_arrow(ds.data["input_ids"], ds.data["loss_mask"])
    packed = pack(flat, 4096)

See :mod:`refit_fast.packing.packer` for the three steps (flatten, plan_bins, materialize) and
:mod:`refit_fast.packing.turns` for ``overlong="truncate_turns"``.
"""
from refit_fast.packing.packer import (
    BinPlan,
    FlatConversations,
    PackStats,
    Packed,
    check_max_tokens,
    check_overlong,
    check_pad_to,
    check_strategy,
    flatten,
    materialize,
    pack,
    plan_bins,
    row_buffers,
    to_torch,
)
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
    "truncate_turns",
]
