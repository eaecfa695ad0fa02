"""`refit-fast validate FILE`: check conversation files and print a report and statistics, no training.

    refit-fast validate logs.jsonl                       # rows, rewards, messages, characters
    refit-fast validate logs.jsonl --tokenizer ./tok     # plus token lengths and trained tokens
    refit-fast validate logs.jsonl --strict              # exit 1 at the first bad row, with its line

Exit status: 0 when every row is usable; 1 when any row was skipped (or a bad row in --strict mode,
or no usable row); 2 when a file cannot be opened. Warnings (kept rows) do not change it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from refit_fast.data.load import TRAINED_ROLE, load_conversations
from refit_fast.data.report import DataError


def _describe(name: str, values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return f"{name}: -"
    return (f"{name}: mean {v.mean():.4g}  std {v.std():.4g}  min {v.min():.4g}  "
            f"p50 {np.percentile(v, 50):.4g}  p95 {np.percentile(v, 95):.4g}  max {v.max():.4g}")


def main(argv: list[str] | None = None) -> int:
    """Run the validator; returns the exit code: 0 every row usable, 1 any row skipped (the report says
    which and where; in strict mode the first bad row) or no usable row, 2 a file cannot be opened.

    Example:
        >>> main(["logs.jsonl", "--reward-key", "score"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(
        prog="refit-fast validate", description=__doc__.split("\n")[0],
        epilog="exit status: 0 every row usable; 1 any row skipped (see the report), a bad row with --strict, "
               "or no usable row; 2 a file cannot be opened. Warnings do not change it.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="conversations JSONL (.jsonl or .jsonl.gz)")
    p.add_argument("--tokenizer", metavar="PATH", help="local tokenizer folder (AutoTokenizer; never downloads)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row and exit 1")
    p.add_argument("--messages-key", default="messages", metavar="K")
    p.add_argument("--reward-key", default="reward", metavar="K")
    p.add_argument("--id-key", default="id", metavar="K")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="report rows longer than N tokens")
    p.add_argument("--exact-prefix", action="store_true", help="tokenize every turn prefix (slower, strictest check)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    try:
        convs, report = load_conversations(
            args.files, messages_key=args.messages_key, reward_key=args.reward_key, id_key=args.id_key, strict=args.strict,
            max_tokens=args.max_tokens,
        )
        tokenized = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            from refit_fast.data.tokenization import tokenize_conversations

            tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
            tokenized, report = tokenize_conversations(
                convs, tok, max_tokens=args.max_tokens, strict=args.strict, report=report,
                progress=not args.no_progress, exact_prefix=args.exact_prefix,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(report.summary())
    if tokenized is not None:
        rewards = [t.reward for t in tokenized]
        keys = {t.prompt_key for t in tokenized}
    else:
        rewards = [c.reward for c in convs]
        keys = {c.prompt_key for c in convs}
    print(f"conversations: {len(rewards)}  distinct prompts: {len(keys)}")
    print(_describe("reward", rewards))
    chat = [c for c in convs if not c.is_tokenized]
    if chat:
        print(_describe("messages per conversation", [len(c.messages) for c in chat]))
        print(_describe("assistant turns", [sum(m["role"] == TRAINED_ROLE for m in c.messages) for c in chat]))
        print(_describe("characters", [sum(len(m["content"]) for m in c.messages) for c in chat]))
    pre = [c for c in convs if c.is_tokenized]
    if tokenized is not None or pre:
        rows = tokenized if tokenized is not None else pre
        lengths = [len(r.input_ids) for r in rows]
        trained = [int(r.loss_mask.sum()) for r in rows]
        label = "tokens" if tokenized is not None else "tokens (pre-tokenized rows)"
        print(_describe(label, lengths))
        print(_describe("trained tokens", trained))
        print(f"total tokens: {sum(lengths)}  trained: {sum(trained)} ({sum(trained) / max(1, sum(lengths)):.1%})")
    return 0 if len(rewards) and report.ok else 1
