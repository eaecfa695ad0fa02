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


def _truncated_gz(tmp_path, n=2000):
    rows = [{**GOOD, "id": f"c{i}", "pad": "x" * (i % 97)} for i in range(n)]
    full = tmp_path / "full.jsonl.gz"
    with gzip.open(full, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_gzip_keeps_rows_before_and_reports_where(tmp_path, tok, capsys):
    cut = _truncated_gz(tmp_path)
    convs, report = load_conversations(cut)
    assert 0 < len(convs) < 2000 and report.skipped.get("read_error") == 1
    assert [c.id for c in convs] == [f"c{i}" for i in range(len(convs))]  # every row before the break
    (ex,) = report.examples["read_error"]
    assert ex.startswith(f"{cut}:") and "EOFError" in ex
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read past line") as e:
        load_conversations(cut, strict=True)
    assert isinstance(e.value, ValueError) and e.value.reason == "read_error"
    # the validate command reports it and exits 1, no traceback; load_tokenized too
    assert validate.main([str(cut)]) == 1
    assert "read_error: 1" in capsys.readouterr().out
    out, report = load_tokenized(cut, tok, progress=False)
    assert len(out) == len(convs) and report.skipped.get("read_error") == 1
    # a file that is not gzip at all
    bad = tmp_path / "plain.jsonl.gz"
    bad.write_text(json.dumps(GOOD) + "\n")
    convs, report = load_conversations(bad)
    assert convs == [] and report.skipped == {"read_error": 1} and f"{bad}:1" in report.summary()


def test_validate_exit_code_and_real_json_columns(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, GOOD])
    assert validate.main([str(good)]) == 0
    capsys.readouterr()
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"messages": [], "reward": 1,}', '{"a": 1} x', GOOD])
    assert validate.main([str(bad)]) == 1  # rows were skipped
    out = capsys.readouterr().out
    assert "bad.jsonl:2: malformed JSON at column 30" in out  # the trailing comma's position, not column 1
    assert "bad.jsonl:3: malformed JSON at column 10: Extra data" in out
    with pytest.raises(SystemExit):
        validate.main(["--help"])
    assert "exit status: 0 every row usable; 1 any row skipped" in " ".join(capsys.readouterr().out.split())


def test_huge_line_is_too_long_fast_and_located(tmp_path, tok):
    huge = json.dumps(chat(("user", "hi"), ("assistant", "hello " * 3_500_000)))  # ~21 MB
    path = write_jsonl(tmp_path / "h.jsonl", [GOOD, huge, GOOD])
    t0 = time.perf_counter()
    out, report = load_tokenized(path, tok, max_tokens=4096, progress=False)
    dt = time.perf_counter() - t0
    assert len(out) == 2 and report.skipped == {"too_long": 1} and "h.jsonl:2" in report.summary()
    assert "not parsed" in report.summary()
    assert dt < 2, dt
    # A line small enough to parse but with too many characters: refused before tokenizing.
    convs, report = load_conversations(path)  # no max_tokens: parsed
    assert len(convs) == 3
    for overflow in ("skip", "truncate"):
        t0 = time.perf_counter()
        out, report = tokenize_conversations(convs, tok, max_tokens=4096, overflow=overflow, progress=False)
        assert time.perf_counter() - t0 < 2
        assert len(out) == 2 and report.skipped == {"too_long": 1}
        assert "h.jsonl:2" in report.summary() and "not tokenized" in report.summary()
    with pytest.raises(DataError, match=r"h\.jsonl:2: "):
        load_tokenized(path, tok, max_tokens=4096, progress=False, strict=True)
    # the bound is generous: 64 characters per token
    ok = [{**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 20}]}]
    out, report = tokenize_conversations(load_conversations(ok)[0], tok, max_tokens=125, progress=False)
    assert len(out) == 1 and report.ok


def test_turn_markers_typed_in_content_are_counted(tok):
    rows = [GOOD,
            chat(("user", "hi <|end|>\n<|assistant|> yes"), ("assistant", "hello")),
            chat(("user", "hi"), ("assistant", "hello <eos> there")),
            chat(("user", "hi"), ("assistant", "hello"))]
    convs, _ = load_conversations(rows)
    out, report = tokenize_conversations(convs, tok, progress=False)
    assert len(out) == 4 and report.ok  # still used
    assert report.warnings == {"special_token_in_content": 2}
    text = report.summary()
    assert "dataset[1]: message 0 (user) contains '<|end|>' at character 3" in text
    assert "dataset[2]: message 1 (assistant) contains '<eos>'" in text
    with pytest.raises(DataError, match=r"dataset\[1\]: message 0"):
        tokenize_conversations(convs, tok, progress=False, strict=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_word_tokenizer_reloads_exactly_beside_any_model(tmp_path, model_type):
    import pickle

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from refit_fast.model.build import tiny_config

    texts = ["can you hand me the chair ?", "hi , hello there !", "yes no maybe", "<|user|> hi <|end|>", ""]
    tok = build_word_tokenizer(texts)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**tiny_config(model_type, num_hidden_layers=1, vocab_size=len(tok)))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for kw in ({}, {"trust_remote_code": True}):
        back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True, **kw)
        for t in texts:
            assert back(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"], (kw, t)
        assert back.tokenize(texts[0]) == ["can", "you", "hand", "me", "the", "chair", "?"]
        chat_ = [{"role": "user", "content": "can you"}, {"role": "assistant", "content": "hello"}]
        assert back.apply_chat_template(chat_) == tok.apply_chat_template(chat_)
    assert pickle.loads(pickle.dumps(tok)).tokenize(texts[0]) == tok.tokenize(texts[0])
