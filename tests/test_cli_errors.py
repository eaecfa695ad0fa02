"""`refit-fast train` on a bad config, data file or output folder: one `refit-fast train: ...` line on
stderr and exit 1 (no traceback); a real bug keeps its traceback. Issue #12, items 10, 12, 14."""
import json
import os

import pytest

from refit_fast.train.cli import main
from refit_fast.train.config import ConfigError, load_config
from refit_fast.train.loop import NonFiniteLossError

from test_train import MODEL, write_data


def _yaml(tmp_path, data, extra=""):
    model = json.dumps(MODEL)
    p = tmp_path / "run.yaml"
    p.write_text(f"algorithm: sft\ndata: {data}\ntokenizer: word\nmodel:\n  config: {model}\n"
                 "batch: {max_tokens: 96}\nsteps: 1\nlog: {quiet: true, progress: false, tensorboard: false}\n" + extra)
    return str(p)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refit-fast train: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_user_errors_are_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_data(tmp_path / "d.jsonl", n=6)
    cfg = _yaml(tmp_path, data)
    out = f"output_dir={tmp_path / 'out'}"
    (tmp_path / "bad.yaml").write_text("algorithm: sft\n  data: [\n")
    assert "bad.yaml: not valid YAML" in _one_line_error(capsys, [str(tmp_path / "bad.yaml")])
    assert "line 2" in _one_line_error(capsys, [str(tmp_path / "bad.yaml")])
    err = _one_line_error(capsys, ["nope.yaml"])
    assert "'nope.yaml' does not exist" in err and str(tmp_path) in err
    # a missing data file: named, with the directory a relative path was resolved against
    err = _one_line_error(capsys, [cfg, "data=missing.jsonl", out])
    assert "data.path" in err and "'missing.jsonl' does not exist" in err and f"resolved against {tmp_path}" in err
    err = _one_line_error(capsys, [cfg, f"data=[{data}, missing.jsonl]", out])
    assert "data.path[1]" in err and "missing.jsonl" in err
    (tmp_path / "adir").mkdir()
    assert "'adir' is a directory" in _one_line_error(capsys, [cfg, "data=adir", out])
    (tmp_path / "empty.jsonl").write_text("")
    assert "'empty.jsonl' is empty" in _one_line_error(capsys, [cfg, "data=empty.jsonl", out])
    (tmp_path / "blank.jsonl").write_text("\n\n")  # not empty on disk, no row: the trainer says so
    assert "no usable conversation" in _one_line_error(capsys, [cfg, "data=blank.jsonl", out])
    (tmp_path / "afile").write_text("x")
    err = _one_line_error(capsys, [cfg, "output_dir=afile"])
    assert "output_dir" in err and "'afile' is a file" in err
    for over, key in [("optim.lr=1e400", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("epochs=.inf", "epochs"),
                      ("objective.swift_eps=1e999", "objective.swift_eps"), ("optim.betas=[0.9, .nan]", "optim.betas")]:
        err = _one_line_error(capsys, [cfg, over, out])
        assert f"config {key}:" in err, (over, err)
    # data.overlong=error (raised by the trainer as a ValueError)
    err = _one_line_error(capsys, [cfg, "data.overlong=error", "batch.max_tokens=8", out])
    assert "6 training units are longer than batch.max_tokens=8 (data.overlong=error)" in err, err
    assert " tokens), " in err and "and 3 more" in err  # the first three by conversation id, with lengths
    assert not os.path.exists(tmp_path / "out" / "final")


def test_non_finite_loss_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    import refit_fast.train.loop as loop

    cfg = _yaml(tmp_path, write_data(tmp_path / "d.jsonl", n=6))

    def diverge(cfg):
        raise NonFiniteLossError(3, "the loss", float("nan"), None)

    monkeypatch.setattr(loop, "train", diverge)
    assert "step 3: the loss is nan" in _one_line_error(capsys, [cfg])

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(KeyError):
        main([cfg])


def test_resume_accepts_true_false_and_force(tmp_path):
    d = {"data": "x.jsonl", "model": {"config": {}}}
    assert load_config(d).resume is False
    for value, want in [("true", True), ("false", False), ("force", "force"), ("Force", "force"), ("yes", True)]:
        assert load_config(d, [f"resume={value}"]).resume == want, value
    assert load_config({**d, "resume": "force"}).resume == "force"
    assert load_config({**d, "resume": True}).resume is True
    for bad in ("maybe", "2", "[]"):
        with pytest.raises(ConfigError, match="resume"):
            load_config(d, [f"resume={bad}"])


# ---- item 12: weighted_ce's seq_ids as a list or array, like rewards ----


def test_weighted_ce_accepts_seq_ids_as_a_list_or_array():
    import numpy as np
    import torch

    from refit_fast.ops.weighted_ce import weighted_ce

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8), torch.randn(11, 8)
    labels, rewards = torch.tensor([1, 2, 3]), [1.0, 0.2]
    want = weighted_ce(hidden, weight, labels, torch.tensor([0, 0, 1]), rewards, impl="torch")
    for seq_ids in ([0, 0, 1], np.array([0, 0, 1]), (0, 0, 1)):
        got = weighted_ce(hidden, weight, labels, seq_ids, rewards, impl="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in ([0.0, 0.0, 1.0], [0, 1], [[0, 1], [2]], ["a", "b", "c"]):
        with pytest.raises(ValueError, match="seq_ids"):
            weighted_ce(hidden, weight, labels, bad, rewards, impl="torch")


# ---- item 14: final/'s generation_config stops at the end of an assistant turn ----

QWEN_STYLE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_end_of_turn_token_of_word_and_chat_template_tokenizers(tmp_path):
    from transformers import AutoModelForCausalLM

    from refit_fast.data import build_word_tokenizer
    from refit_fast.model import build_model_from_config
    from refit_fast.train.checkpoint import end_of_turn_token_id, save_pretrained_quietly

    convs = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yes"}]]
    tok = build_word_tokenizer(convs)
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("<|end|>")
    qwen = build_word_tokenizer(convs, extra_tokens=["<|im_start|>", "<|im_end|>"])
    qwen.chat_template = QWEN_STYLE
    assert end_of_turn_token_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>")
    qwen.chat_template = None
    assert end_of_turn_token_id(qwen) is None

    model = build_model_from_config({**MODEL, "vocab_size": len(tok)}, seed=0)
    save_pretrained_quietly(model, str(tmp_path / "m"), tokenizer=tok)
    gen = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).generation_config
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    assert gen.pad_token_id == tok.pad_token_id


