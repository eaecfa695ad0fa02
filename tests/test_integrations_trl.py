"""RefitTrainer: TRL's SFTTrainer with the Refit / Swift objective, on TRL's tokenization and packing,
checked against the objective written out by hand (full logits, float64, one conversation at a time)."""
import copy
import random

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

from refit_fast.data import build_word_tokenizer, prompt_key_of_messages  # noqa: E402
from refit_fast.integrations.trl import RefitConfig, RefitTrainer, row_weights  # noqa: E402
from refit_fast.model import build_model_from_config, tiny_config  # noqa: E402
from refit_fast.ops import standardize_rewards  # noqa: E402

WORDS = "red blue green small big ball cup box yes no which one is it the a what color size".split()
PROMPTS = ["pick a ball", "which cup", "name a color", "say yes"]


def rows(n=13, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}, {"role": "assistant", "content": reply}]
        if i % 3 == 0:  # some with two assistant turns
            messages += [{"role": "user", "content": rng.choice(WORDS)}, {"role": "assistant", "content": rng.choice(WORDS)}]
        out.append({"messages": messages, "reward": round(rng.random(), 3)})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS + " ".join(PROMPTS).split())


def make_trainer(tmp_path, tokenizer, data, **over):
    model = build_model_from_config(tiny_config("llama", vocab_size=len(tokenizer)), seed=0, attn_backend=None)
    reference = copy.deepcopy(model).double()
    args = RefitConfig(output_dir=str(tmp_path / "out"), report_to=[], max_length=256, assistant_only_loss=True,
                       per_device_train_batch_size=64, max_steps=1, learning_rate=1e-3, use_cpu=True,
                       dataset_num_proc=None, logging_steps=1, save_strategy="no", **over)
    trainer = RefitTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(data),
                           processing_class=tokenizer)
    return trainer, reference


def expected_loss(reference, tokenizer, data, weights):
    """sum_i w_i * (NLL of conversation i's assistant tokens) / (number of those tokens), by hand."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row, w in zip(data, weights):
        enc = tokenizer.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, return_dict=True)
        ids = torch.tensor(enc["input_ids"])
        trained = torch.tensor(enc["assistant_masks"], dtype=torch.bool)[1:]
        logits = reference(input_ids=ids[None]).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
        total = total + w * nll[trained].sum()
        count += int(trained.sum())
    return total / count


def one_batch_loss(trainer):
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch), batch


@pytest.mark.parametrize("algorithm,swift_stats,packing", [("refit", "group", True), ("swift", "group", True),
                                                           ("swift", "group", False), ("swift", "batch", True)])
def test_one_batch_is_the_objective_by_hand(tmp_path, tokenizer, algorithm, swift_stats, packing):
    data = rows()
    trainer, reference = make_trainer(tmp_path, tokenizer, data, algorithm=algorithm, swift_stats=swift_stats,
                                      packing=packing)
    if packing:
        assert len(trainer.train_dataset) < len(data)  # TRL packed them, weights and all
    r = torch.tensor([row["reward"] for row in data], dtype=torch.float64)
    if algorithm == "refit":
        w = r
    elif swift_stats == "group":  # groups: rows sharing a prompt, over the whole data set
        keys = [prompt_key_of_messages(row["messages"]) for row in data]
        groups = torch.tensor([sorted(set(keys)).index(k) for k in keys])
        w = standardize_rewards(r, groups)
    else:  # the batch (all rows here)
        w = standardize_rewards(r)
    loss, batch = one_batch_loss(trainer)
    assert "refit_weight" in batch
    torch.testing.assert_close(loss.double(), expected_loss(reference, tokenizer, data, w), rtol=2e-5, atol=1e-6)


def test_all_weights_one_is_sfttrainers_loss(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    data = [dict(row, reward=1.0) for row in rows(seed=3)]
    trainer, reference = make_trainer(tmp_path, tokenizer, data, packing=True)
    loss, _ = one_batch_loss(trainer)
    model = build_model_from_config(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)  # packed varlen attention
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], max_length=256,
                                                 assistant_only_loss=True, packing=True, use_cpu=True),
                     train_dataset=datasets.Dataset.from_list([{"messages": r["messages"]} for r in data]),
                     processing_class=tokenizer)
    batch = sft.data_collator([sft.train_dataset[i] for i in range(len(sft.train_dataset))])
    batch["cu_seqlens"], batch["max_seqlen"] = batch.pop("cu_seq_lens_q"), int(batch.pop("max_length_q"))
    for k in ("cu_seq_lens_k", "max_length_k", "seq_idx"):
        batch.pop(k)
    with torch.no_grad():
        theirs = sft.compute_loss(sft.model, batch)
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-6)


def test_training_runs_and_saves(tmp_path, tokenizer):
    trainer, _ = make_trainer(tmp_path, tokenizer, rows(), algorithm="swift", packing=True)
    trainer.args.max_steps = 3
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "config.json").exists()


def test_bad_settings_are_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="algorithm"):
        RefitConfig(output_dir=str(tmp_path), algorithm="ppo", report_to=[])
    with pytest.raises(ValueError, match="no 'score' column"):
        row_weights(rows(), RefitConfig(output_dir=str(tmp_path), reward_column="score", report_to=[], use_cpu=True))
    with pytest.raises(TypeError, match="RefitConfig"):
        RefitTrainer(model=None, args=None)
