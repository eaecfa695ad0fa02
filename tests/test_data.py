"""refit_fast.data: loading, validation, chat-template masks, the validate CLI. No downloads: the
tokenizers are trained here in memory."""
from __future__ import annotations

import gzip
import json
import random
import time

import numpy as np
import pytest

from refit_fast.data import (
    DataError,
    END_OF_TURN,
    assistant_spans,
    build_word_tokenizer,
    load_conversations,
    load_tokenized,
    tokenize_conversations,
)
from refit_fast.data import validate

WORDS = [f"w{i}" for i in range(300)] + ["what", "is", "the", "answer", "?", "yes", ",", "no", "."]


def chat(*turns, **extra):
    """chat(("user", "hi"), ("assistant", "hello")) -> a row dict."""
    msgs = [{"role": r, "content": c, **(x[0] if x else {})} for r, c, *x in turns]
    return {"messages": msgs, "reward": 1.0, **extra}


def random_rows(n, seed=0, max_pairs=3, max_words=12):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "you answer questions ."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, max_pairs)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))})
        assistant = [m for m in msgs if m["role"] == "assistant"]
        if len(assistant) > 1 and rng.random() < 0.3:  # keep at least one trained turn
            rng.choice(assistant)["train"] = False
        rows.append({"id": f"c{i}", "messages": msgs, "reward": rng.uniform(-1, 1)})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([" ".join(WORDS), "you answer questions . hi hello there fine bye see you"])


def _bpe_tokenizer(template):
    """A byte-level BPE tokenizer (GPT-2 style: spaces glued to the next word) with a ChatML-like
    template and no {% generation %} markers: the hard case for turn spans."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    corpus = [" ".join(WORDS)] * 3 + ["Assistant: User: hello there system user assistant\n"]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def masked_pieces(tokenizer, t):
    """Decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(t.input_ids.tolist(), t.loss_mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tokenizer.decode(r) for r in runs]


# --- the tokenizer ----------------------------------------------------------------------------


