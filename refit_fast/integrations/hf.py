"""Patch a stock Hugging Face causal LM so that its loss is ``weighted_ce``: no [B, T, V] logits when
``labels`` are given, and ``forward`` takes ``rewards=`` (one per sequence) for Refit and Swift.

The patched ``forward(input_ids, attention_mask=None, labels=None, *, rewards=None, standardize=None,
groups=None, num_items_in_batch=None, **kwargs)``:

- without ``labels`` it is the model's own forward (logits, generation, caches: untouched);
- with ``labels`` it runs the decoder, then ``weighted_ce`` on its last hidden states and the output
  embedding, with Hugging Face's loss convention: ``labels`` are the inputs (the shift to next-token
  targets happens inside, by shifting the labels, not the hidden states), -100 is ignored, and the
  loss is the token mean, ``sum_t w_t * nll_t / n``, where ``n`` is the number of target tokens or
  ``num_items_in_batch`` when the caller gives it (what ``transformers.Trainer`` passes under
  gradient accumulation). ``w_t`` is 1, or the reward of token t's sequence, standardized as
  ``standardize`` says (None/False, True/"batch", "group" with ``groups``; see ``weighted_ce``). The
  output's ``logits`` is None. A row may hold several packed sequences: ``seq_ids`` (one id per token,
  0..S-1; the default is the row index) says which, and no target crosses from one into the next.

Heads that transform the logits the config declares are computed in the kernel, with exact
gradients: Gemma 2's ``final_logit_softcapping`` (``softcap=``), Cohere's ``logit_scale`` and
Granite's ``logits_scaling`` (``logit_scale=``). Anything else (a custom head) is refused when
patched: the patch compares the model's own logits with what weighted_ce would compute on a short
input first, so it never trains a head other than the one the model has.
"""
from __future__ import annotations

import types

import torch

from refit_fast.model import head_options, output_embedding
from refit_fast.ops import weighted_ce

__all__ = ["UnsupportedHeadError", "head_options", "is_patched", "patch_causal_lm", "unpatch_causal_lm"]

_ORIGINAL = "_refit_fast_original_forward"


class UnsupportedHeadError(ValueError):
    """The model's logits are not ``hidden @ weight.T (+ bias)``, so ``weighted_ce`` cannot stand in
    for its loss exactly."""


def is_patched(model) -> bool:
    """True when :func:`patch_causal_lm` has patched ``model``.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> is_patched(build_model_from_config(tiny_config("llama"), attn_backend=None))
        False
    """
    return _ORIGINAL in vars(model)


def patch_causal_lm(model, *, check_head: bool = True, impl: str = "auto"):
    """Make ``model`` (a transformers causal LM: Llama, Qwen2/3, Mistral, Gemma, Gemma 3, Phi-3, OLMo 2,
    any model with ``get_decoder()`` and output embeddings) compute its loss with ``weighted_ce``;
    returns the same model. Only this instance changes (not its class); :func:`unpatch_causal_lm` undoes it.

    ``check_head``: first compare the model's logits with weighted_ce's head (``hidden @ weight.T
    (+ bias)``, scaled and softcapped as the config declares: :func:`head_options`) on a short input
    and raise :class:`UnsupportedHeadError` if they differ. ``impl`` is ``weighted_ce``'s (``auto``,
    ``triton``, ``torch``).

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = patch_causal_lm(build_model_from_config(tiny_config("llama"), attn_backend=None))
        >>> ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
        >>> labels = torch.tensor([[5, 6, 7, 8], [9, 10, 11, -100]])
        >>> out = model(input_ids=ids, labels=labels, rewards=torch.tensor([1.0, 0.5]))
        >>> out.logits is None, out.loss.shape
        (True, torch.Size([]))
    """
    if is_patched(model):
        return model
    for what in ("get_decoder", "get_output_embeddings"):
        if not callable(getattr(model, what, None)):
            raise TypeError(f"{type(model).__name__} is not a transformers causal LM (no {what}())")
    if model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings to compute a loss with")
    if check_head:
        _check_head(model)
    original = model.forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, *, rewards=None, standardize=None,
                groups=None, seq_ids=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return _loss_forward(self, input_ids, attention_mask, labels, rewards, standardize, groups, seq_ids,
                             num_items_in_batch, impl, kwargs)

    model.forward = types.MethodType(forward, model)
    setattr(model, _ORIGINAL, original)
    return model


