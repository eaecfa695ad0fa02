"""A small word-level chat tokenizer built in code, so tests and the demo never download anything.

    tok = build_word_tokenizer(["hello there", "how are you ?"])
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
"""
from __future__ import annotations

from collections.abc import Iterable

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, *ROLE_TOKENS, END_OF_TURN)

# `<bos>`, then `<|role|> content <|end|>` per message, newline-separated. Newlines go before a role
# marker, not after `<|end|>`, so every turn boundary ends exactly at a token (the offsets settle it).
# The `{% generation %}` block lets transformers' `return_assistant_tokens_mask` be compared with our
# spans in the tests; our span algorithm does not need it.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {% generation %}{{ message['content'] }} <|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>{% endif %}"
)


def build_word_tokenizer(
    corpus_texts: Iterable[str],
    *,
    chat_template: str | None = None,
    extra_tokens: Iterable[str] = (),
    lowercase: bool = False,
    min_frequency: int = 1,
    vocab_size: int | None = None,
):
    """Train a word-level tokenizer on `corpus_texts` and wrap it as a `PreTrainedTokenizerFast`.

    Words split on whitespace, and every punctuation character is its own token. The vocabulary holds
    the special tokens `<pad> <unk> <bos> <eos>`, the turn markers `<|system|> <|user|> <|assistant|>
    <|tool|> <|end|>`, then `extra_tokens` (also special: never split), then corpus words by
    frequency. Unknown words map to `<unk>`. `chat_template` defaults to `DEFAULT_CHAT_TEMPLATE`
    (`<bos>`, then `<|role|> content <|end|>` per message; `add_generation_prompt` appends
    `<|assistant|>`). A policy should stop generating at `<|end|>` (`END_OF_TURN`).

    Example:
        >>> tok = build_word_tokenizer(["hi there", "what is up ?"])
        >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        '<bos><|user|> hi <|end|>'
        >>> tok.save_pretrained("/tmp/tok")  # later: AutoTokenizer.from_pretrained("/tmp/tok")  # doctest: +SKIP

    Its `save_pretrained` makes `AutoTokenizer.from_pretrained(folder)` give back exactly this
    tokenizer whatever model `config.json` sits in the folder. (transformers 5 otherwise rebuilds
    the vocabulary with the model type's own tokenizer class for some types, e.g. qwen2 and phi3,
    ignoring `tokenizer_class`: "can you hand me the chair ?" came back as ['?'].) See `save_word_tokenizer`.
    """
    # Imported here so `import refit_fast.data` stays cheap for the CLI.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = [t for t in extra_tokens if t not in SPECIAL_TOKENS]
    specials = [*SPECIAL_TOKENS, *extra]
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size if vocab_size is not None else 1 << 30,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=specials,
    )
    tok.train_from_iterator((str(t) for t in corpus_texts), trainer=trainer)
    # Word-level decoding: tokens joined by single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return _word_tokenizer_class()(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN, *extra],
        chat_template=chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )


# --- saving ------------------------------------------------------------------------------------

_MODULE = "refit_word_tokenizer"
_MODULE_SOURCE = '''"""refit_fast's word tokenizer, saved beside a model: loads tokenizer.json exactly as saved.

Written by refit_fast so that AutoTokenizer.from_pretrained(folder, trust_remote_code=True) also
gives back the same tokenizer. Without trust_remote_code, transformers ignores this file and uses
tokenizer_class from tokenizer_config.json (PreTrainedTokenizerFast), which is the same tokenizer.
"""
from transformers import PreTrainedTokenizerFast


class RefitWordTokenizer(PreTrainedTokenizerFast):
    pass
'''


def save_word_tokenizer(tokenizer, folder, *args, **kwargs):
    """`tokenizer.save_pretrained(folder)`, made to reload through `AutoTokenizer` unchanged.

    transformers 5 picks the tokenizer class from the folder's model `config.json` for the model
    types it lists as having wrong hub tokenizer classes (qwen2, phi3, ...) and rebuilds the
    vocabulary as that class's byte-level BPE, which splits word-level text wrongly. Beside
    `tokenizer_class: PreTrainedTokenizerFast`, tokenizer_config.json gets an
    `auto_map.AutoTokenizer` entry naming a one-line subclass written beside it
    (`refit_word_tokenizer.py`); with it, AutoTokenizer skips the model-type override and loads
    `tokenizer.json` as saved, with or without `trust_remote_code` (the file is only imported with
    `trust_remote_code=True`, and only re-exports `PreTrainedTokenizerFast`).
    """
    import json
    import os

    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast.save_pretrained(tokenizer, folder, *args, **kwargs)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["auto_map"] = {"AutoTokenizer": [None, f"{_MODULE}.RefitWordTokenizer"]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(folder, f"{_MODULE}.py"), "w", encoding="utf-8") as f:
        f.write(_MODULE_SOURCE)
    return out


_CLASS = None


def _word_tokenizer_class():
    """A `PreTrainedTokenizerFast` whose `save_pretrained` is `save_word_tokenizer` (built lazily)."""
    global _CLASS
    if _CLASS is None:
        from transformers import PreTrainedTokenizerFast

        class WordTokenizerFast(PreTrainedTokenizerFast):
            def save_pretrained(self, save_directory, *args, **kwargs):
                return save_word_tokenizer(self, save_directory, *args, **kwargs)

        WordTokenizerFast.__module__ = __name__
        WordTokenizerFast.__qualname__ = "WordTokenizerFast"
        globals()["WordTokenizerFast"] = _CLASS = WordTokenizerFast  # picklable by name
    return _CLASS