def test_word_tokenizer_chat_template_and_roundtrip(tok, tmp_path):
    msgs = [{"role": "user", "content": "hi there ?"}, {"role": "assistant", "content": "hello"}]
    out = tok.apply_chat_template(msgs, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5: BatchEncoding; 4.x: list
    assert tok.convert_ids_to_tokens(ids) == [
        "<bos>", "<|user|>", "hi", "there", "?", "<|end|>", "<|assistant|>", "hello", "<|end|>"]
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|assistant|>")
    assert tok.convert_tokens_to_ids(END_OF_TURN) != tok.unk_token_id
    assert tok("zzz")["input_ids"] == [tok.unk_token_id]
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_word_tokenizer_options():
    t = build_word_tokenizer(["Hello World"], lowercase=True, extra_tokens=["<|tool_call|>"])
    assert t.convert_ids_to_tokens(t("HELLO <|tool_call|> world")["input_ids"]) == ["hello", "<|tool_call|>", "world"]


# --- masks ------------------------------------------------------------------------------------


def test_mask_covers_exactly_assistant_content_and_end_token(tok):
    row = chat(("system", "you answer questions ."), ("user", "hi"), ("assistant", "hello there"),
               ("user", "what is the answer ?"), ("assistant", "yes , no ."))
    convs, _ = load_conversations([row])
    [t], report = tokenize_conversations(convs, tok, progress=False)
    assert report.ok and t.input_ids.dtype == np.int64 and t.loss_mask.dtype == np.uint8
    toks = tok.convert_ids_to_tokens(t.input_ids.tolist())
    assert [x for x, m in zip(toks, t.loss_mask) if m] == ["hello", "there", END_OF_TURN, "yes", ",", "no", ".", END_OF_TURN]
    # the role header of each assistant turn is context, not a target
    assert all(m == 0 for x, m in zip(toks, t.loss_mask) if x == "<|assistant|>")
    assert t.loss_mask[0] == 0 and t.num_trained == 8


@pytest.mark.parametrize("exact", [False, True])
def test_masks_match_transformers_generation_markers(tok, exact):
    rows = random_rows(300, seed=1)
    for r in rows:  # the HF mask knows nothing of train: false
        for m in r["messages"]:
            m.pop("train", None)
    convs, _ = load_conversations(rows)
    out, report = tokenize_conversations(convs, tok, progress=False, exact_prefix=exact, batch_size=64)
    assert report.ok and len(out) == 300
    for c, t in zip(convs, out):
        ref = tok.apply_chat_template(c.messages, return_dict=True, return_assistant_tokens_mask=True)
        assert ref["input_ids"] == t.input_ids.tolist()
        assert ref["assistant_masks"] == t.loss_mask.tolist()


def test_template_without_generation_markers_bpe(tmp_path):
    bpe = _bpe_tokenizer(CHATML)
    rows = random_rows(200, seed=2)
    convs, _ = load_conversations(rows)
    fast, r1 = tokenize_conversations(convs, bpe, progress=False)
    exact, r2 = tokenize_conversations(convs, bpe, progress=False, exact_prefix=True)
    assert r1.ok and r2.ok and len(fast) == len(exact) == 200
    for c, a, b in zip(convs, fast, exact):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        direct = bpe.apply_chat_template(c.messages, tokenize=True)
        assert a.input_ids.tolist() == (direct["input_ids"] if hasattr(direct, "keys") else direct)
        want = [m["content"] + "<|im_end|>\n" for m, t in zip(c.messages, c.train) if t]
        # adjacent trained turns never merge: the next turn's header sits between them
        assert masked_pieces(bpe, a) == want


def test_per_message_exclusion(tok):
    row = chat(("user", "hi"), ("assistant", "hello", {"train": False}), ("user", "bye"), ("assistant", "see you"))
    convs, _ = load_conversations([row])
    [t], _ = tokenize_conversations(convs, tok, progress=False)
    toks = tok.convert_ids_to_tokens(t.input_ids.tolist())
    assert "hello" in toks  # the excluded turn is still context
    assert [x for x, m in zip(toks, t.loss_mask) if m] == ["see", "you", END_OF_TURN]
    ids, spans = assistant_spans(convs[0].messages, tok)
    assert ids == t.input_ids.tolist() and len(spans) == 2


def test_prefix_property_violation_is_reported_not_masked(tok):
    # A template that renders the final assistant turn differently from earlier ones (like
    # templates that drop earlier turns' reasoning): prefixes disagree with the whole conversation.
    bad = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
           "<|assistant|> ... <|end|>{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    row = chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "see you"))
    convs, _ = load_conversations([row, chat(("user", "hi"), ("assistant", "hello"))])
    for exact in (False, True):
        out, report = tokenize_conversations(convs, tok, chat_template=bad, progress=False, exact_prefix=exact)
        assert len(out) == 1 and report.skipped == {"template_mismatch": 1}
        assert "dataset[0]" in report.summary() and "assistant message 1" in report.summary()
    with pytest.raises(DataError, match="dataset\\[0\\].*template_mismatch"):
        tokenize_conversations(convs, tok, chat_template=bad, progress=False, strict=True)
    with pytest.raises(ValueError, match="assistant message 1"):
        assistant_spans(row["messages"], tok, chat_template=bad)


def test_space_ending_generation_prompt_is_caught():
    # "Assistant: " then content: byte-level BPE glues the space to the first word (" hello") in the
    # conversation but leaves it alone in the prompt, so the token prefix property fails. The offsets
    # alone look clean here (they trim the space): this must not be accepted silently.
    tpl = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
           "Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}Assistant: {% endif %}")
    bpe = _bpe_tokenizer(tpl)
    convs, _ = load_conversations([chat(("user", "hello"), ("assistant", "hello there"))])
    for exact in (False, True):
        out, report = tokenize_conversations(convs, bpe, progress=False, exact_prefix=exact)
        assert out == [] and report.skipped == {"template_mismatch": 1}


def test_template_error_is_located(tok):
    tpl = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
           "<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [chat(("user", "hi"), ("assistant", "hello")), chat(("user", "boom"), ("assistant", "hello"))]
    out, report = tokenize_conversations(load_conversations(rows)[0], tok, chat_template=tpl, progress=False)
    assert len(out) == 1 and report.skipped == {"template_error": 1}
    assert "dataset[1]" in report.summary() and "no boom" in report.summary()


