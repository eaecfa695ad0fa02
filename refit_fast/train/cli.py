"""``refit-fast train CONFIG.yaml [key=value ...]``: train from a YAML config with dotted overrides.

    refit-fast train examples/tiny_llama_refit.yaml optim.lr=3e-4 steps=200
    torchrun --nproc_per_node=2 -m refit_fast.train examples/tiny_llama_refit.yaml distributed=fsdp
"""
from __future__ import annotations

import os
import sys

USAGE = """usage: refit-fast train CONFIG.yaml [key=value ...]

Train a policy on logged conversations (sft, filtered_sft, star_gate, refit, swift or dpo).
Overrides use dotted keys, values in YAML syntax, e.g.

  refit-fast train run.yaml algorithm=swift optim.lr=1e-4 batch.max_tokens=2048 resume=true

Groups: conversations logged for the same context, by the row field data.group_key (default
"group", a string or integer) or else by prompt (the messages before the first assistant turn).
Swift standardizes each reward by its group's mean and std over the whole data set
(objective.swift_stats=group, the paper's; or dataset, or step: per optimizer step);
star_gate is SFT on the best conversation of each group; dpo pairs within groups.

resume=true continues from the latest checkpoint-STEP in output_dir; resume=force continues even
where that checkpoint's recorded settings differ from this run's (default: false, a fresh run).

Multi-process: torchrun --nproc_per_node=K -m refit_fast.train run.yaml [key=value ...]
(DDP by default, distributed=fsdp for FSDP2; NCCL on GPU, gloo on CPU).
Writes OUTPUT_DIR/metrics.jsonl, checkpoint-STEP/ folders and OUTPUT_DIR/final (save_pretrained).
A bad config, data file or run (e.g. a non-finite loss) prints one line "refit-fast train: ..." and
exits 1; a bad command line exits 2."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    path, overrides = argv[0], argv[1:]
    if "=" in path:
        print(f"refit-fast train: the first argument must be the YAML config, got {path!r}\n\n{USAGE}", file=sys.stderr)
        return 2

    import yaml

    from refit_fast.train.config import load_config
    from refit_fast.train.checkpoint import DiskFullError, UnsafeCheckpointError
    from refit_fast.train.distributed import DistTimeoutError
    from refit_fast.train.loop import NonFiniteLossError, train

    # What a user can fix (the config, the data, the output folder, a diverging run): one line and
    # exit 1. Anything else is a bug and keeps its traceback. ConfigError and DataError are ValueErrors.
    known = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
             PermissionError, yaml.YAMLError, NonFiniteLossError, DiskFullError, UnsafeCheckpointError,
             DistTimeoutError)
    try:
        cfg = load_config(path, overrides).check_files()
        result = train(cfg)
    except known as e:
        print(f"refit-fast train: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        _destroy_process_group()
    if result.losses and os.environ.get("RANK", "0") == "0":
        print(f"done: {len(result.losses)} steps, last loss {result.losses[-1]:.4f}; "
              f"final model: {result.final_model_path or '(not saved)'}")
    return 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line (a data report's lines joined by '; ')."""
    msg = ""
    for line in (x.strip() for x in str(e).splitlines()):
        if line:
            msg += (line if not msg else (" " if msg.endswith(":") else "; ") + line)
    return msg or type(e).__name__


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
