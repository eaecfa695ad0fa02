"""`refit-fast` command line: one sub-command per stage.

Each sub-command lives in its stage's module and exposes `main(argv) -> int`; this file only
dispatches, so `refit-fast --help` does not import torch.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with `main(argv)`, one-line help)
COMMANDS = {
    "demo": ("refit_fast.demo", "the paper's experiment on the clarifying-QA tasks: base, STaR-GATE, DPO, Refit, Swift (and filtered SFT)"),
    "collect": ("refit_fast.envs.collect", "log conversations of the behaviour policy in the clarifying-QA environment as JSONL"),
    "validate": ("refit_fast.data.validate", "check a conversations JSONL file and print statistics, without training"),
    "train": ("refit_fast.train.cli", "train a policy on logged conversations from a YAML config"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: refit-fast COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `refit-fast COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"refit-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
