"""Resumable checkpoints, written atomically, and the final ``save_pretrained`` model.

A checkpoint is a folder ``checkpoint-{step}``::

    model.safetensors (+ config.json)   the weights, via save_pretrained (loadable with from_pretrained)
    optimizer.pt, scheduler.pt          torch state dicts (tensors and plain data only)
    rng-rank{r}.pt                      Python, NumPy and torch (CPU + CUDA) RNG states of every rank
    trainer_state.json                  step, epoch, position in the epoch's bin plan; written last

It is written to ``checkpoint-{step}.tmp`` and renamed with ``os.replace`` once complete, so a crash
mid-write leaves only a ``.tmp`` folder that :func:`latest_checkpoint` ignores and
:func:`recover_interrupted_saves` removes; the previous checkpoint is untouched. ``final/`` (the
trained model, with the tokenizer) is written the same way.

This module owns the whole format: writing (:func:`save_checkpoint`), finding
(:func:`list_checkpoints`, :func:`latest_checkpoint`), recovering, reading (:func:`read_trainer_state`,
:func:`load_weights`, :func:`load_state`, :func:`load_rng`) and the settings a checkpoint records
(:func:`run_settings`, :func:`compare_settings`). :class:`Checkpointer` is what the training loop uses:
it gathers a sharded (FSDP) model's full state once per save and loads model, optimizer, scheduler
and RNG back in the order resuming needs.

Loading never runs code from a checkpoint: the ``.pt`` files are read with ``torch.load(weights_only=True)``
(tensors, numbers, strings, lists, tuples, dicts), so a crafted file is refused with
:class:`UnsafeCheckpointError` instead of being unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil

import numpy as np
import torch

__all__ = [
    "Checkpointer",
    "DiskFullError",
    "UnsafeCheckpointError",
    "names_full_disk",
    "load_rng",
    "load_state",
    "quiet_transformers",
    "save_pretrained_quietly",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_weights",
    "restore_rng",
    "read_trainer_state",
    "recover_interrupted_saves",
    "run_settings",
    "compare_settings",
    "save_checkpoint",
]

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first.

    Example:
        >>> list_checkpoints("/nonexistent")
        []
    """
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(output_dir: str) -> str | None:
    """The path of the newest complete checkpoint, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


class DiskFullError(OSError):
    """The disk (or quota) filled while the trainer wrote ``path``; one line that names the file and,
    when known, the last complete checkpoint, which is untouched."""

    def __init__(self, path: str, reason: str = "No space left on device", last_checkpoint: str | None = None):
        self.path, self.reason, self.last_checkpoint = path, reason, last_checkpoint
        where = (f"the last complete checkpoint, {last_checkpoint}, is intact: free space and rerun with resume=true"
                 if last_checkpoint else "free space and rerun")
        super().__init__(f"disk full while writing {path} ({reason}); stopping the run; {where}")
        self.errno = errno.ENOSPC

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.last_checkpoint)


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def names_full_disk(path: str):
    """Turn an ENOSPC / EDQUOT ``OSError`` raised inside the block into :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in _FULL:
            raise DiskFullError(path, e.strerror or str(e)) from e
        raise


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded without running code from it (or is not a torch file)."""


def load_state(path: str):
    """``torch.load(path, weights_only=True)`` on CPU; a file that needs anything more than tensors and
    plain data (e.g. a pickled object whose loading would call a function) is refused, naming the file."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as e:
        # torch's message suggests weights_only=False, which is exactly what must not happen: keep only
        # the name of the global the file asked for, if it says
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it asks for {found.group(1)}" if found else f"{type(e).__name__}"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: not a file this trainer writes ({why}; only tensors and plain data are "
            "loaded, never arbitrary pickled objects). Delete that checkpoint folder to resume from the one "
            "before it") from None