def unpatch_causal_lm(model):
    """Give ``model`` its own ``forward`` back; returns it.

    Example:
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> model = patch_causal_lm(build_model_from_config(tiny_config("llama"), attn_backend=None))
        >>> is_patched(unpatch_causal_lm(model))
        False
    """
    if is_patched(model):
        del model.forward  # the instance attribute: the class's forward shows through again
        delattr(model, _ORIGINAL)
    return model


def _loss_forward(model, input_ids, attention_mask, labels, rewards, standardize, groups, seq_ids,
                  num_items_in_batch, impl, kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)  # no logits are built
    kwargs.pop("return_dict", None)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs give {tuple(hidden.shape[:-1])}")
    if seq_ids is None:  # every row one sequence
        seq_ids = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand(hidden.shape[:-1])
    else:
        seq_ids = torch.as_tensor(seq_ids, device=hidden.device)
        if seq_ids.shape != labels.shape:
            raise ValueError(f"seq_ids has shape {tuple(seq_ids.shape)}; it needs one id per token, {tuple(labels.shape)}")
    labels = labels.to(hidden.device)
    weight, bias = output_embedding(model)
    n_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    if rewards is not None:
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=hidden.device).reshape(-1)
        if rewards.numel() != n_seqs:
            raise ValueError(f"rewards has {rewards.numel()} entries; give one per sequence ({n_seqs})")
    if groups is not None:
        groups = torch.as_tensor(groups, device=hidden.device)
    # HF's convention: labels are the inputs, shifted here (the labels, never the hidden states), and
    # the token mean, or the caller's num_items_in_batch under gradient accumulation
    norm = dict(normalize="token") if num_items_in_batch is None else dict(denominator=num_items_in_batch)
    loss = weighted_ce(hidden, weight, labels, seq_ids, rewards, bias=bias, standardize=standardize or False,
                       groups=groups, shift=True, impl=impl, **norm, **head_options(model))
    # the decoder's other outputs pass through under whatever names this transformers version uses
    extra = {k: v for k, v in out.items() if k != "last_hidden_state"} if hasattr(out, "items") else {}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


def _head_logits(logits: torch.Tensor, options: dict) -> torch.Tensor:
    """weighted_ce's transform of raw logits (weighted_ce_torch.Head), written out for the check."""
    logits = logits * options.get("logit_scale", 1.0)
    cap = options.get("softcap")
    return cap * torch.tanh(logits / cap) if cap else logits


@torch.no_grad()
def _check_head(model) -> None:
    """Compare the model's logits with weighted_ce's head (the product, with the transforms of
    :func:`head_options`) on a short input: anything custom is refused."""
    options = head_options(model)
    was_training = model.training
    model.eval()
    try:
        weight, bias = output_embedding(model)
        vocab = weight.shape[0]
        ids = torch.arange(1, 6, device=weight.device)[None] % vocab
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        dt = torch.promote_types(weight.dtype, torch.float32)  # bf16 models: compare in fp32
        ours = _head_logits(hidden.to(dt) @ weight.to(dt).T + (bias.to(dt) if bias is not None else 0), options)
        theirs = out.logits.to(dt)
    finally:
        model.train(was_training)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(weight.dtype, 3e-2)  # matmul rounding of the dtype
    err = (ours - theirs).abs().max().item()
    if not err <= tol * max(1.0, theirs.abs().max().item()):
        raise UnsupportedHeadError(
            f"{type(model).__name__}'s logits are not hidden @ lm_head.weight.T{_described(options)} (max "
            f"difference {err:.3g} on a test input), so weighted_ce cannot compute its loss exactly; use the "
            "model's own loss")


def _described(options: dict) -> str:
    return "".join(f", {k}={v:g}" for k, v in options.items())
