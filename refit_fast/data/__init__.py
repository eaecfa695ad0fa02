"""Conversation data: read and validate logged conversations, tokenize them with a chat template.

    from refit_fast.data import load_tokenized
    data, report = load_tokenized("logs.jsonl", tokenizer, max_tokens=4096)
    print(report.summary())
    data[0].input_ids, data[0].loss_mask, data[0].reward, data[0].prompt_key

`load_conversations` (read + validate) and `tokenize_conversations` (chat template -> input_ids and
loss_mask) are the two steps; `build_word_tokenizer` makes a small tokenizer with no download.
"""
from refit_fast.data.load import (
    Conversation,
    load_conversations,
    prompt_key_of_messages,
    prompt_key_of_tokens,
    token_id_problem,
)
from refit_fast.data.report import DataError, ValidationReport
from refit_fast.data.tokenization import (
    TokenizedConversation,
    assistant_spans,
    load_tokenized,
    tokenize_conversations,
)
from refit_fast.data.tokenizer import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, build_word_tokenizer, save_word_tokenizer

__all__ = [
    "Conversation",
    "TokenizedConversation",
    "ValidationReport",
    "DataError",
    "load_conversations",
    "token_id_problem",
    "tokenize_conversations",
    "load_tokenized",
    "assistant_spans",
    "prompt_key_of_messages",
    "prompt_key_of_tokens",
    "build_word_tokenizer",
    "save_word_tokenizer",
    "DEFAULT_CHAT_TEMPLATE",
    "END_OF_TURN",
]