def capture_rng() -> dict:
    """Every RNG state as tensors and plain data (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_array_globals() -> list:
    """What unpickling a NumPy uint32 array needs (older checkpoints stored ``np.random.get_state()``)."""
    from numpy._core import multiarray

    rebuild = multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (rebuild, "numpy._core.multiarray._reconstruct"),
            (rebuild, "numpy.core.multiarray._reconstruct")]


def load_rng(checkpoint: str, rank: int) -> dict:
    """The RNG state file of ``rank`` (rank 0's when the checkpoint has none for it), loaded safely
    (NumPy arrays allowed: checkpoints written before the RNG state was stored as tensors hold one)."""
    path = os.path.join(checkpoint, f"rng-rank{rank}.pt")
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return load_state(path if os.path.exists(path) else os.path.join(checkpoint, "rng-rank0.pt"))


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": n["key"].numpy().astype(np.uint32),
                             "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    else:
        np.random.set_state(n)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars ("Writing model shards", "Loading weights") inside the block:
    they would print a line for every checkpoint. The previous setting is restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_pretrained_quietly(model, path: str, state_dict: dict | None = None, tokenizer=None) -> None:
    """``model.save_pretrained(path)`` in safetensors, without the progress bar. With ``tokenizer``,
    the saved ``generation_config`` stops at its end-of-turn token as well as at eos (see
    :func:`set_generation_stop_tokens`)."""
    # a shallow copy: save_pretrained empties the dict it is given (transformers 5), and the caller may
    # save the same gathered state twice (the last checkpoint, then final/)
    kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}
    if tokenizer is not None:
        set_generation_stop_tokens(model, tokenizer)
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True, **kwargs)


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token that ends an assistant turn in ``tokenizer``'s chat template (``<|end|>`` for
    the word tokenizer, ``<|im_end|>`` for Qwen, ``<|eot_id|>`` for Llama 3): the first special token
    after the assistant's content in a rendered one-turn conversation. None without a template or
    when the content is followed by no special token."""
    marker = "refitfastmarker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # no chat template, or one that refuses this conversation
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    rest = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    for token, i in zip(tokenizer.convert_ids_to_tokens(rest), rest):
        if token in special:
            return int(i)
    return None


def set_generation_stop_tokens(model, tokenizer) -> None:
    """``model.generation_config.eos_token_id = [eos, end_of_turn]`` (those the tokenizer has), so that
    ``generate`` stops at the end of an assistant turn; pad_token_id from the tokenizer if unset."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    ids = [i for i in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)) if i is not None]
    ids = list(dict.fromkeys(int(i) for i in ids))
    if ids:
        gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = int(tokenizer.pad_token_id)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str, step: int, *, hf_model, model_state: dict | None, optimizer_state: dict,
                    scheduler_state: dict, trainer_state: dict, rank: int, world_size: int, keep_last: int,
                    barrier=None) -> str | None:
    """Write ``checkpoint-{step}`` atomically; returns its path on rank 0 (None elsewhere).

    Rank 0 writes model, optimizer and scheduler state (``model_state`` overrides the module's own
    state dict, e.g. a full state dict gathered from FSDP shards); every rank writes its RNG state.
    ``barrier`` (a callable) separates the phases under torch.distributed. Older checkpoints beyond
    ``keep_last`` are deleted after the new one is in place.
    """
    barrier = barrier or (lambda: None)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    try:
        _write_tmp(tmp, rank, barrier, hf_model, model_state, optimizer_state, scheduler_state,
                   dict(trainer_state, step=step, world_size=world_size))
    except DiskFullError:
        if rank == 0:  # give the space back; the previous checkpoint was never touched
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        if os.path.exists(final):  # re-saving the same step: move the old one aside first
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
        for _, path in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final if rank == 0 else None


def _write_tmp(tmp, rank, barrier, hf_model, model_state, optimizer_state, scheduler_state, state) -> None:
    """Every file of a checkpoint into ``tmp``, synced to disk; a full disk raises :class:`DiskFullError`."""
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        with names_full_disk(tmp):
            os.makedirs(tmp)
    barrier()
    rng = os.path.join(tmp, f"rng-rank{rank}.pt")
    with names_full_disk(rng):
        torch.save(capture_rng(), rng)
    if rank == 0:
        with names_full_disk(tmp):
            save_pretrained_quietly(hf_model, tmp, model_state)
        for name, obj in (("optimizer.pt", optimizer_state), ("scheduler.pt", scheduler_state)):
            with names_full_disk(os.path.join(tmp, name)):
                torch.save(obj, os.path.join(tmp, name))
    barrier()
    if rank == 0:
        path = os.path.join(tmp, STATE_FILE)
        with names_full_disk(path), open(path, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for name in os.listdir(tmp):
            with names_full_disk(os.path.join(tmp, name)), open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load ``save_pretrained`` safetensors weights (one file or an index of shards) into ``model``.

    Tied weights that ``save_pretrained`` left out (e.g. ``lm_head.weight`` = the embedding) are fine;
    any other missing or unexpected key raises.
    """
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (or index): not a save_pretrained folder")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = _aliases(model)
    missing = [k for k in missing if not any(a in state for a in aliases.get(k, ()))]
    if missing or unexpected:
        raise RuntimeError(f"weights in {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """For every tied parameter name, the other names of the same tensor."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in groups.values() if len(names) > 1 for n in names}


# --------------------------------------------------------------------------------------------------
# Reading and recovering
# --------------------------------------------------------------------------------------------------


def read_trainer_state(checkpoint: str) -> dict:
    """The ``trainer_state.json`` of a checkpoint: ``step``, ``epoch``, ``index_in_epoch``,
    ``rows_per_step``, ``total_steps``, ``loss``, ``world_size`` and ``settings`` (see :func:`run_settings`).

    Example:
        >>> read_trainer_state("runs/swift/checkpoint-40")["step"]    # doctest: +SKIP
        40
    """
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        return json.load(f)


def recover_interrupted_saves(output_dir: str) -> list[str]:
    """Clean up after a save that crashed mid-write; returns what it did, one line per folder.

    A ``checkpoint-N.tmp`` (an unfinished write) is deleted. A ``checkpoint-N.old`` next to a
    ``checkpoint-N`` (a re-save of step N that had put the new copy in place) is deleted; one *without*
    ``checkpoint-N`` (a crash between the two renames of a re-save) is the only copy of step N and is
    renamed back. Safe to call on a folder that does not exist.

    Example:
        >>> recover_interrupted_saves("/nonexistent")
        []
    """
    if not os.path.isdir(output_dir):
        return []
    done = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not name.startswith("checkpoint-"):
            continue
        if name.endswith(".old") and not os.path.exists(path[:-4]):
            os.replace(path, path[:-4])
            done.append(f"restored {path[:-4]} from {name}")
        elif name.endswith((".tmp", ".old")):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}")
    return done


# --------------------------------------------------------------------------------------------------
# The settings a checkpoint records (compared on resume)
# --------------------------------------------------------------------------------------------------

# What decides a run's result (device, precision, logging, checkpointing, threads and the distributed
# engine are left out: changing them is how a stopped run is moved or watched).
_RESULT_KEYS = ("seed", "algorithm", "steps", "epochs")
_RESULT_SECTIONS = {"model": ("path", "config", "init_from", "dtype"), "tokenizer": None, "data": None, "batch": None,
                    "optim": None, "objective": None}


def _abspath(p):
    return os.path.abspath(p) if isinstance(p, (str, os.PathLike)) else p


def _data_content(path) -> dict | None:
    """Size and SHA-256 of each data file (None for in-memory rows): a file edited in place is a change."""
    import hashlib

    paths = path if isinstance(path, (list, tuple)) else [path]
    if not all(isinstance(p, (str, os.PathLike)) and os.path.isfile(p) for p in paths):
        return None
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append({"size": os.path.getsize(p), "sha256": h.hexdigest()})
    return {"files": out}


def run_settings(config: dict, *, data_content: bool = False) -> dict:
    """The settings of a config dict (``TrainConfig.to_dict()`` or a saved ``config.yaml``) that change
    the result, as ``{"dotted.key": value}`` with paths made absolute; with ``data_content`` also the
    size and SHA-256 of each data file (``"data.content"``). Every checkpoint records them.

    Example:
        >>> s = run_settings({"seed": 1, "algorithm": "swift", "optim": {"lr": 3e-5}, "log": {"every": 5}})
        >>> s["seed"], s["optim.lr"], "log.every" in s
        (1, 3e-05, False)
    """
    out = {k: config.get(k) for k in _RESULT_KEYS}
    for section, keys in _RESULT_SECTIONS.items():
        sub = config.get(section) or {}
        for k in (keys or sub):
            out[f"{section}.{k}"] = sub.get(k)
    for k in ("model.path", "model.init_from", "tokenizer.path"):
        out[k] = _abspath(out.get(k))
    p = out.get("data.path")
    out["data.path"] = ([_abspath(x) for x in p] if isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p)
                        else _abspath(p))
    if data_content:
        out["data.content"] = _data_content(p)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def compare_settings(checkpoint: str, now: dict, *, force: bool = False) -> list[str]:
    """The differences between the settings ``checkpoint`` was trained with and ``now`` (both from
    :func:`run_settings`), one line each. Any difference raises ``ConfigError`` unless ``force``; then
    they are returned (the trainer records them in the metrics). Checkpoints written before settings
    were recorded are compared with the ``config.yaml`` beside them, if any.

    Example:
        >>> compare_settings("runs/swift/checkpoint-40", now, force=True)   # doctest: +SKIP
        ['optim.lr: 3e-05 -> 0.0001']
    """
    from refit_fast.train.config import ConfigError

    saved = read_trainer_state(checkpoint).get("settings")
    if saved is None:
        path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
        if not os.path.isfile(path):
            return []
        import yaml

        with open(path) as f:
            saved = run_settings(yaml.safe_load(f) or {})
    diffs = []
    for k in saved:
        if k in now and saved[k] != now[k]:
            diffs.append("data: a file's size or contents changed" if k == "data.content" else f"{k}: {saved[k]!r} -> {now[k]!r}")
    if diffs and not force:
        raise ConfigError(
            f"resume: {checkpoint} was trained with other settings ({'; '.join(diffs)}); the continued run "
            "would not be the run it claims to be. Restore them, use a new output_dir, or pass resume=force to "
            "continue anyway (recorded in metrics.jsonl)")
    return diffs


