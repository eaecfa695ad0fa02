"""The model body on packed rows: varlen attention for HF causal LMs, hidden states only.

    from refit_fast.model import attention_backend, prepare_model, packed_hidden_states, output_embedding
    model = prepare_model(model, attn_backend="auto")        # flash-attn > torch varlen > SDPA mask
    attention_backend(model)                                 # 'auto': what prepare_model checked and recorded
    hidden = packed_hidden_states(model, input_ids, position_ids, cu_seqlens, max_seqlen)  # [T, D]
    weight, bias = output_embedding(model)                   # for weighted_ce; no logits built here
"""
from refit_fast.model.attention import (
    ATTN_IMPLEMENTATION,
    BACKENDS,
    BackendUnavailableError,
    PackedAttentionMeta,
    available_backends,
    block_causal_mask,
    check_backend_name,
    concat_cu_seqlens,
    register_attention,
    resolve_backend,
    varlen_attention_forward,
)
from refit_fast.model.body import (
    PREPARED_ATTRIBUTE,
    PreparedAttention,
    attention_backend,
    base_model,
    enable_checkpointing,
    head_options,
    output_embedding,
    packed_hidden_states,
    prepare_model,
    unprepare_model,
)
from refit_fast.model.build import build_model_from_config, load_model, tiny_config

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "BackendUnavailableError",
    "PREPARED_ATTRIBUTE",
    "PackedAttentionMeta",
    "PreparedAttention",
    "attention_backend",
    "available_backends",
    "base_model",
    "block_causal_mask",
    "build_model_from_config",
    "check_backend_name",
    "concat_cu_seqlens",
    "enable_checkpointing",
    "load_model",
    "head_options",
    "output_embedding",
    "packed_hidden_states",
    "prepare_model",
    "register_attention",
    "resolve_backend",
    "tiny_config",
    "unprepare_model",
    "varlen_attention_forward",
]
