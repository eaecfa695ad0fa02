"""refit_fast inside other stacks: :mod:`refit_fast.integrations.hf` patches a stock Hugging Face
causal LM so that its ``forward(labels=...)`` computes the loss with ``weighted_ce`` (no logits, and
optional per-sequence rewards).

    from refit_fast.integrations.hf import patch_causal_lm
    model = patch_causal_lm(AutoModelForCausalLM.from_pretrained(path))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, rewards=rewards)   # out.logits is None
"""