# --------------------------------------------------------------------------------------------------
# What the training loop uses
# --------------------------------------------------------------------------------------------------


class Checkpointer:
    """The checkpoints of one run in ``output_dir``, for every rank of it.

    ``env`` is the run's :class:`refit_fast.train.distributed.DistEnv`; ``fsdp``: the model is sharded
    with FSDP2, so rank 0 saves a full state dict gathered from the shards (model and optimizer) and
    loading scatters it back. A save followed by :meth:`save_final` at the same step gathers the model
    once: the gathered state is kept for the final save (``final=True``) instead of gathered again.

    Resuming takes two calls: :meth:`load_model` before the model is wrapped for DDP/FSDP (plain
    weights), :meth:`load_training_state` after the optimizer and scheduler exist (optimizer, scheduler,
    this rank's RNG).

    Example:
        >>> ck = Checkpointer("runs/swift", env, fsdp=False, keep_last=2)                  # doctest: +SKIP
        >>> path = ck.latest()                                                               # doctest: +SKIP
        >>> state = ck.load_model(model, path); ...; ck.load_training_state(path, lm, opt, sched)  # doctest: +SKIP
        >>> ck.save(lm, opt, sched, step=100, state={"epoch": 1}); ck.save_final(lm, tokenizer)   # doctest: +SKIP
    """

    def __init__(self, output_dir: str, env, *, fsdp: bool = False, keep_last: int = 2):
        self.output_dir, self.env, self.fsdp, self.keep_last = output_dir, env, bool(fsdp) and env.distributed, keep_last
        self._kept = None  # (step, gathered model state) of the last save, for save_final

    def _barrier(self) -> None:
        from refit_fast.train.distributed import barrier

        barrier(self.env)

    def latest(self) -> str | None:
        """The newest complete checkpoint of the run, or None."""
        return latest_checkpoint(self.output_dir)

    # ---- reading ----

    def load_model(self, model: torch.nn.Module, checkpoint: str) -> dict:
        """Load the weights into the (unwrapped) model; returns the checkpoint's trainer state."""
        state = read_trainer_state(checkpoint)
        load_weights(model, checkpoint)
        return state

    def load_training_state(self, checkpoint: str, lm, optimizer, scheduler) -> None:
        """Optimizer (scattered to the shards under FSDP), scheduler and this rank's RNG states."""
        optim_state = load_state(os.path.join(checkpoint, "optimizer.pt"))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(lm, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(load_state(os.path.join(checkpoint, "scheduler.pt")))
        restore_rng(load_rng(checkpoint, self.env.rank))

    # ---- writing ----

    def _model_state(self, lm) -> dict | None:
        """The full model state dict gathered from FSDP shards (collective: every rank calls it), or None
        when the module's own state dict is already full."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        msd = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in msd.items()}

    def _optimizer_state(self, lm, optimizer) -> dict:
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(lm, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, lm, optimizer, scheduler, step: int, state: dict, *, final: bool = False) -> str | None:
        """Write ``checkpoint-{step}`` (every rank calls it); its path on rank 0, None elsewhere.
        ``final``: :meth:`save_final` follows at this step, so keep the gathered model state for it."""
        from refit_fast.train.distributed import unwrap

        model_state = self._model_state(lm)
        self._kept = (step, model_state) if final and model_state is not None else None
        return save_checkpoint(
            self.output_dir, step, hf_model=unwrap(lm).model, model_state=model_state,
            optimizer_state=self._optimizer_state(lm, optimizer), scheduler_state=scheduler.state_dict(),
            trainer_state=state, rank=self.env.rank, world_size=self.env.world_size, keep_last=self.keep_last,
            barrier=self._barrier,
        )

    def save_final(self, lm, tokenizer=None, *, step: int | None = None) -> str:
        """Write ``output_dir/final`` (``save_pretrained`` weights and config, and the tokenizer, whose
        end-of-turn token also stops ``generate``) atomically, through ``final.tmp``; returns its path.
        A full disk raises :class:`DiskFullError` and leaves any earlier ``final/`` in place."""
        from refit_fast.train.distributed import unwrap

        path = os.path.join(self.output_dir, "final")
        kept, self._kept = self._kept, None
        model_state = kept[1] if kept is not None and kept[0] == step else self._model_state(lm)
        if self.env.is_main:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with names_full_disk(tmp):
                    save_pretrained_quietly(unwrap(lm).model, tmp, model_state, tokenizer=tokenizer)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp)
            except DiskFullError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        self._barrier()
        return path

    def clear(self) -> None:
        """Delete every checkpoint of ``output_dir`` (overwrite=true; rank 0 only)."""
        for _, path in list_checkpoints(self.output_dir):
            shutil.rmtree(path)
