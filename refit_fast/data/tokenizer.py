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
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[*ROLE_TOKENS, END_OF_TURN, *extra],
        chat_template=chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
        model_max_length=1 << 30,
    )
