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

import torch

from refit_fast.model.attention import (
    ATTN_IMPLEMENTATION,
    BACKENDS,
    BackendUnavailableError,
    PackedAttentionMeta,
    _flash_varlen_func,
    _torch_varlen_func,
    register_attention,
)

__all__ = [
    "base_model",
    "enable_checkpointing",
    "load_model",
    "output_embedding",
    "packed_hidden_states",
    "prepare_model",
    "unprepare_model",
]


def _check_installed(backend: str) -> None:
    """Fail early, at set-up, for a forced backend this installation can never run (device checks wait
    for the forward, since the model may still move to CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "flash" and _flash_varlen_func() is None:
        raise BackendUnavailableError(
            "attention backend 'flash' is unavailable: flash-attn is not installed "
            "(pip install 'refit-fast[flash]'; needs CUDA). Use attn_backend='auto'."
        )
    if backend == "torch_varlen" and _torch_varlen_func() is None:
        raise BackendUnavailableError(
            f"attention backend 'torch_varlen' is unavailable: torch {torch.__version__} has no "
            "torch.nn.attention.varlen.varlen_attn (needs torch >= 2.9). Use attn_backend='auto'."
        )


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

    ``attn_backend``: ``"auto"`` (flash-attn, then torch varlen, on CUDA with fp16/bf16; SDPA with a
    block-diagonal mask otherwise) or a forced ``"flash"`` / ``"torch_varlen"`` / ``"sdpa"``. A forced
    backend that is not installed raises :class:`BackendUnavailableError` here; one that cannot run on
    the tensors' device/dtype raises it at the first forward. Works with gradient checkpointing enabled
    before or after this call. :func:`unprepare_model` restores the previous implementation
    (e.g. for generation with padded batches).

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = prepare_model(build_model_from_config(tiny_config("qwen2"), attn_backend=None), "sdpa")
        >>> model.config._attn_implementation
        'refit_varlen'
    """
    _check_installed(attn_backend)
    register_attention()
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model._refit_previous_attn = previous
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
    model._refit_attn_backend = attn_backend
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
    impl = attn_implementation or getattr(model, "_refit_previous_attn", None) or "sdpa"
    model.set_attn_implementation(impl)
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
    :func:`prepare_model`; ``backend`` overrides the backend chosen there for this call. Runs the base
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
    backend = backend or getattr(model, "_refit_attn_backend", "auto")
    _check_installed(backend)
    body = base_model(model)
    device = input_ids.device
    batch, seqlen = input_ids.shape
    # "auto" stays unresolved here and is resolved per layer from the query dtype, which autocast may
    # change; the SDPA mask is built lazily once and cached in the meta object shared by all layers.
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


def load_model(
    name_or_config,
    *,
    attn_backend: str | None = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **from_pretrained_kwargs,
) -> torch.nn.Module:
    """Load (local path / hub id, honouring ``HF_HUB_OFFLINE``) or build (config dict / ``PretrainedConfig``,
    random weights) a causal LM and :func:`prepare_model` it unless ``attn_backend`` is None.

    Example:
        >>> from refit_fast.model import tiny_config
        >>> model = load_model(tiny_config("qwen2"), attn_backend="sdpa")
        >>> type(model).__name__, model.config._attn_implementation
        ('Qwen2ForCausalLM', 'refit_varlen')
    """
    from transformers import PretrainedConfig

    if isinstance(name_or_config, (dict, PretrainedConfig)):
        from refit_fast.model.build import build_model_from_config

        return build_model_from_config(
            name_or_config, attn_backend=attn_backend, dtype=dtype or torch.float32, device=device
        )
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_config, **from_pretrained_kwargs)
    if device is not None:
        model = model.to(device)
    if attn_backend is not None:
        prepare_model(model, attn_backend)
    return model