def test_final_model_generation_stops_at_end_of_turn(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _yaml(tmp_path, write_data(tmp_path / "d.jsonl", n=6))
    assert main([cfg, f"output_dir={tmp_path / 'out'}"]) == 0
    final = str(tmp_path / "out" / "final")
    tok = AutoTokenizer.from_pretrained(final)
    gen = AutoModelForCausalLM.from_pretrained(final).generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.convert_tokens_to_ids("<|end|>") in eos and tok.eos_token_id in eos


# ---- item 15: the README's training commands run in order ----


def _fresh_output_dirs(root, lines, init_from):
    """The commands among `lines` in order; assert no two fresh runs share an output_dir."""
    import shlex

    fresh, n = {}, 0
    for line in lines:
        args = shlex.split(line.split("#", 1)[0])
        if args[:2] == ["refit-fast", "train"]:
            args = args[2:]
        elif args[:1] == ["torchrun"] and "refit_fast.train" in args:
            args = args[args.index("refit_fast.train") + 1:]
        else:
            continue
        n += 1
        # model.init_from names an earlier run's folder: stand in an existing one
        over = [a if not a.startswith("model.init_from=") else f"model.init_from={init_from}" for a in args[1:]]
        cfg = load_config(os.path.join(root, args[0]), over)
        out, settings = cfg.output_dir, {**cfg.to_dict(), "resume": False}
        if not cfg.resume:
            assert out not in fresh, f"{line!r} writes into {out}, as {fresh[out][0]!r} does"
            fresh[out] = (line, settings)
        else:  # continues an earlier run of the list, with that run's settings
            assert out in fresh and fresh[out][1] == settings, f"{line!r} resumes {out} with other settings"
    return n


def test_readme_and_example_commands_use_distinct_output_dirs(tmp_path):
    """Every `refit-fast train` / torchrun line of the README's Training block (and of each example's
    header comment) loads as a config, and no two fresh runs in one list share an output_dir (the second
    would stop at the first one's checkpoints); a resume line continues an earlier run with its
    settings. The README block was also run in order in a fresh
    folder by hand (about 3.5 min on 2 CPU cores)."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    block = text.split("## Training", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert _fresh_output_dirs(root, block.splitlines(), tmp_path) >= 3
    for path in sorted(glob.glob(os.path.join(root, "examples", "*.yaml"))):
        header = [x.lstrip("# ") for x in open(path) if x.startswith("#")]
        _fresh_output_dirs(root, header, tmp_path)