def test_max_tokens_skip_and_truncate(tok):
    rows = [chat(("user", "hi"), ("assistant", "hello there yes no")), chat(("user", "hi"), ("assistant", "yes"))]
    convs, _ = load_conversations(rows)
    # lengths: 10 and 7 tokens (<bos> <|user|> hi <|end|> <|assistant|> ... <|end|>)
    out, report = tokenize_conversations(convs, tok, max_tokens=7, progress=False)
    assert len(out) == 1 and report.skipped == {"too_long": 1}
    out, report = tokenize_conversations(convs, tok, max_tokens=7, overflow="truncate", progress=False)
    assert [len(t.input_ids) for t in out] == [7, 7] and report.warnings == {"truncated": 1}
    assert tok.convert_ids_to_tokens(out[0].input_ids[out[0].loss_mask == 1].tolist()) == ["hello", "there"]
    out, report = tokenize_conversations(convs, tok, max_tokens=5, overflow="truncate", progress=False)
    assert out == [] and report.skipped == {"empty_mask": 2}  # cut before any assistant token


def test_prompt_key(tok):
    a = chat(("system", "s"), ("user", "hi"), ("assistant", "x"))
    b = chat(("system", "s"), ("user", "hi"), ("assistant", "y"), ("user", "more"), ("assistant", "z"))
    c = chat(("system", "t"), ("user", "hi"), ("assistant", "x"))
    out, _ = load_tokenized([a, b, c], tok, progress=False)
    assert out[0].prompt_key == out[1].prompt_key != out[2].prompt_key


def test_group_field_is_carried_through_tokenization(tok):
    rows = [chat(("user", "hi"), ("assistant", "x"), group=7), chat(("user", "hello"), ("assistant", "y"), group="7"),
            chat(("user", "hi"), ("assistant", "z")), chat(("user", "hi"), ("assistant", "w"), task="t1"),
            {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "reward": 0.5, "group": "a"},
            chat(("user", "hi"), ("assistant", "x"), group=None)]
    out, report = load_tokenized(rows, tok, progress=False)
    assert report.ok and [t.group for t in out] == ["7", "7", None, None, "a", None]  # 7 and "7": one group, like ids
    out, _ = load_tokenized(rows, tok, progress=False, group_key="task")
    assert [t.group for t in out] == [None, None, None, "t1", None, None]
    bad = [chat(("user", "hi"), ("assistant", "x"), group=v) for v in (1.5, True, [1], {"a": 1})]
    convs, report = load_conversations(bad)
    assert convs == [] and report.skipped == {"bad_group": 4}
    with pytest.raises(DataError, match=r"dataset\[0\]: 'group' must be a string or integer"):
        load_conversations(bad, strict=True)


# --- loading and validation ---------------------------------------------------------------------

BAD_LINES = {
    "malformed_json": '{"messages": [}',
    "not_an_object": "[1, 2]",
    "missing_messages": '{"reward": 1.0}',
    "bad_messages": '{"messages": [{"role": "user"}], "reward": 1}',
    "unknown_role": '{"messages": [{"role": "robot", "content": "x"}], "reward": 1}',
    "bad_train_flag": '{"messages": [{"role": "assistant", "content": "x", "train": "no"}], "reward": 1}',
    "empty_conversation": '{"messages": [], "reward": 1}',
    "no_assistant_turn": '{"messages": [{"role": "user", "content": "x"}], "reward": 1}',
    "no_trained_turn": '{"messages": [{"role": "assistant", "content": "x", "train": false}], "reward": 1}',
    "missing_reward": '{"messages": [{"role": "assistant", "content": "x"}]}',
    "bad_reward": '{"messages": [{"role": "assistant", "content": "x"}], "reward": "0.7"}',
    "non_finite_reward": '{"messages": [{"role": "assistant", "content": "x"}], "reward": NaN}',
    "bad_id": '{"id": [1], "messages": [{"role": "assistant", "content": "x"}], "reward": 1}',
    "bad_tokens": '{"input_ids": [1, 2, 3], "loss_mask": [0, 1], "reward": 1}',
}
GOOD = json.dumps(chat(("user", "hi"), ("assistant", "hello")))


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_row_is_reported_with_its_line(tmp_path, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, "", BAD_LINES[reason], GOOD])
    convs, report = load_conversations(path)
    assert len(convs) == 2 and report.total == 3 and report.skipped == {reason: 1}
    assert f"c.jsonl:3" in report.summary()
    with pytest.raises(DataError) as e:
        load_conversations(path, strict=True)
    assert str(e.value).startswith(f"{path}:3: ") and e.value.reason == reason


