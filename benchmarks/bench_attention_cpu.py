"""CPU training step: packed rows (refit_fast, old and new SDPA path) against HF's padded batches.

The same conversations, the same model weights, the same loss on the same tokens, timed side by side:

- ``padded``: HF's own path, ``attn_implementation="sdpa"``: groups of conversations in dataset order
  (a fixed number per batch, about ``--row`` tokens, as HF's Trainer batches without length grouping),
  right-padded to the longest, with ``attention_mask``;
- ``packed old``: each group as one packed row through ``refit_fast`` with the CPU SDPA path as it was
  before #15 item 5 (one ``[1, 1, T, T]`` block-diagonal bool mask, ``enable_gqa``), reimplemented here;
- ``packed new``: the current CPU path (block by block, no ``T x T`` mask, GQA via ``enable_gqa``);
- ``packed new, repeat k/v``: the same blocks with k/v repeated to the query heads (to check that rule).

A packed row holds exactly its group's tokens (no tail): both sides see the same tokens, and only HF's
padding differs. A step is forward + backward of the summed next-token cross-entropy over real tokens:
only real tokens' hidden states go through the lm_head on both sides, so the head costs the same and
the body (attention, padding) is what is compared.

Contenders run interleaved (the whole set each, in turn, repeat after repeat) in one process; medians
over repeats. First every contender's loss and gradients are checked against ``padded`` (the warm-up).

Run::

    python benchmarks/bench_attention_cpu.py                 # 1 thread, all three length mixes
    python benchmarks/bench_attention_cpu.py --threads 2 --out benchmarks/results/attention-cpu-2026-12-02.md
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from refit_fast.model import attention as attn_mod
from refit_fast.model import build_model_from_config, packed_hidden_states, prepare_model

MODEL = dict(  # Llama-like, GQA 8 query / 2 kv heads of 64
    model_type="llama", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
)


def old_sdpa(query, key, value, meta, scaling, dropout, sliding_window):
    """The CPU SDPA path before #15 item 5: one dense block-diagonal mask over the row, enable_gqa."""
    kwargs = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=meta.mask(sliding_window), dropout_p=dropout, scale=scaling, **kwargs
    )
    return out.transpose(1, 2)


CONTENDERS = {
    "packed old (T x T mask, enable_gqa)": old_sdpa,
    "packed new (blocks, enable_gqa)": attn_mod._sdpa_blocks,
    "packed new (blocks, repeat k/v)": functools.partial(attn_mod._sdpa_blocks, enable_gqa=False),
}


def lengths_for(mix: str, total: int, gen: torch.Generator) -> list[int]:
    """Conversation lengths (dataset order) summing to at least ``total`` tokens."""
    out = []
    while sum(out) < total:
        if mix == "uniform":  # little padding: 240..272 tokens
            n = int(torch.randint(240, 273, (1,), generator=gen))
        elif mix == "uniform-long":  # little padding, longer conversations: 960..1088 tokens
            n = int(torch.randint(960, 1089, (1,), generator=gen))
        else:  # skewed: lognormal, median ~200 tokens, clipped to [16, 1536]
            n = int(min(1536, max(16, torch.empty(1).log_normal_(5.3, 0.9, generator=gen).item())))
        out.append(n)
    return out


def make_batches(lengths: list[int], batch_size: int, vocab: int, gen: torch.Generator):
    """The same groups of conversations twice: groups of ``batch_size`` in dataset order (HF Trainer's
    default, no length grouping) as HF padded batches, and each group as one packed row of exactly its
    tokens (no tail: how full a packer fills rows is bench_packing's subject, not this one's)."""
    convs = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
    packed, padded = [], []
    for s in range(0, len(convs), batch_size):
        cs = convs[s: s + batch_size]
        ids = torch.cat(cs)
        pos = torch.cat([torch.arange(len(c)) for c in cs])
        cu = torch.tensor([0] + [len(c) for c in cs]).cumsum(0).to(torch.int32)
        # Next-token labels inside each conversation; -100 on each conversation's last token.
        labels = torch.cat([torch.cat([c[1:], torch.tensor([-100])]) for c in cs])
        packed.append((ids, pos, cu, max(len(c) for c in cs), labels))
        lmax = max(len(c) for c in cs)
        p_ids = torch.zeros(len(cs), lmax, dtype=torch.long)
        mask = torch.zeros(len(cs), lmax, dtype=torch.long)
        p_labels = torch.full((len(cs), lmax), -100)
        for b, c in enumerate(cs):
            p_ids[b, : len(c)] = c
            mask[b, : len(c)] = 1
            p_labels[b, : len(c) - 1] = c[1:]
        padded.append((p_ids, mask, p_labels[mask.bool()]))
    return packed, padded


