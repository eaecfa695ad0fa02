"""Run a Hugging Face causal LM's body on packed rows and hand back hidden states only.

The training step never builds ``[tokens x vocab]`` logits: :func:`packed_hidden_states` runs the base
model (embeddings, decoder layers, final norm) and stops; the loss kernel (``refit_fast.weighted_ce``)
applies the output embedding from :func:`output_embedding` chunk by chunk.

Typical use by the trainer::

    model = prepare_model(AutoModelForCausalLM.from_pretrained(path), attn_backend="auto")
    hidden = packed_hidden_states(model, row["input_ids"], row["position_ids"],
                                  row["cu_seqlens"], row["max_seqlen"])      # [T, D]
    weight, bias = output_embedding(model)
    loss = weighted_ce(hidden, weight, row["labels"], row["seq_ids"], rewards, bias=bias)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from refit_fast.model.attention import (
    ATTN_IMPLEMENTATION,
    PackedAttentionMeta,
    check_backend_name,
    register_attention,
    resolve_backend,
)

__all__ = [
    "PREPARED_ATTRIBUTE",
    "PreparedAttention",
    "attention_backend",
    "base_model",
    "enable_checkpointing",
    "head_options",
    "output_embedding",
    "packed_hidden_states",
    "prepare_model",
    "unprepare_model",
]

# The one place a prepared model keeps its attention settings: ``model.refit_attention``.
PREPARED_ATTRIBUTE = "refit_attention"


@dataclass(frozen=True)
class PreparedAttention:
    """What :func:`prepare_model` recorded on a model, as ``model.refit_attention``.

    ``backend``: the checked backend name (``"auto"``, ``"flash"``, ``"torch_varlen"`` or ``"sdpa"``);
    every packed forward reads it from here. ``"auto"`` stays ``"auto"``: the kernel is picked per
    forward from the tensors' device and dtype (see :func:`refit_fast.model.resolve_backend`).
    ``previous``: the attention implementation before the first :func:`prepare_model` (None if
    unknown), which :func:`unprepare_model` restores.

    Example:
        >>> PreparedAttention("sdpa", previous="eager").backend
        'sdpa'
    """

    backend: str
    previous: str | None = None


def attention_backend(model: torch.nn.Module) -> str | None:
    """The attention backend :func:`prepare_model` recorded on ``model``, or None if it was not prepared.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> attention_backend(build_model_from_config(tiny_config(), attn_backend="sdpa"))
        'sdpa'
        >>> attention_backend(build_model_from_config(tiny_config(), attn_backend=None)) is None
        True
    """
    prepared = getattr(model, PREPARED_ATTRIBUTE, None)
    return prepared.backend if isinstance(prepared, PreparedAttention) else None


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``LlamaForCausalLM.model`` etc.), without the lm_head.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> type(base_model(build_model_from_config(tiny_config("llama")))).__name__
        'LlamaModel'
    """
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    for name in ("model", getattr(model, "base_model_prefix", None)):
        sub = getattr(model, name, None) if name else None
        if isinstance(sub, torch.nn.Module) and sub is not model:
            return sub
    return model  # already a base model


def prepare_model(model: torch.nn.Module, attn_backend: str = "auto") -> torch.nn.Module:
    """Switch a HF causal LM (in place) to packed varlen attention; returns the model.

    ``attn_backend``: ``"auto"`` (flash-attn, then torch varlen, on CUDA with fp16/bf16; SDPA otherwise:
    per conversation on CPU, with a block-diagonal mask elsewhere) or a forced ``"flash"`` / ``"torch_varlen"`` / ``"sdpa"``. It is
    checked here, once (an unknown name raises ``ValueError``, a forced backend that is not installed
    :class:`BackendUnavailableError`), and recorded as ``model.refit_attention``
    (:class:`PreparedAttention`; read it with :func:`attention_backend`). A forced backend that cannot
    run on the tensors' device/dtype raises :class:`BackendUnavailableError` at the first forward.
    Works with gradient checkpointing enabled before or after this call. :func:`unprepare_model`
    restores the previous implementation (e.g. for generation with padded batches).

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = prepare_model(build_model_from_config(tiny_config("qwen2"), attn_backend=None), "sdpa")
        >>> model.config._attn_implementation
        'refit_varlen'
    """
    resolve_backend(attn_backend, argument="attn_backend")
    register_attention()
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        # Prepared twice: unprepare still goes back to the original (unknown if switched by hand).
        earlier = getattr(model, PREPARED_ATTRIBUTE, None)
        previous = earlier.previous if isinstance(earlier, PreparedAttention) else None
    else:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (AttributeError, ValueError, KeyError):
            # Older transformers without set_attn_implementation: the config attribute is what layers read.
            model.config._attn_implementation = ATTN_IMPLEMENTATION
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"{type(model).__name__} did not accept attn_implementation={ATTN_IMPLEMENTATION!r}; "
                "it must use transformers' AttentionInterface"
            )
    setattr(model, PREPARED_ATTRIBUTE, PreparedAttention(attn_backend, previous))
    return model


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each decoder layer's activations in the backward (non-reentrant checkpointing).

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and warns on the old name; this calls whichever the installed version has.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = enable_checkpointing(build_model_from_config(tiny_config()))
        >>> any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        True
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def unprepare_model(model: torch.nn.Module, attn_implementation: str | None = None) -> torch.nn.Module:
    """Undo :func:`prepare_model`: restore the previous (or the given) attention implementation.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> unprepare_model(build_model_from_config(tiny_config("llama"))).config._attn_implementation
        'sdpa'
    """
    prepared = getattr(model, PREPARED_ATTRIBUTE, None)
    previous = prepared.previous if isinstance(prepared, PreparedAttention) else None
    model.set_attn_implementation(attn_implementation or previous or "sdpa")
    if prepared is not None:
        delattr(model, PREPARED_ATTRIBUTE)
    return model