def test_other_bad_values():
    rows = [
        {"messages": [{"role": "assistant", "content": "x"}], "reward": float("inf")},
        {"messages": [{"role": "assistant", "content": "x"}], "reward": True},
        {"messages": [{"role": "assistant", "content": "x"}], "reward": None},
        {"messages": [{"role": "assistant", "content": None}], "reward": 1},
        {"messages": "hello", "reward": 1},
        {"input_ids": [1, 2], "loss_mask": [0, 2], "reward": 1},
        {"input_ids": [[1, 2]], "loss_mask": [[0, 1]], "reward": 1},
    ]
    convs, report = load_conversations(rows)
    assert convs == [] and report.skipped == {"non_finite_reward": 1, "bad_reward": 1, "missing_reward": 1,
                                              "bad_messages": 2, "bad_tokens": 2}


def test_malformed_utf8_is_one_bad_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "\xff\xfe"}\n' + GOOD.encode() + b"\n")
    convs, report = load_conversations(path)
    assert len(convs) == 2 and report.skipped == {"malformed_json": 1}


def test_keys_ids_roles_and_several_files(tmp_path):
    row = {"conv": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                    {"role": "assistant", "content": "hello"}], "score": 3, "uid": 7}
    a = write_jsonl(tmp_path / "a.jsonl", [row, row])
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt") as f:
        f.write(json.dumps({**row, "uid": "x"}) + "\n")
    _, report = load_conversations([a, b], messages_key="conv", reward_key="score")
    assert report.skipped == {"unknown_role": 3}  # "tool" is not allowed by default
    convs, report = load_conversations([a, b], messages_key="conv", reward_key="score", id_key="uid",
                                       roles=("system", "user", "assistant", "tool"))
    assert [c.id for c in convs] == ["7", "7", "x"] and report.warnings == {"duplicate_id": 1}
    assert convs[0].reward == 3.0 and isinstance(convs[0].reward, float)
    convs, _ = load_conversations(a, messages_key="conv", reward_key="score", roles=("user", "assistant", "tool"))
    assert [c.id for c in convs] == ["a.jsonl:1", "a.jsonl:2"]  # default ids say where a row came from


def test_dataset_like_source_and_datasetdict_error(tok):
    class FakeDataset:  # what load_conversations needs of a datasets.Dataset
        column_names = ["messages", "reward"]

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __iter__(self):
            return iter(self.rows)

    ds = FakeDataset([chat(("user", "hi"), ("assistant", "hello")), {"messages": [], "reward": 1}])
    out, report = load_tokenized(ds, tok, progress=False)
    assert len(out) == 1 and out[0].id == "row0" and report.skipped == {"empty_conversation": 1}
    with pytest.raises(TypeError, match="pass one split"):
        load_conversations({"train": ds, "test": ds})


def test_pretokenized_rows(tok):
    rows = [{"input_ids": [2, 5, 10, 11], "loss_mask": [0, 0, 1, 1], "reward": 0.5, "id": "p"},
            {"input_ids": [2, 10**6], "loss_mask": [0, 1], "reward": 0.5},
            {"input_ids": [2, 5], "loss_mask": [0, 0], "reward": 0.5},
            {"input_ids": [2, 5], "loss_mask": [1, 1], "reward": 0.5}]
    out, report = load_tokenized(rows, tok, progress=False)
    assert [t.id for t in out] == ["p", "row3"]
    assert out[0].input_ids.tolist() == [2, 5, 10, 11] and out[0].loss_mask.tolist() == [0, 0, 1, 1]
    assert out[1].loss_mask.tolist() == [0, 1]
    assert report.skipped == {"bad_tokens": 1, "empty_mask": 1} and report.warnings == {"first_token_trained": 1}


def test_load_tokenized_one_report_and_options(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, BAD_LINES["missing_reward"],
                                              json.dumps(chat(("user", "hi"), ("assistant", "yes no yes no")))])
    out, report = load_tokenized(path, tok, max_tokens=8, progress=False)
    assert len(out) == 1 and report.total == 3 and report.kept == 1
    assert report.skipped == {"missing_reward": 1, "too_long": 1}
    with pytest.raises(TypeError, match="unknown options"):
        load_tokenized(path, tok, max_token=8)
    with pytest.raises(DataError, match="c.jsonl:2"):
        load_tokenized(path, tok, strict=True, progress=False)


# --- the validate command -------------------------------------------------------------------------


