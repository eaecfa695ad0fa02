"""A chat model as a policy of the clarifying-QA environment: batched generation, one turn at a time.

Kept apart from the simulator so that `refit_fast.envs` itself needs no torch.
"""
from __future__ import annotations

import inspect

import torch

# end-of-turn tokens of common chat templates, tried in this order when ``end_token`` is not given
END_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end_of_turn|>")


def with_system_prompt(messages: list[dict], prompt: str | None) -> list[dict]:
    """The conversation as a chat model sees it when told the game by ``prompt``: the prompt is added
    after the first system message's text (the environment's scene, which stays first so the scene
    can still be read from it), or as a new first system message if there is none. The one rule
    for both what a :class:`ModelPolicy` with ``system_prompt`` generates from and what is logged
    and trained on. ``prompt`` None or "" returns a copy of ``messages``.

    Example:
        >>> with_system_prompt([{"role": "system", "content": "items : red cup , blue cup ."},
        ...                     {"role": "user", "content": "i need the cup ."}], "Name the item.")[0]["content"]
        'items : red cup , blue cup .\\n\\nName the item.'
    """
    out = [dict(m) for m in messages]
    if not prompt:
        return out
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content') or ''}\n\n{prompt}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


class ModelPolicy:
    """`policy(list_of_conversations) -> list_of_texts` for :func:`refit_fast.envs.evaluate` with
    ``batched=True`` (a single conversation also works: ``policy(messages) -> text``).

    Greedy decoding by default (``temperature=0``); generation stops at the end-of-turn token or after
    ``max_new_tokens``. The end of a turn is ``end_token`` if given, else the first of
    :data:`END_TOKENS` the tokenizer knows (``<|end|>`` for :func:`refit_fast.data.build_word_tokenizer`,
    ``<|im_end|>`` for SmolLM2 and other ChatML templates), and always the tokenizer's eos token. Prompts are the tokenizer's own chat template with the
    generation prompt (``apply_chat_template(..., add_generation_prompt=True)``). With
    ``system_prompt``, every conversation is first passed through :func:`with_system_prompt` (how an
    instruct model is told the game).

    Example (a random tiny model, so the score means nothing):
        >>> from refit_fast.data import build_word_tokenizer
        >>> from refit_fast.envs import corpus, evaluate
        >>> from refit_fast.model import build_model_from_config, tiny_config
        >>> tokenizer = build_word_tokenizer(corpus(20))
        >>> model = build_model_from_config(tiny_config(vocab_size=len(tokenizer)), attn_backend=None)
        >>> scores = evaluate(ModelPolicy(model, tokenizer), n_episodes=4, batched=True, progress=False)
        >>> 0.0 <= scores["mean_reward"] <= 1.0
        True
    """

    def __init__(self, model, tokenizer, *, temperature: float = 0.0, max_new_tokens: int = 16,
                 end_token: str | None = None, batch_size: int = 256, seed: int = 0,
                 system_prompt: str | None = None):
        if temperature < 0:
            raise ValueError(f"ModelPolicy: temperature must be >= 0, got {temperature}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt
        self.stop_ids = _stop_ids(tokenizer, end_token)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        # transformers 5.2x renamed `past_key_values` to `cache`; older 5.x only knows the old name
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits: a [batch, prompt, vocab] tensor is GBs for a 49k vocabulary
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def __call__(self, conversations):
        single = bool(conversations) and isinstance(conversations[0], dict)
        batch = [conversations] if single else list(conversations)
        texts: list[str] = []
        for start in range(0, len(batch), self.batch_size):
            texts += self._generate(batch[start:start + self.batch_size])
        return texts[0] if single else texts

    def _prompt_ids(self, messages) -> list[int]:
        messages = with_system_prompt(messages, self.system_prompt)
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if not isinstance(enc, list) else enc)

    @staticmethod
    def _cache(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def _generate(self, batch) -> list[str]:
        device = next(self.model.parameters()).device
        prompts = [self._prompt_ids(m) for m in batch]
        T = max(len(p) for p in prompts)
        # left padding: every row's next token sits at the last column
        ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self.last_only)
        past = self._cache(out)
        logits = out.logits[:, -1].float()
        new_tokens = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        next_pos = positions[:, -1:] + 1
        for _ in range(self.max_new_tokens):
            if self.temperature > 0:
                probs = torch.softmax(logits / self.temperature, dim=-1).cpu()
                tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            else:
                tok = logits.argmax(-1).cpu()
            for i, t in enumerate(tok.tolist()):
                if not done[i]:
                    if t in self.stop_ids:
                        done[i] = True
                    else:
                        new_tokens[i].append(t)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=tok[:, None].to(device), attention_mask=mask, position_ids=next_pos,
                             use_cache=True, **{self.cache_kw: past}, **self.last_only)
            past = self._cache(out)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]


def _stop_ids(tokenizer, end_token: str | None) -> set[int]:
    """Token ids that end a turn: the end-of-turn token (given, or the first of END_TOKENS the
    tokenizer has) and the tokenizer's eos; never unk."""
    unk = tokenizer.unk_token_id
    vocab = tokenizer.get_vocab()
    names = [end_token] if end_token is not None else [t for t in END_TOKENS if t in vocab][:1]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names] + [tokenizer.eos_token_id]
    # (not the model's generation_config: a config-built model carries a default eos id that is an
    # ordinary word of a small word-level vocabulary)
    return {int(i) for i in ids if isinstance(i, int) and i != unk}
