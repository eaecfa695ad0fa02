"""Observability: ``metrics.jsonl``, one dense log line every N steps, a tqdm bar, TensorBoard if installed.

Only rank 0 logs. ``metrics.jsonl`` holds one JSON object per optimizer step; a resumed run first
drops the lines after the step it resumes from, so the file always describes one history. Each line
is appended with one ``write`` of the whole line, and a write cut short (a full disk) is truncated
away, so the file never ends in half a line; one left by a crash is skipped, with a warning, on resume.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import warnings

from refit_fast.train.checkpoint import DiskFullError, names_full_disk

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


_write = os.write  # one place to simulate a full disk in tests


def _readable_history(path: str, start_step: int) -> tuple[list[bytes], int]:
    """The whole lines of ``path`` up to ``start_step``, and how many lines were unreadable (torn)."""
    kept, bad = [], 0
    with open(path, "rb") as f:
        for line in f.read().split(b"\n"):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(m, dict):
                bad += 1
            elif m.get("step", 0) <= start_step:
                kept.append(line + b"\n")
    return kept, bad


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
        self.skipped_lines = 0  # unreadable lines dropped from an earlier run's metrics.jsonl
        if not enabled:
            return
        path = self.path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(path):
            lines, self.skipped_lines = _readable_history(path, start_step)
            if self.skipped_lines:
                warnings.warn(f"{path}: skipped {self.skipped_lines} unreadable line(s), the end of a write cut "
                              "short by a crash or a full disk", RuntimeWarning, stacklevel=2)
            tmp = path + ".tmp"
            with names_full_disk(tmp), open(tmp, "wb") as f:  # replaced whole: a crash here loses nothing
                f.writelines(lines)
            os.replace(tmp, path)
        with names_full_disk(path):
            self.file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        self._append((json.dumps(m) + "\n").encode())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=_si(m["tokens_per_s"]), refresh=False)
        if self.every and (m["step"] % self.every == 0 or m["step"] == self.total_steps):
            self.print(format_line(m, self.total_steps))
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, m["step"])

    def _append(self, data: bytes) -> None:
        """One write of the whole line; if the disk fills mid-line, the part written is cut off again."""
        end = os.lseek(self.file, 0, os.SEEK_END)
        try:
            if _write(self.file, data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (short write)")
        except OSError as e:
            try:
                os.ftruncate(self.file, end)
            except OSError:
                pass
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise DiskFullError(self.path, e.strerror or str(e)) from e
            raise

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
            os.close(self.file)
        self.file = self.bar = self.tb = None
