"""torchrun environment, process group, and the DDP / FSDP2 wrappers.

Under ``torchrun --nproc_per_node=K`` the env vars RANK, WORLD_SIZE and LOCAL_RANK are set; the
process group uses NCCL on CUDA and gloo on CPU, and each rank takes GPU ``cuda:LOCAL_RANK`` (an explicit
``device="cuda:0"`` is honoured in one process only: under torchrun it would put every rank on GPU 0).
Without them everything runs in one process and no wrapper is used. Collectives time out after ``REFIT_FAST_DIST_TIMEOUT`` seconds (default 300), so a
stopped rank ends the others with a message instead of hanging them forever.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "DistTimeoutError", "collective_timeout", "setup_distributed", "wrap_model", "unwrap", "all_reduce_sum", "barrier"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "REFIT_FAST_DIST_TIMEOUT"


class DistTimeoutError(RuntimeError):
    """A collective did not complete in time: another rank is stopped, dead or far behind."""


def collective_timeout() -> datetime.timedelta:
    """The bound on every collective: ``REFIT_FAST_DIST_TIMEOUT`` seconds (a positive number), default 300."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def _bounded(what: str):
    """Turn a collective's timeout (or a peer that went away) into one message saying what to check."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, DistTimeoutError):
            raise
        text = str(e)
        if not any(w in text.lower() for w in ("timeout", "timed out", "connection", "closed", "peer")):
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise DistTimeoutError(
            f"rank {rank}: {what} did not complete within {collective_timeout().total_seconds():g} s "
            f"({TIMEOUT_ENV}): another rank is stopped, dead or much slower; stopping this one. "
            f"({text.splitlines()[0] if text else type(e).__name__})") from e


def _cuda_device(device: str, world: int, local_rank: int) -> torch.device:
    """The GPU of this process: ``device``'s index in one process; ``cuda:LOCAL_RANK`` under torchrun.

    Under torchrun every rank reads the same config, so an explicit ``"cuda:0"`` there would put all
    ranks on GPU 0 (the first NCCL collective then fails or hangs): each rank takes its LOCAL_RANK's
    GPU instead, and a different index is ignored with a warning.
    """
    explicit = torch.device(device).index if ":" in device else None
    if world <= 1:
        return torch.device(f"cuda:{explicit if explicit is not None else local_rank}")
    if explicit is not None and explicit != local_rank:
        warnings.warn(
            f"device={device!r} under torchrun (WORLD_SIZE={world}): rank with LOCAL_RANK={local_rank} uses "
            f"cuda:{local_rank}, one GPU per rank; give device='cuda' or 'auto' to silence this", stacklevel=3)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible: "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device(f"cuda:{local_rank}")


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment and initialise the process group once (later calls reuse it).

    Example:
        >>> env = setup_distributed("cpu")      # no torchrun: a single process
        >>> env.rank, env.world_size, env.backend
        (0, 1, None)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available")
    if use_cuda:
        dev = _cuda_device(device, world, local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = collective_timeout()
        with _bounded("joining the process group"):
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        with _bounded("a barrier"):
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process)."""
    if env.distributed:
        with _bounded("an all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(lm: torch.nn.Module, env: DistEnv, mode: str = "ddp"):
    """Wrap for data parallelism; returns ``(module_to_call, no_sync)`` where ``no_sync(skip)`` is a
    context manager that skips the gradient all-reduce when ``skip`` is True (all micro-steps but the
    last). Both engines *average* gradients over ranks; the trainer scales each micro-batch loss by
    ``world_size`` so the result is the sum, i.e. the gradient of the global step objective.
    """
    if not env.distributed:
        return lm, lambda skip: contextlib.nullcontext()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = DDP(lm, device_ids=ids)
        return ddp, lambda skip: ddp.no_sync() if skip else contextlib.nullcontext()
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # torch < 2.6
            raise RuntimeError(f"distributed=fsdp needs torch.distributed.fsdp.fully_shard (FSDP2); torch {torch.__version__} lacks it") from e
        from torch.distributed.device_mesh import init_device_mesh

        from refit_fast.model import base_model

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for layer in getattr(base_model(lm.model), "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(lm, mesh=mesh)

        @contextlib.contextmanager
        def no_sync(skip):
            lm.set_requires_gradient_sync(not skip)
            try:
                yield
            finally:
                lm.set_requires_gradient_sync(True)

        return lm, no_sync
    raise ValueError(f"unknown distributed mode {mode!r}")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") and hasattr(module, "no_sync") else module
