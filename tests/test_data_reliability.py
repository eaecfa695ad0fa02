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


def test_rewards_beyond_float32_are_reported_with_their_row(tmp_path):
    rows = [json.dumps(GOOD),
            json.dumps({**GOOD, "reward": 1e308}),
            '{"messages": [{"role": "assistant", "content": "x"}], "reward": ' + "9" * 400 + "}",
            json.dumps({**GOOD, "reward": -3.5e38}),
            json.dumps({**GOOD, "reward": 3.4e38})]  # the largest float32 is 3.4028e38: kept
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    convs, report = load_conversations(path)
    assert [c.location for c in convs] == [f"{path}:1", f"{path}:5"]
    assert report.skipped == {"reward_out_of_range": 3}
    assert all(np.isfinite(np.float32(c.reward)) for c in convs)
    text = report.summary()
    assert "r.jsonl:2" in text and "r.jsonl:3" in text and "400 digits" in text
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*float32"):
        load_conversations(path, strict=True)


def test_empty_pretokenized_row_has_its_own_reason():
    rows = [{"input_ids": [], "loss_mask": [], "reward": 1.0},
            {"input_ids": [], "loss_mask": [0], "reward": 1.0},
            {"input_ids": [1, 2], "loss_mask": [0, 1], "reward": 1.0}]
    convs, report = load_conversations(rows)
    assert len(convs) == 1 and report.skipped == {"empty_tokens": 2}
    assert "dataset[0]: input_ids is empty" in report.summary()
