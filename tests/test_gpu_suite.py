"""The GPU suite's CPU-side logic: it refuses to measure without CUDA, and renders a results JSON
(here a synthetic sample) into the markdown tables and the plot."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "gpu_suite_sample.json"


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_suite_refuses_without_cuda(capsys):
    assert _load("run_gpu_suite").main(["--parts", "loss"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_loss_bench_refuses_without_cuda(capsys):
    assert _load("bench_weighted_ce").main(["--n", "16"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_renders_sample_json(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    suite = _load("run_gpu_suite")
    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    md = suite.write_all(json.loads(SAMPLE.read_text()), "sample").read_text()
    assert "Sample GPU" in md and "## Loss kernel" in md and "## Trainer step" in md and "## Long context" in md
    assert "| refit_fast | 16384 | 4096 | 128256 | 110.00 |" in md
    assert "| naive_torch | 65536 | 4096 | 128256 | OOM |" in md
    assert "Speed-up: 1.60x tokens/s." in md
    assert "| 65536 | 60.0 GiB, 6.00 s | OOM |" in md
    png = tmp_path / "sample.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "sample.json").read_text())["environment"]["device"] == "Sample GPU"


def test_synthetic_conversations_look_like_chat():
    suite = _load("run_gpu_suite")
    convs = suite.synthetic_conversations(300, 1000, seed=3, cap=4096)
    lengths = sorted(len(ids) for ids, _ in convs)
    assert 300 < lengths[150] < 1200 and lengths[-1] <= 4096
    for ids, mask in convs:
        assert len(ids) == len(mask) and mask[0] == 0 and 0 < mask.mean() < 1 and ids.max() < 1000
    batches = suite.padded_batches(convs[:50], 8192)
    assert sum(len(b["input_ids"]) for b in batches) == 50
    assert all(b["input_ids"].numel() <= 8192 or len(b["input_ids"]) == 1 for b in batches)


def test_trainer_and_long_context_parts_run_on_cpu_with_a_tiny_model(monkeypatch):
    """The GPU parts' code paths (packing, our step, the HF padded step, long rows) on CPU with a tiny
    Llama in place of the 1B one: catches bugs before a GPU session spends device time on them."""
    import argparse

    suite = _load("run_gpu_suite")
    monkeypatch.setattr(suite, "DEVICE", "cpu")
    monkeypatch.setattr(suite, "LLAMA_1B", dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=1024, tie_word_embeddings=True))
    args = argparse.Namespace(row_tokens=256, trainer_convs=20, warmup=1, iters=2, long_t=[128, 256])
    trainer = suite.part_trainer(args)
    assert [r["method"].split(" ")[0] for r in trainer["rows"]] == ["refit_fast", "Hugging"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["tokens_per_step"] <= 256 for r in trainer["rows"])
    long = suite.part_long_context(args)
    assert [(r["method"], r["T"], r["status"]) for r in long["rows"]] == [
        ("refit_fast", 128, "ok"), ("hf", 128, "ok"), ("refit_fast", 256, "ok"), ("hf", 256, "ok")]