def head_loss(model, hidden_real, labels):
    logits = model.lm_head(hidden_real)
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def step_padded(model, batch):
    ids, mask, labels = batch
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    loss = head_loss(model, hidden[mask.bool()], labels)
    loss.backward()
    return loss.detach()


def step_packed(model, batch, kernel):
    ids, pos, cu, max_len, labels = batch
    saved = attn_mod._sdpa
    attn_mod._sdpa = kernel
    try:
        hidden = packed_hidden_states(model, ids, pos, cu, max_len)
    finally:
        attn_mod._sdpa = saved
    loss = head_loss(model, hidden, labels)
    loss.backward()
    return loss.detach()


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def check_agree(hf, ours, packed, padded):
    """Every contender's loss and gradients over the whole set against HF's padded steps (fp32)."""
    ref_loss = sum(step_padded(hf, b) for b in padded)
    ref = grads(hf)
    for name, kernel in CONTENDERS.items():
        loss = sum(step_packed(ours, b, kernel) for b in packed)
        g = grads(ours)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-2, msg=lambda m: f"{name} loss: {m}")
        for n in ref:
            scale = ref[n].abs().max().clamp_min(1e-6)
            torch.testing.assert_close(g[n] / scale, ref[n] / scale, rtol=0, atol=1e-4,
                                       msg=lambda m: f"{name} {n}: {m}")


PADDED = "padded (HF sdpa, attention_mask)"
MIXES = {"uniform": "lengths 240-272", "uniform-long": "lengths 960-1088",
         "skewed": "lognormal lengths, median ~200, 16-1536"}


def run_mix(mix, args, hf, ours):
    gen = torch.Generator().manual_seed({"uniform": 1, "skewed": 2}.get(mix, 3))
    lengths = lengths_for(mix, args.tokens, gen)
    batch_size = max(1, round(args.row / (sum(lengths) / len(lengths))))  # about a row's tokens per batch
    packed, padded = make_batches(lengths, batch_size, MODEL["vocab_size"], gen)
    check_agree(hf, ours, packed, padded)  # also the warm-up
    fns = {PADDED: lambda: [step_padded(hf, b) for b in padded]}
    fns.update({name: (lambda k=k: [step_packed(ours, b, k) for b in packed]) for name, k in CONTENDERS.items()})
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            hf.zero_grad(set_to_none=True)
            ours.zero_grad(set_to_none=True)
    real = sum(lengths)
    padded_tokens = sum(b[0].numel() for b in padded)
    info = (f"**{mix}** ({MIXES[mix]}): "
            f"{len(lengths)} conversations, {real} tokens. HF: {len(padded)} padded batches of {batch_size}, "
            f"{padded_tokens - real} padding tokens ({(padded_tokens - real) / padded_tokens:.1%}). "
            f"Packed: the same {len(packed)} groups as rows of {min(b[0].numel() for b in packed)}-"
            f"{max(b[0].numel() for b in packed)} tokens, no padding.")
    return info, times, real


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--row", type=int, default=2048, help="about this many tokens per batch / row")
    ap.add_argument("--tokens", type=int, default=2048, help="conversation tokens per timed pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mix", choices=[*MIXES, "all"], default="all")
    ap.add_argument("--out", help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf = build_model_from_config(MODEL, attn_backend=None)
    hf.set_attn_implementation("sdpa")
    ours = prepare_model(build_model_from_config(MODEL, attn_backend=None), "sdpa")  # same seed: same weights
    hf.train()
    ours.train()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
        "",
        f"Model: Llama-like {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} kv heads (head_dim 64), "
        f"MLP {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}, fp32. Step = forward + backward, "
        f"CE over real tokens. Median of {args.repeats} interleaved repeats. Load before: `{load_before}`",
        "",
    ]
    mixes = list(MIXES) if args.mix == "all" else [args.mix]
    for mix in mixes:
        info, raw, real = run_mix(mix, args, hf, ours)
        med = {n: statistics.median(t) for n, t in raw.items()}
        base = med[PADDED]
        lines += [f"{info}", "", "| contender | s per pass (median) | tokens/s | speed-up vs padded | all repeats (s) |",
                  "|---|---|---|---|---|"]
        for name, t in med.items():
            lines.append(f"| {name} | {t:.3f} | {real / t:,.0f} | {base / t:.2f}x | "
                         f"{' '.join(f'{x:.2f}' for x in raw[name])} |")
        lines.append("")
        print("\n".join(lines[-len(med) - 4:]), flush=True)
    lines.append(f"Load after: `{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}`")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
