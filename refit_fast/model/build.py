"""Causal LMs ready for packed rows: random ones from configs (tests, benchmarks, the CPU demo; nothing
is downloaded) and saved ones from local directories or the hub, both through :func:`prepare_model`."""
from __future__ import annotations

import torch

from refit_fast.model.body import prepare_model

__all__ = ["build_model_from_config", "load_model", "tiny_config"]

# Small enough to train on a 2-core CPU, shaped like the real thing: GQA (4 query heads, 2 kv heads),
# RoPE, RMSNorm, SwiGLU. Sizes are overridable.
_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    """A config dict for a tiny model of ``model_type`` ("llama", "qwen2", ...), sizes overridable.

    Example:
        >>> tiny_config("qwen2", num_hidden_layers=1)["num_hidden_layers"]
        1
    """
    return {"model_type": model_type, **_TINY, **overrides}


def build_model_from_config(
    config,
    *,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attn_backend: str | None = "auto",
) -> torch.nn.Module:
    """A randomly initialised HF causal LM from a config dict (with ``"model_type"``, default "llama") or a
    ``PretrainedConfig``; prepared for packed rows (:func:`prepare_model`) unless ``attn_backend`` is None.

    ``seed`` makes the weights reproducible without touching the global RNG state.

    Example:
        >>> model = build_model_from_config({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> model.config.vocab_size, model.config._attn_implementation
        (100, 'refit_varlen')
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, dict):
        fields = dict(config)
        model_type = fields.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **fields)
    elif not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a dict or a transformers PretrainedConfig, got {type(config).__name__}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device is not None:
        model = model.to(device)
    if attn_backend is not None:
        prepare_model(model, attn_backend)
    return model


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
        >>> model = load_model(tiny_config("qwen2"), attn_backend="sdpa")
        >>> type(model).__name__, model.config._attn_implementation
        ('Qwen2ForCausalLM', 'refit_varlen')
    """
    from transformers import PretrainedConfig

    if isinstance(name_or_config, (dict, PretrainedConfig)):
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
