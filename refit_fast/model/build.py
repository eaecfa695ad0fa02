"""Tiny random causal LMs from configs: for tests, benchmarks and the CPU demo. Nothing is downloaded."""
from __future__ import annotations

import torch

__all__ = ["build_model_from_config", "tiny_config"]

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
        from refit_fast.model.body import prepare_model

        prepare_model(model, attn_backend)
    return model
