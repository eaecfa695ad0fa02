"""refit_fast.data under hostile input (issue #12): huge lines, extreme rewards, truncated gzip,
templates that raise on the first row, the validate exit code, typed turn markers, tokenizer reload."""
from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest

from refit_fast.data import DataError, build_word_tokenizer, load_conversations, load_tokenized, tokenize_conversations
from refit_fast.data import validate


def chat(*turns, **extra):
    msgs = [{"role": r, "content": c} for r, c in turns]
    return {"messages": msgs, "reward": 1.0, **extra}


GOOD = chat(("user", "hi"), ("assistant", "hello"))


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(["hi hello there yes no boom can you hand me the chair ?"])


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_template_raising_on_the_first_row_is_template_error(tok):
    tpl = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
           "<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [chat(("user", "boom"), ("assistant", "hello")), GOOD, chat(("user", "there"), ("assistant", "yes"))]
    out, report = tokenize_conversations(load_conversations(rows)[0], tok, chat_template=tpl, progress=False)
    assert len(out) == 2 and report.skipped == {"template_error": 1}
    assert "dataset[0]" in report.summary() and "no boom" in report.summary()
    # the same with one conversation per batch, and in strict mode
    out, report = tokenize_conversations(load_conversations(rows)[0], tok, chat_template=tpl, progress=False, batch_size=1)
    assert len(out) == 2 and report.skipped == {"template_error": 1}
    with pytest.raises(DataError, match=r"dataset\[0\]"):
        tokenize_conversations(load_conversations(rows)[0], tok, chat_template=tpl, progress=False, strict=True)