def test_validate_cli(tmp_path, tok, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, BAD_LINES["non_finite_reward"], *map(json.dumps, random_rows(20))])
    assert validate.main([str(path)]) == 1  # a row was skipped
    out = capsys.readouterr().out
    assert "22 rows: 21 kept, 1 skipped" in out and "non_finite_reward: 1" in out and "c.jsonl:2" in out
    assert "reward: mean" in out and "characters: mean" in out and "tokens" not in out

    tok.save_pretrained(tmp_path / "tok")
    assert validate.main([str(path), "--tokenizer", str(tmp_path / "tok"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "tokens: mean" in out and "trained tokens: mean" in out and "total tokens:" in out

    assert validate.main([str(path), "--strict"]) == 1
    assert "c.jsonl:2" in capsys.readouterr().err

    from refit_fast import cli  # the dispatcher reaches the same main

    assert cli.main(["validate", str(path), "--reward-key", "score"]) == 1  # every row lacks "score"
    assert "missing_reward: 22" in capsys.readouterr().out


# --- scale ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_100k_conversations_with_progress_bar(tmp_path, tok, capsys):
    path = write_jsonl(tmp_path / "big.jsonl", random_rows(100_000, seed=3, max_pairs=2, max_words=12))
    t0 = time.perf_counter()
    out, report = load_tokenized(path, tok, progress=True)
    dt = time.perf_counter() - t0
    assert report.ok and len(out) == 100_000
    assert "100000/100000" in capsys.readouterr().err  # the tqdm bar ran to the end
    tokens = sum(t.num_tokens for t in out)
    print(f"\n100k conversations, {tokens} tokens: {dt:.1f} s ({len(out) / dt:.0f} conv/s)")
    assert dt < 120


QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             "{% endif %}" + CHATML)
LLAMA3_LIKE = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: 2023\n\n"
               "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<|eot_id|>"
               "{% for m in messages %}{% if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
               "\n\n{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_a_default_system_prompt_is_reported_with_counts():
    from refit_fast.data.tokenization import default_system_prompt

    bpe = _bpe_tokenizer(QWEN_LIKE)
    assert default_system_prompt(bpe) == "<|im_start|>system\nYou are a helpful assistant."
    assert "system<|end_header_id|>\n\nCutting Knowledge Date" in default_system_prompt(bpe, LLAMA3_LIKE)
    assert default_system_prompt(bpe, CHATML) is None  # a system block only when the chat has one
    rows = [chat(("user", "hello"), ("assistant", "hello there")), chat(("user", "hi"), ("assistant", "there")),
            chat(("system", "be brief"), ("user", "hello"), ("assistant", "hello"))]
    out, report = tokenize_conversations(load_conversations(rows)[0], bpe, progress=False)
    assert len(out) == 3 and report.warnings.get("default_system_prompt") == 2  # kept, and counted
    assert "You are a helpful" in report.summary()
    out, report = tokenize_conversations(load_conversations(rows)[0], bpe, chat_template=CHATML, progress=False)
    assert "default_system_prompt" not in report.warnings


# --- templates that break the prefix property: checked per-turn masks -------------------------------

# Qwen3-like: earlier assistant turns lose their <think> block, every content is trimmed.
DROPS_THINKING = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                  "<|im_start|>assistant\n{{ m['content'].split('</think>')[-1] | trim }}<|im_end|>\n"
                  "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bpe_gluing_newline_space():
    """Byte-level BPE that learned the merge 'Ċ' + 'Ġ' (newline then space), as SmolLM2's has: content
    starting with two spaces after the header's newline tokenizes as 'ĊĠ' 'Ġhello'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    corpus = [" ".join(WORDS)] * 3 + ["user\n  hello there\n assistant\n  there\n"] * 3
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def _marked(tokenizer, t):
    return list(zip(tokenizer.convert_ids_to_tokens(t.input_ids.tolist()), t.loss_mask.tolist()))


def test_per_turn_mask_for_content_starting_with_spaces():
    bpe = _bpe_gluing_newline_space()
    rows = [chat(("user", "hello"), ("assistant", "  hello there"), ("user", "w1"), ("assistant", "w2 w3"))]
    out, report = tokenize_conversations(load_conversations(rows)[0], bpe, progress=False)
    assert len(out) == 1 and report.skipped == {} and report.warnings == {"per_turn_mask": 1}
    assert "dataset[0]" in report.summary() and "message 1 exact, message 3 exact" in report.summary()
    # by hand: 'ĊĠ' holds the header's newline and the content's first space: context, not target
    assert _marked(bpe, out[0]) == [
        ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("hel", 0), ("lo", 0), ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("as", 0), ("sistan", 0), ("t", 0), ("ĊĠ", 0),
        ("Ġhello", 1), ("Ġthere", 1), ("<|im_end|>", 1), ("Ċ", 1),
        ("<|im_start|>", 0), ("user", 0), ("Ċ", 0), ("w", 0), ("1", 0), ("<|im_end|>", 0), ("Ċ", 0),
        ("<|im_start|>", 0), ("as", 0), ("sistan", 0), ("t", 0), ("Ċ", 0),
        ("w", 1), ("2", 1), ("Ġw", 1), ("3", 1), ("<|im_end|>", 1), ("Ċ", 1)]
    assert out[0].input_ids.tolist() == bpe.apply_chat_template(rows[0]["messages"], tokenize=True,
                                                                return_dict=True)["input_ids"]


def test_per_turn_mask_for_a_template_dropping_earlier_reasoning():
    bpe = _bpe_tokenizer(DROPS_THINKING)
    rows = [chat(("user", "hello"), ("assistant", "<think>w5 w6</think>\n\nhello there"), ("user", "w1"),
                 ("assistant", "<think>w7</think> w2 w3 ")),
            chat(("user", "hello"), ("assistant", "there"))]  # one turn: the exact path
    out, report = tokenize_conversations(load_conversations(rows)[0], bpe, progress=False)
    assert len(out) == 2 and report.skipped == {}
    assert report.warnings == {"per_turn_mask": 1, "assistant_text_dropped": 1}
    s = report.summary()
    assert "message 1 as its last 11 characters, message 3 trimmed" in s and "without '<think>w5 w6</think>\\n\\n'" in s
    text = bpe.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert text.count("hello there<|im_end|>") == 1 and "w5" not in text  # what the model sees is what is trained
    # by hand: the rendered text of each turn and its end of turn, never the headers or user turns
    assert masked_pieces(bpe, out[0]) == ["hello there<|im_end|>\n", "<think>w7</think> w2 w3<|im_end|>\n"]
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    want = np.zeros(len(ids), dtype=np.uint8)
    for piece in ("hello there<|im_end|>\n", "<think>w7</think> w2 w3<|im_end|>\n"):
        a = text.index(piece)
        lo = len(bpe(text[:a], add_special_tokens=False)["input_ids"])
        hi = len(bpe(text[:a + len(piece)], add_special_tokens=False)["input_ids"])
        want[lo:hi] = 1  # both boundaries are token boundaries here (a special token / after 'Ċ')
    assert out[0].input_ids.tolist() == ids and out[0].loss_mask.tolist() == want.tolist()
    # train: false on the rewritten turn: only the last one is trained
    rows[0]["messages"][1]["train"] = False
    [t, _], report = tokenize_conversations(load_conversations(rows)[0], bpe, progress=False)
    assert masked_pieces(bpe, t) == ["<think>w7</think> w2 w3<|im_end|>\n"]


def test_assistant_spans_fall_back_to_per_turn_spans():
    """Where the prefix property fails, assistant_spans gives the spans tokenize_conversations trains
    (turn by turn, checked) and says so with a warning, instead of refusing."""
    cases = ((_bpe_gluing_newline_space(), [chat(("user", "hello"), ("assistant", "  hello there"), ("user", "w1"),
                                                 ("assistant", "w2 w3"))]),
             (_bpe_tokenizer(DROPS_THINKING), [chat(("user", "hello"), ("assistant", "<think>w5</think>\n\nhello there"),
                                                    ("user", "w1"), ("assistant", "w2 w3"))]))
    for tokenizer, rows in cases:
        [t], report = tokenize_conversations(load_conversations(rows)[0], tokenizer, progress=False)
        assert report.warnings.get("per_turn_mask") == 1
        with pytest.warns(UserWarning, match="located turn by turn"):
            ids, spans = assistant_spans(rows[0]["messages"], tokenizer)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans:
            mask[a:b] = 1
        assert len(spans) == 2 and ids == t.input_ids.tolist() and mask.tolist() == t.loss_mask.tolist()


def test_trimming_template_masks_the_trimmed_content():
    trim = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    bpe = _bpe_tokenizer(trim)
    rows = [chat(("user", " hello "), ("assistant", "  hello there \n"), ("user", "w1"), ("assistant", " w2"))]
    convs, _ = load_conversations(rows)
    out, report = tokenize_conversations(convs, bpe, progress=False)
    assert report.ok and report.warnings == {}  # trimming keeps the prefix property: the exact path
    assert masked_pieces(bpe, out[0]) == ["hello there<|im_end|>\n", "w2<|im_end|>\n"]
    # the per-turn path, run on the same conversation, finds the same mask and says the turns were trimmed
    from refit_fast.data.tokenization import _ChatEncoder, _per_turn_mask

    enc = _ChatEncoder(bpe, trim)
    text = enc.render([convs[0].messages], False)[0]
    [(ids, offsets)] = enc.encode_with_offsets([text])
    mask, notes = _per_turn_mask(convs[0], [1, 3], enc, text, ids, offsets)
    assert mask.tolist() == out[0].loss_mask.tolist()
    assert [(k, how) for k, how, _ in notes] == [(1, "trimmed"), (3, "trimmed")]


def test_per_turn_mask_equals_the_exact_path_where_both_work(tok):
    from refit_fast.data.tokenization import _ChatEncoder, _per_turn_mask

    for tokenizer, template in ((_bpe_tokenizer(CHATML), CHATML), (tok, tok.chat_template)):
        convs, _ = load_conversations(random_rows(60, seed=5))
        out, report = tokenize_conversations(convs, tokenizer, progress=False)
        assert report.ok and not report.warnings
        enc = _ChatEncoder(tokenizer, template)
        for c, t in zip(convs, out):
            text = enc.render([c.messages], False)[0]
            [(ids, offsets)] = enc.encode_with_offsets([text])
            mask, notes = _per_turn_mask(c, [k for k, x in enumerate(c.train) if x], enc, text, ids, offsets)
            assert mask is not None, notes
            assert list(ids) == t.input_ids.tolist() and mask.tolist() == t.loss_mask.tolist()
            assert all(how == "exact" for _, how, _ in notes)


def test_turns_that_cannot_be_located_are_still_skipped(tok):
    bpe = _bpe_tokenizer(CHATML)
    rows = [chat(("user", "hello"), ("assistant", "hello there"), ("user", "w1"), ("assistant", "w2 w3"))]
    convs, _ = load_conversations(rows)
    earlier = "{% if m['role'] == 'assistant' and not loop.last %}"
    cases = {  # template -> what the report says
        # an earlier turn rewritten (not trimmed, not shortened): cannot be checked
        CHATML.replace("{{ m['content'] }}", earlier + "{{ m['content'] | replace('there', 'w9') }}{% else %}"
                       "{{ m['content'] }}{% endif %}"): "renders it as 'hello w9', not its content",
        # content rendered twice
        CHATML.replace("{{ m['content'] }}", earlier + "{{ m['content'] }} {{ m['content'] }}{% else %}"
                       "{{ m['content'] }}{% endif %}"): "does not render its content once",
        # an earlier turn's end of turn differs from the one written when it ends the chat
        CHATML.replace("{{ m['content'] }}<|im_end|>", earlier + "{{ m['content'] }}<|endoftext|>{% else %}"
                       "{{ m['content'] }}<|im_end|>{% endif %}"): "is not the end of turn",
    }
    for template, says in cases.items():
        out, report = tokenize_conversations(convs, bpe, chat_template=template, progress=False)
        assert out == [] and report.skipped == {"template_mismatch": 1} and not report.warnings, template
        assert "per-turn masking failed" in report.summary() and says in report.summary(), report.summary()
        with pytest.raises(DataError, match="template_mismatch"):
            tokenize_conversations(convs, bpe, chat_template=template, progress=False, strict=True)
    # a tokenizer without offsets (slow, or the public path) cannot be checked turn by turn
    from refit_fast.data.tokenization import _ChatEncoder, _per_turn_mask

    enc = _ChatEncoder(bpe, CHATML)
    enc.backend = None
    assert _per_turn_mask(convs[0], [1, 3], enc, "", [], None) == (None, "it needs a fast tokenizer's token offsets")
    # a token holding both the header's text and the content's stays a mismatch (see the space-ending test)
    tpl = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
           "Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}Assistant: {% endif %}")
    out, report = tokenize_conversations(load_conversations([chat(("user", "hello"), ("assistant", "hello there"))])[0],
                                         _bpe_tokenizer(tpl), progress=False)
    assert out == [] and "holds both this turn's text and the text next to it" in report.summary()
