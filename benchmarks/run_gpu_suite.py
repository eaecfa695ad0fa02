"""The GPU benchmark suite: one command, every number we quote, side by side in one process.

    python benchmarks/run_gpu_suite.py                  # all parts (~8 min on an H100)
    python benchmarks/run_gpu_suite.py --parts loss     # one part: loss | trainer | long_context
    python benchmarks/run_gpu_suite.py --from-json benchmarks/results/X.json   # re-render md + png (CPU ok)

Parts:
  loss          weighted_ce forward+backward, bf16, D=4096 V=128256 at N=4k/16k/64k and Gemma-like
                D=2304 V=256000, against naive PyTorch, torch.compile, Liger and Cut Cross-Entropy
                (see bench_weighted_ce.py for the method);
  trainer       one optimizer step of a randomly initialized 1B-class Llama on packed rows (our model
                body + weighted_ce) against the same model trained the usual Hugging Face way
                (padded batches, `labels=` loss), on the same conversations: tokens/s, peak memory;
  long_context  the largest packed row (8k..64k tokens) that trains (fwd+bwd+AdamW, gradient
                checkpointing) with refit_fast vs the Hugging Face loss, 1B config, 128k vocabulary.

Writes benchmarks/results/<device>-<date>.json, .md and .png, and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_weighted_ce as bwc  # noqa: E402

RESULTS = bwc.RESULTS

# The device every part runs on; the CPU smoke test sets "cpu" (with a tiny MODEL) to exercise the code.
DEVICE = "cuda"

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# part 1: the loss kernel
# ---------------------------------------------------------------------------------------------
def part_loss(args) -> dict:
    llama = bwc.run_cuda(argparse.Namespace(n=args.loss_n, d=4096, v=128256, dtype="bfloat16", warmup=args.warmup,
                                            iters=args.iters, sets=3, ignore_frac=0.0, chunk_mb=None, only=None))
    gemma = bwc.run_cuda(argparse.Namespace(n=[8192], d=2304, v=256000, dtype="bfloat16", warmup=args.warmup,
                                            iters=args.iters, sets=3, ignore_frac=0.0, chunk_mb=None, only=None))
    return dict(matmul_tflops=llama["matmul_tflops"], rows=llama["rows"] + gemma["rows"])


# ---------------------------------------------------------------------------------------------
# shared by parts 2 and 3: synthetic chat-like conversations and the two ways to train on them
# ---------------------------------------------------------------------------------------------
def synthetic_conversations(n, vocab, seed=0, median=600, cap=4096):
    """Chat-like lengths (lognormal, median ~600, capped) with alternating user/assistant spans."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), 0.8, n).astype(int), 16, cap)
    convs = []
    for L in lengths:
        ids = rng.integers(0, vocab, L, dtype=np.int64)
        mask = np.zeros(L, dtype=np.uint8)
        pos = 0
        hi = max(9, min(256, L // 3))  # spans scale with short conversations: every one has a trained turn
        while pos < L:  # user span then assistant span
            pos += int(rng.integers(8, hi))
            span = int(rng.integers(8, hi))
            mask[pos:pos + span] = 1
            pos += span
        mask[0] = 0
        convs.append((ids, mask))
    return convs


def build_1b(grad_ckpt: bool, attn: str):
    import torch

    from refit_fast.model import build_model_from_config, enable_checkpointing

    model = build_model_from_config(LLAMA_1B, seed=0, device=DEVICE, attn_backend=attn)
    if grad_ckpt:
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    return model, opt


def step_refit(model, opt, row, rewards):
    """One step on one packed row: hidden states from the body, weighted_ce on the lm_head weight."""
    import torch

    from refit_fast import weighted_ce
    from refit_fast.model import output_embedding, packed_hidden_states

    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        h = packed_hidden_states(model, row["input_ids"], row["position_ids"], row["cu_seqlens"], row["max_seqlen"])
        W, b = output_embedding(model)
        # seq_ids index the packed conversation list; `rewards` holds one reward per conversation
        loss = weighted_ce(h, W, row["labels"], row["seq_ids"], rewards, bias=b, standardize=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_hf(model, opt, batch):
    """The usual Hugging Face step: padded batch, `labels=` loss (full logits)."""
    import torch

    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def padded_batches(convs, token_budget):
    """Length-sorted padded batches with at most `token_budget` padded tokens each (HF style)."""
    import torch

    order = sorted(range(len(convs)), key=lambda i: len(convs[i][0]))
    batches, cur = [], []
    for i in order:
        L = len(convs[i][0])
        if cur and (len(cur) + 1) * max(L, max(len(convs[j][0]) for j in cur)) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = []
    for b in batches:
        T = max(len(convs[i][0]) for i in b)
        ids = torch.zeros(len(b), T, dtype=torch.long)
        att = torch.zeros(len(b), T, dtype=torch.long)
        lab = torch.full((len(b), T), -100, dtype=torch.long)
        for r, i in enumerate(b):
            x, m = convs[i]
            L = len(x)
            ids[r, :L] = torch.from_numpy(x)
            att[r, :L] = 1
            # HF shifts labels itself: label[t] = token t where trained
            lab[r, :L] = torch.where(torch.from_numpy(m).bool(), torch.from_numpy(x), -100)
        out.append(dict(input_ids=ids, attention_mask=att, labels=lab, real=int(att.sum())))
    return out


def _empty_cache():
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _peak_and_time(fn, warmup, iters):
    import torch

    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # CPU smoke runs: time only
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters, torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------------------------
# part 2: trainer step throughput
# ---------------------------------------------------------------------------------------------
def part_trainer(args) -> dict:
    import torch

    from refit_fast.packing import pack, to_torch

    from refit_fast.model import unprepare_model

    budget = args.row_tokens
    convs = synthetic_conversations(args.trainer_convs, LLAMA_1B["vocab_size"], seed=1, cap=budget)
    n = args.iters + args.warmup

    def measure(name, attn, step, inputs, real_tokens):
        """Steps cycle through `inputs`; one fresh model and optimizer per contender."""
        model, opt = build_1b(grad_ckpt=False, attn=attn)
        if attn == "sdpa":
            unprepare_model(model, "sdpa")  # the stock Hugging Face attention
        it = iter(range(10**9))
        try:
            sec, peak = _peak_and_time(lambda: step(model, opt, inputs[next(it) % len(inputs)]), args.warmup, args.iters)
            return dict(method=name, tokens_per_s=real_tokens / sec, step_s=sec, peak_gib=peak / 2**30,
                        tokens_per_step=real_tokens)
        except torch.cuda.OutOfMemoryError:
            return dict(method=name, status="OOM")
        finally:
            model = opt = None
            _empty_cache()

    # refit_fast: packed rows, varlen attention, weighted_ce (Swift)
    packed = pack(convs, budget, seed=0)
    rows = [to_torch(packed[i], DEVICE) for i in range(min(len(packed), n))]
    rewards = torch.rand(len(convs), device=DEVICE)
    rows_out = [measure("refit_fast (packed, weighted_ce)", "auto", lambda m, o, row: step_refit(m, o, row, rewards), rows,
                        statistics.mean(int((r["seq_ids"] >= 0).sum()) for r in rows))]
    # Hugging Face: padded batches with the same token budget, labels= loss
    batches = [{k: (v.to(DEVICE) if hasattr(v, "to") else v) for k, v in b.items()} for b in padded_batches(convs, budget)[:n]]
    rows_out.append(measure("Hugging Face (padded, labels=)", "sdpa", step_hf, batches,
                            statistics.mean(b["real"] for b in batches)))
    return dict(config="Llama 1B-class (D=2048, 16 layers, V=128256), bf16 autocast, AdamW", row_tokens=budget,
                rows=rows_out)


# ---------------------------------------------------------------------------------------------
# part 3: long context
# ---------------------------------------------------------------------------------------------
def part_long_context(args) -> dict:
    import numpy as np
    import torch

    from refit_fast.model import unprepare_model
    from refit_fast.packing import pack, to_torch

    out = []
    for T in args.long_t:
        rng = np.random.default_rng(T)
        # one long conversation of T tokens, half of them trained
        ids = rng.integers(0, LLAMA_1B["vocab_size"], T, dtype=np.int64)
        mask = (np.arange(T) // 512 % 2).astype(np.uint8)
        mask[0] = 0
        row = to_torch(pack([(ids, mask)], T)[0], DEVICE)
        hf = dict(input_ids=torch.from_numpy(ids)[None].to(DEVICE), attention_mask=torch.ones(1, T, dtype=torch.long, device=DEVICE),
                  labels=torch.where(torch.from_numpy(mask).bool(), torch.from_numpy(ids), -100)[None].to(DEVICE))
        for method in ("refit_fast", "hf"):
            res = dict(method=method, T=T)
            try:
                model, opt = build_1b(grad_ckpt=True, attn="auto" if method == "refit_fast" else "sdpa")
                if method == "hf":
                    unprepare_model(model, "sdpa")
                fn = (lambda: step_refit(model, opt, row, torch.ones(1, device=DEVICE))) if method == "refit_fast" \
                    else (lambda: step_hf(model, opt, hf))
                sec, peak = _peak_and_time(fn, 1, 1)
                res.update(status="ok", step_s=sec, peak_gib=peak / 2**30)
            except torch.cuda.OutOfMemoryError:
                res.update(status="OOM")
            finally:
                model = opt = None
                _empty_cache()
            out.append(res)
            print(res, flush=True)
    return dict(config="Llama 1B-class, V=128256, one packed row, gradient checkpointing, AdamW, bf16 autocast",
                rows=out)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# refit_fast GPU suite — {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton', '-')}, liger-kernel {env.get('liger_kernel', '-')}, "
             f"cut-cross-entropy {env.get('cut_cross_entropy', '-')}. All numbers from one run of "
             "`python benchmarks/run_gpu_suite.py`.", ""]
    if "loss" in result:
        loss = dict(result["loss"], environment=env, args=dict(dtype="bfloat16", iters=result["args"]["iters"],
                                                                 warmup=result["args"]["warmup"], sets=3))
        lines += ["## Loss kernel (forward + backward)", "", bwc.to_markdown(loss).split("\n", 2)[2]]
    if "trainer" in result:
        t = result["trainer"]
        lines += ["## Trainer step", "", f"{t['config']}; {t['row_tokens']} tokens per step.", "",
                  "| method | tokens/s | step s | peak GiB | real tokens / step |", "|---|---|---|---|---|"]
        for r in t["rows"]:
            if "tokens_per_s" in r:
                lines.append(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | "
                             f"{r['tokens_per_step']:.0f} |")
            else:
                lines.append(f"| {r['method']} | {r.get('status')} | | | |")
        ok = [r for r in t["rows"] if "tokens_per_s" in r]
        if len(ok) == 2:
            lines += ["", f"Speed-up: {ok[0]['tokens_per_s'] / ok[1]['tokens_per_s']:.2f}x tokens/s."]
        lines.append("")
    if "long_context" in result:
        lc = result["long_context"]
        lines += ["## Long context", "", lc["config"] + ".", "", "| tokens in the row | refit_fast | Hugging Face |",
                  "|---|---|---|"]
        by_t = {}
        for r in lc["rows"]:
            cell = f"{r['peak_gib']:.1f} GiB, {r['step_s']:.2f} s" if r["status"] == "ok" else r["status"]
            by_t.setdefault(r["T"], {})[r["method"]] = cell
        for T, cells in sorted(by_t.items()):
            lines.append(f"| {T} | {cells.get('refit_fast', '-')} | {cells.get('hf', '-')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss", "trainer", "long_context") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "loss":
            rows = [r for r in result["loss"]["rows"] if "median_s" in r and r["D"] == 4096]
            for m in sorted({r["method"] for r in rows}):
                pts = sorted((r["N"], r["median_s"] * 1e3) for r in rows if r["method"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N (D=4096, V=128256, bf16)")
            ax.set_ylabel("forward+backward ms")
            ax.set_title("Loss kernel")
            ax.legend(fontsize=7)
        elif key == "trainer":
            rows = [r for r in result["trainer"]["rows"] if "tokens_per_s" in r]
            ax.bar([r["method"].split(" (")[0] for r in rows], [r["tokens_per_s"] for r in rows], color=["#4c72b0", "#888888"][: len(rows)])
            ax.set_ylabel("tokens/s")
            ax.set_title("Trainer step, 1B Llama")
        else:
            for m, color in (("refit_fast", "#4c72b0"), ("hf", "#888888")):
                pts = [(r["T"], r["peak_gib"]) for r in result["long_context"]["rows"] if r["method"] == m and r["status"] == "ok"]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=color)
            ax.axhline(80, linestyle="--", color="red", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens in one packed row")
            ax.set_ylabel("peak GiB (missing point = OOM)")
            ax.set_title("Long context")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, stem: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    stem = stem or f"{env['device'].replace(' ', '_')}-{env['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = RESULTS / f"{stem}.md"
    md.write_text(to_markdown(result))
    try:
        plot(result, RESULTS / f"{stem}.png")
    except ImportError:
        print("run_gpu_suite: matplotlib not installed, no plot", file=sys.stderr)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["loss", "trainer", "long_context"],
                   choices=["loss", "trainer", "long_context"])
    p.add_argument("--loss-n", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--row-tokens", type=int, default=16384, help="trainer part: tokens per step")
    p.add_argument("--trainer-convs", type=int, default=2000)
    p.add_argument("--long-t", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--from-json", help="re-render the markdown and plot of a results JSON (no GPU needed)")
    p.add_argument("--out", help="results file stem (default <device>-<date>)")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(write_all(result, args.out or Path(args.from_json).stem).read_text())
        return 0
    import torch

    if not torch.cuda.is_available():
        print("run_gpu_suite: needs a CUDA GPU (A100/H100); nothing was measured. "
              "To re-render an existing result: --from-json FILE", file=sys.stderr)
        return 2
    result = dict(environment=bwc.environment(), args=vars(args))
    for part in args.parts:
        t = time.perf_counter()
        result[part] = globals()[f"part_{part}"](args)
        print(f"[suite] {part} done in {time.perf_counter() - t:.0f} s", flush=True)
        write_all(result, args.out)  # keep what is done if a later part fails
    print(write_all(result, args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
