"""Observability: ``metrics.jsonl``, one dense log line every N steps, a tqdm bar, TensorBoard if installed.

Only rank 0 logs. ``metrics.jsonl`` holds one JSON object per optimizer step; a resumed run first
drops the lines after the step it resumes from, so the file always describes one history.
"""
from __future__ import annotations

import json
import os
import sys

__all__ = ["MetricsLogger", "format_line", "peak_memory_mb"]


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_line(m: dict, total_steps: int) -> str:
    """One dense line per logged step.

    Example:
        >>> format_line({"step": 3, "loss": 1.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.0,
        ...              "step_time": 0.05, "packing_efficiency": 0.98, "elapsed": 1.0}, 10)
        'step 3/10 | loss 1.5000 | lr 1.00e-03 | gnorm 0.500 | 12.3k tok/s | 50.0 ms/step | pack 98.0% | 1.0s'
        >>> format_line({"step": 3, "loss": -0.5, "loss_pos": 2.0, "loss_neg": -2.5, "lr": 1e-3, "grad_norm": 0.5,
        ...              "tokens_per_s": 1e3, "step_time": 0.05, "packing_efficiency": 0.98, "elapsed": 1.0}, 10)[:49]
        'step 3/10 | loss -0.5000 | pos 2.0000 neg -2.5000'
    """
    parts = [f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f}"]
    if "loss_pos" in m:  # Swift: the positive- and negative-weight parts (their sum is the loss)
        parts.append(f"pos {m['loss_pos']:.4f} neg {m['loss_neg']:.4f}")
    if "dpo_accuracy" in m:
        parts.append(f"acc {m['dpo_accuracy']:.2f}")
    parts += [
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3f}",
        f"{_si(m['tokens_per_s'])} tok/s",
        f"{m['step_time'] * 1e3:.1f} ms/step",
        f"pack {100 * m['packing_efficiency']:.1f}%",
        f"{m['elapsed']:.1f}s",
    ]
    return " | ".join(parts)


def _flag(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, *, total_steps: int, start_step: int, every: int, progress: str,
                 tensorboard: str, quiet: bool, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.every = 0 if quiet else every
        self.quiet = quiet
        self.file = self.bar = self.tb = None
        if not enabled:
            return
        path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            with open(path, "w") as f:
                f.writelines(lines)
        self.file = open(path, "a")
        if _flag(progress, sys.stderr.isatty()) and not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if _flag(tensorboard, True):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                if tensorboard == "true":
                    raise RuntimeError("log.tensorboard=true but tensorboard is not installed (pip install tensorboard)")

    def log(self, m: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=_si(m["tokens_per_s"]), refresh=False)
        if self.every and (m["step"] % self.every == 0 or m["step"] == self.total_steps):
            self.print(format_line(m, self.total_steps))
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, m["step"])

    def print(self, text: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
        self.file = self.bar = self.tb = None