def packed_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Final-norm hidden states ``[B*T, D]`` of packed row(s); the lm_head is never applied.

    ``input_ids``/``position_ids``: ``[T]`` or ``[1, T]`` (or ``[B, T]``, equal-length rows, with
    ``cu_seqlens`` over the flattened ``B*T`` tokens, see ``concat_cu_seqlens``); ``position_ids`` restart
    at 0 per conversation. ``cu_seqlens`` int ``[k+1]`` from 0 to ``B*T`` (a padding tail is just one
    more segment); ``max_seqlen`` the longest segment (computed if None). ``model`` must have been through
    :func:`prepare_model`, whose backend (:func:`attention_backend`) is used; ``backend`` overrides it
    for this call. Runs the base
    model with ``use_cache=False``; gradients flow as usual, gradient checkpointing included. Row ``t`` of
    the result pairs with ``labels[t]`` of the packer (labels are already shifted).

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = build_model_from_config(tiny_config("llama"))   # prepared with attn_backend="auto"
        >>> ids = torch.randint(0, 128, (9,))
        >>> pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1])           # conversations of 4 and 3, padding of 2
        >>> cu = torch.tensor([0, 4, 7, 9], dtype=torch.int32)
        >>> packed_hidden_states(model, ids, pos, cu, 4).shape
        torch.Size([9, 64])
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"model uses attn_implementation={model.config._attn_implementation!r}: call "
            "refit_fast.model.prepare_model(model) first, otherwise packed conversations attend to each other"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if input_ids.dim() != 2 or position_ids.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and position_ids must both be [T] or [B, T], got {tuple(input_ids.shape)} "
            f"and {tuple(position_ids.shape)}"
        )
    if backend is None:
        # Checked and installed since prepare_model; "auto" for a model switched to refit_varlen by hand.
        backend = attention_backend(model) or "auto"
    else:
        check_backend_name(backend, "backend")
    body = base_model(model)
    device = input_ids.device
    batch, seqlen = input_ids.shape
    # "auto" stays unresolved here: the first layer resolves it from the query's dtype after casting q/k/v
    # to the autocast dtype (HF's RoPE returns fp32 q/k under bf16 autocast; see attention.autocast_inputs),
    # and the meta object, shared by all layers, caches that choice and the SDPA mask.
    meta = PackedAttentionMeta.build(
        cu_seqlens, max_seqlen, batch=batch, seqlen=seqlen, backend=backend, device=device, validate=validate
    )
    out = body(
        input_ids=input_ids,
        position_ids=position_ids.to(device),
        use_cache=False,  # with a cache HF builds masks that let packed conversations see each other
        refit_packed=meta,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.reshape(batch * seqlen, hidden.shape[-1])


def head_options(model) -> dict:
    """weighted_ce's head options for the logit transforms ``model.config`` declares (the trainer and
    ``patch_causal_lm`` both pass them, so a Gemma 2 model keeps its softcap):
    ``final_logit_softcapping`` (Gemma 2) -> ``softcap``; ``logit_scale`` (Cohere) and
    ``logits_scaling`` (Granite, which divides by it) -> ``logit_scale``. Empty for a plain head.

    Example:
        >>> from types import SimpleNamespace
        >>> head_options(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0)))
        {'softcap': 30.0}
        >>> head_options(SimpleNamespace(config=SimpleNamespace(logits_scaling=4.0)))
        {'logit_scale': 0.25}
    """
    cfg = getattr(model, "config", None)
    out = {}
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        out["softcap"] = float(cap)
    scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)
    if scale != 1.0:
        out["logit_scale"] = scale
    return out


def output_embedding(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, D], bias [V] or None)`` of the lm_head, for ``weighted_ce(hidden, weight, ..., bias=)``.

    With tied embeddings the weight *is* the input embedding parameter, so gradients from the loss and
    from the embedding lookup accumulate in the same ``.grad``.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> w, b = output_embedding(build_model_from_config(tiny_config("llama")))
        >>> tuple(w.shape), b
        ((128, 64), None)
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (is it a causal LM?)")
    return head.weight, getattr(head, "bias", None)
