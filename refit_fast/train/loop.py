"""The training loop, top to bottom: config, data, model, optimizer, distributed wrap, schedule, loop,
checkpoint. Each step's micro-batches come finished from data.py (``Batches``), the weights and
losses from objectives.py, everything on disk from checkpoint.py (``Checkpointer``), logging from
metrics.py.

    from refit_fast.train import train
    result = train("examples/tiny_llama_refit.yaml", ["optim.lr=3e-4"])
    sft = train({...config dict...})
    refit = train({..., "algorithm": "refit", "model": {"init_from": sft.final_model_path}})
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from refit_fast.train import checkpoint as ckpt
from refit_fast.train.config import ConfigError, TrainConfig, load_config
from refit_fast.train.data import (Batches, Schedule, TrainData, best_per_group, dpo_pairs, filter_top, group_index,
                                   make_units, refuse_overlong)
from refit_fast.train.distributed import all_reduce_sum, barrier, setup_distributed, wrap_model
from refit_fast.train.metrics import MetricsLogger, peak_memory_mb
from refit_fast.train.objectives import PackedCausalLM, conversation_weights, micro_batch_loss, sequence_logps

__all__ = ["DiskFullError", "NonFiniteLossError", "TrainResult", "train"]

DiskFullError = ckpt.DiskFullError

SMALL_MODEL = 20_000_000  # parameters; below this, CPU training uses one thread unless cpu_threads says otherwise


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) of a step was NaN or inf; raised before the optimizer step, so the
    model, optimizer and the last checkpoint are untouched."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: str | None):
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"step {step}: {what} is {value}; stopping before the optimizer step ({where}). "
            "Lower optim.lr, enable optim.grad_clip, or check the rewards for extreme values."
        )
        self.step, self.what, self.value, self.last_checkpoint = step, what, value, last_checkpoint


@dataclass
class TrainResult:
    """What :func:`train` returns. ``losses[k]`` is the loss of step ``steps_run[k]`` (1-based)."""

    output_dir: str
    final_model_path: str | None
    losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    steps_run: list[int] = field(default_factory=list)
    total_steps: int = 0
    last_checkpoint: str | None = None
    tokenizer: object | None = None
    config: TrainConfig | None = None
    data_report: str = ""


def train(config, overrides=None, *, on_step=None) -> TrainResult:
    """Train a policy on logged conversations; returns a :class:`TrainResult`.

    ``config``: a YAML path, a nested dict, or a :class:`TrainConfig`; ``overrides``: ``["optim.lr=1e-4"]``
    or ``{"optim.lr": 1e-4}``. ``on_step(metrics) -> bool``: called on every rank after each step;
    returning True stops the run there, after writing a checkpoint (it must answer the same on every
    rank). Callable many
    times in one process (e.g. SFT, then each method from the SFT model via ``model.init_from``).

    Example:
        >>> result = train({"algorithm": "sft", "output_dir": "runs/sft", "data": {"path": "logs.jsonl"},
        ...                 "model": {"config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        ...                 "intermediate_size": 128, "num_attention_heads": 4}}, "tokenizer": "word",
        ...                 "steps": 50, "optim": {"lr": 1e-3}})                  # doctest: +SKIP
        >>> swift = train(result.config.replace(algorithm="swift", output_dir="runs/swift",
        ...               **{"model.init_from": result.final_model_path}))      # doctest: +SKIP
    """
    cfg = load_config(config, overrides)
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, on_step) -> TrainResult:
    t_start = time.perf_counter()

    # ---- processes, devices, seeds ----
    env = setup_distributed(cfg.device)
    device = env.device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    amp_dtype = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    out_dir = cfg.output_dir
    _check_output_dir(cfg)  # nothing is deleted until the data, model and plan are known to be good

    # ---- data and tokenizer ----
    convs, tokenizer, report = _load_data(cfg)
    data, truncated = TrainData.from_tokenized(convs), ""
    if cfg.data.overlong == "truncate_turns":
        data, n_cut, tokens_cut = data.truncated(cfg.batch.max_tokens)
        truncated = f", {n_cut} truncated to fit ({tokens_cut} tokens cut)" if n_cut else ""
    data, pairs = _select(cfg, data)
    # what each conversation's log-likelihood is weighted by (None: unweighted objectives)
    groups = group_index(data.groups) if cfg.objective.swift_stats == "group" else None
    weighting = conversation_weights(cfg.algorithm, data.rewards, swift_stats=cfg.objective.swift_stats,
                                     groups=groups, eps=cfg.objective.swift_eps)
    weights_summary = _swift_summary(cfg, data, weighting)
    rows_per_step = env.world_size * cfg.batch.grad_accum
    units = make_units(data, pairs)
    if cfg.data.overlong == "error":
        refuse_overlong(data, *units, cfg.batch.max_tokens)
    schedule = Schedule(data, *units, max_tokens=cfg.batch.max_tokens, rows_per_step=rows_per_step,
                        seed=cfg.seed, strategy=cfg.batch.strategy, steps=cfg.steps, epochs=cfg.epochs)
    batches = Batches(schedule, world_size=env.world_size, rank=env.rank, weighting=weighting,
                      normalize="sequence" if pairs is not None else cfg.objective.normalize,
                      pad_to=cfg.batch.pad_to, row_dtype=np.dtype(cfg.batch.row_dtype))
    unit = "pairs" if pairs is not None else "conversations"
    n_units = len(schedule.unit_lengths)
    summary = (f"{cfg.algorithm}: {n_units - schedule.dropped_units} {unit} "
               f"({schedule.dropped_units} over max_tokens dropped{truncated}), {schedule.total_steps} steps of "
               f"{env.world_size}x{cfg.batch.grad_accum} rows x {cfg.batch.max_tokens} tokens" + weights_summary)

    # ---- model ----
    model = _build_model(cfg, tokenizer, device)
    _check_vocab(model, data, tokenizer)
    _check_positions(model, data, schedule)
    if device.type == "cpu" and cfg.cpu_threads == 0 and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        # Tiny models are overhead-bound: extra intra-op threads only add barriers, and on a busy
        # machine a descheduled OpenMP thread made steps ~50x slower (560 ms vs 10 ms measured).
        torch.set_num_threads(1)
    if cfg.model.gradient_checkpointing:
        from refit_fast.model import enable_checkpointing

        enable_checkpointing(model)
    lm = PackedCausalLM(model)
    if pairs is not None:
        batches.reference = _reference_logps(lm, batches, len(pairs), env, autocast)
    model.train()

    # ---- output_dir: now that the run can start, clear (overwrite) or check (resume) what is there ----
    checkpoints = ckpt.Checkpointer(out_dir, env, fsdp=cfg.distributed == "fsdp", keep_last=cfg.checkpoint.keep_last)
    settings = ckpt.run_settings(cfg.to_dict(), data_content=True)  # saved in every checkpoint, compared on resume
    forced = _prepare_output_dir(cfg, env, checkpoints, settings)

    # ---- resume: weights before wrapping, optimizer and RNG after ----
    start_step, resume_from = 0, None
    if cfg.resume:
        resume_from = checkpoints.latest()
    if resume_from is not None:
        trainer_state = checkpoints.load_model(model, resume_from)
        if trainer_state.get("rows_per_step", rows_per_step) != rows_per_step:
            raise ConfigError(f"resume: {resume_from} was written with world_size x grad_accum = "
                              f"{trainer_state['rows_per_step']}, now {rows_per_step}; the data plan would differ")
        start_step = int(trainer_state["step"])

    # ---- optimizer, schedule, distributed wrap ----
    wrapped, no_sync = wrap_model(lm, env, cfg.distributed)
    optimizer = _make_optimizer(cfg, lm, device)
    lr_lambda = _lr_lambda(cfg.optim.warmup_steps, schedule.total_steps, cfg.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    if resume_from is not None:
        checkpoints.load_training_state(resume_from, lm, optimizer, scheduler)

    logger = MetricsLogger(out_dir, total_steps=schedule.total_steps, start_step=start_step, every=cfg.log.every,
                           progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, quiet=cfg.log.quiet,
                           enabled=env.is_main)
    logger.print(summary + (f"; resuming from {resume_from}" if resume_from else "")
                 + (f" with changed settings (resume=force): {'; '.join(forced)}" if forced and resume_from else ""))
    result = TrainResult(out_dir, None, total_steps=schedule.total_steps, last_checkpoint=resume_from,
                         tokenizer=tokenizer, config=cfg, data_report=report)
    params = [p for p in lm.parameters() if p.requires_grad]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    world = env.world_size
    swift = cfg.algorithm == "swift"

    # ---- the loop ----
    try:
        for step in range(start_step, schedule.total_steps):
            t0 = time.perf_counter()
            batch = batches.step(step)  # this rank's micro-batches, the step's statistics
            stats = batch.stats
            # Swift's loss split by the sign of the weights, on logging steps only (see micro_batch_loss)
            parts = swift and cfg.log.every > 0 and ((step + 1) % cfg.log.every == 0 or step + 1 == schedule.total_steps)
            loss_sum = torch.zeros((), device=device)
            parts_sum = torch.zeros(2, dtype=torch.float64, device=device)
            dpo_z = []
            for i, mb in enumerate(batch.micro):
                with no_sync(i < len(batch.micro) - 1):  # gradients are reduced in the last backward only
                    with autocast():
                        if mb is None:  # this rank has no row left in this micro-step
                            loss_mb, extras = _empty_row_loss(wrapped, device), None
                        else:
                            loss_mb, extras = micro_batch_loss(wrapped, mb.to(device), cfg.algorithm, stats,
                                                               parts=parts, dpo_beta=cfg.objective.dpo_beta)
                    # DDP/FSDP average gradients over ranks; x world turns the average into the sum.
                    (loss_mb * world if world > 1 else loss_mb).backward()
                loss_sum += loss_mb.detach().float()
                if extras is not None and "dpo_z" in extras:
                    dpo_z.append(extras["dpo_z"])
                if extras is not None and "parts" in extras:
                    parts_sum += extras["parts"]

            # One all-reduce per step for everything logged (loss, Swift's parts, DPO counts).
            z = torch.cat(dpo_z) if dpo_z else torch.zeros(0, device=device)
            totals = all_reduce_sum(torch.cat([torch.stack([loss_sum.double(), (z > 0).sum().double(), z.sum().double()]),
                                               parts_sum]), env)
            loss = float(totals[0])
            if not math.isfinite(loss):
                raise NonFiniteLossError(step + 1, "the loss", loss, result.last_checkpoint)
            grad_norm = _grad_norm(params, max_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(step + 1, "the gradient norm", grad_norm, result.last_checkpoint)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tokens = batch.tokens
            m = {
                "step": done, "epoch": batch.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens, "trained_tokens": stats.n_tokens, "rows": batch.rows,
                "conversations": int(len(batch.conversations)),
                "packing_efficiency": tokens / (batch.rows * cfg.batch.max_tokens),
                "reward_mean": stats.reward_mean, "reward_std": stats.reward_std,
                "reward_min": stats.reward_min, "reward_max": stats.reward_max,
                **_weight_stats(cfg, batch.weights),
                "step_time": dt, "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "elapsed": time.perf_counter() - t_start, "peak_mem_mb": peak_memory_mb(device),
            }
            if parts:
                m["loss_pos"], m["loss_neg"] = float(totals[3]), float(totals[4])
            if pairs is not None:
                m["pairs"] = stats.n_units
                m["dpo_accuracy"] = float(totals[1]) / max(stats.n_units, 1)
                m["dpo_margin"] = float(totals[2]) / max(stats.n_units, 1)
            if forced and step == start_step:
                m["resume_forced"] = forced  # resume=force accepted these changed settings here
            logger.log(m)
            result.losses.append(loss)
            result.metrics.append(m)
            result.steps_run.append(done)

            stop = bool(on_step(m)) if on_step is not None else False
            last = done == schedule.total_steps
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or last or stop:
                state = {"epoch": batch.epoch, "index_in_epoch": batch.index_in_epoch + 1, "rows_per_step": rows_per_step,
                         "total_steps": schedule.total_steps, "loss": loss, "settings": settings}
                path = checkpoints.save(lm, optimizer, scheduler, done, state, final=last and cfg.checkpoint.save_final)
                result.last_checkpoint = path or result.last_checkpoint
            if stop:
                break

        # ---- final model ----
        if cfg.checkpoint.save_final and (not result.steps_run or result.steps_run[-1] == schedule.total_steps):
            result.final_model_path = checkpoints.save_final(lm, tokenizer, step=schedule.total_steps)
            logger.print(f"saved the final model to {result.final_model_path}")
    except ckpt.DiskFullError as e:  # one line: the file that did not fit, and the checkpoint to resume from
        raise ckpt.DiskFullError(e.path, e.reason, result.last_checkpoint) from None
    finally:
        logger.close()
    return result


# ------------------------------------------------------------------------------------------------
# helpers (in the order the loop uses them)
# ------------------------------------------------------------------------------------------------


def _select(cfg: TrainConfig, data: TrainData) -> tuple[TrainData, np.ndarray | None]:
    """The conversations the algorithm trains on, and DPO's ``[P, 2]`` pairs (None for the others)."""
    if cfg.algorithm == "filtered_sft":
        kept = filter_top(data.rewards, cfg.objective.filter_top_fraction, cfg.objective.filter_min_reward)
        if len(kept) == 0:
            raise ValueError(f"filtered_sft: no conversation has reward >= objective.filter_min_reward="
                             f"{cfg.objective.filter_min_reward} (highest reward: {data.rewards.max():g})")
        return data.subset(kept), None
    if cfg.algorithm == "star_gate":
        return data.subset(best_per_group(data.rewards, data.groups)), None
    if cfg.algorithm == "dpo":
        pairs = dpo_pairs(data.rewards, data.groups, cfg.objective.dpo_pairs, data.content_keys())
        if len(pairs) == 0:
            raise ValueError("dpo: no pair of different conversations in the same group (prompt or group field) "
                             "with different rewards in the data")
        return data, pairs
    return data, None


def _check_output_dir(cfg: TrainConfig) -> None:
    out = cfg.output_dir
    existing = ckpt.list_checkpoints(out)  # every rank checks, so every rank raises the same error
    if existing and not cfg.resume and not cfg.overwrite:
        raise ConfigError(
            f"output_dir {out} already holds {existing[-1][1]}; pass resume=true to continue it, "
            "overwrite=true to start over, or use a new output_dir"
        )


def _prepare_output_dir(cfg: TrainConfig, env, checkpoints: ckpt.Checkpointer, settings: dict) -> list[str]:
    """Called once the data, model and step plan are known to be good, so a bad data path or model
    never costs the previous run: only then does overwrite=true delete its checkpoints and metrics.
    On resume, compares the settings first (:func:`refit_fast.train.checkpoint.compare_settings`;
    returns what resume=force accepted)."""
    out = cfg.output_dir
    _check_output_dir(cfg)
    latest = checkpoints.latest()
    forced = ckpt.compare_settings(latest, settings, force=cfg.resume == "force") if cfg.resume and latest else []
    barrier(env)  # every rank has read the old config.yaml before rank 0 replaces it
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        ckpt.recover_interrupted_saves(out)  # leftovers of a save that crashed mid-write
        if not cfg.resume:
            checkpoints.clear()
        if not cfg.resume and os.path.exists(os.path.join(out, "metrics.jsonl")):
            os.remove(os.path.join(out, "metrics.jsonl"))  # a fresh run starts a fresh history
        import yaml

        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    barrier(env)
    return forced


def _load_data(cfg: TrainConfig):
    """(tokenized conversations, tokenizer or None, report text)."""
    from refit_fast.data import load_conversations, tokenize_conversations

    d = cfg.data
    # max_tokens: text too long to fit even at 64 characters a token is refused before tokenizing
    convs, report = load_conversations(d.path, messages_key=d.messages_key, reward_key=d.reward_key, id_key=d.id_key,
                                       group_key=d.group_key, max_tokens=cfg.batch.max_tokens)
    if d.overlong == "error" and report.skipped.get("too_long"):
        raise ValueError(f"{report.skipped['too_long']} conversations are far longer than batch.max_tokens="
                         f"{cfg.batch.max_tokens} (data.overlong=error), e.g. {report.examples['too_long'][0]}")
    if not convs:
        raise ValueError(f"no usable conversation in {d.path!r}:\n{report.summary()}")
    pretokenized = all(c.is_tokenized for c in convs)
    tokenizer = _resolve_tokenizer(cfg, convs, pretokenized)
    if tokenizer is None and not pretokenized:
        raise ConfigError("tokenizer: none, but the data has messages (not input_ids); set tokenizer: word or a path")
    # pre-tokenized rows pass through the same checks (mask[0] cleared, nothing trained: skipped)
    out, report = tokenize_conversations(convs, tokenizer, progress=False, report=report)
    if not out:
        raise ValueError(f"no conversation survived tokenization:\n{report.summary()}")
    return out, tokenizer, report.summary()


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def _resolve_tokenizer(cfg: TrainConfig, convs, pretokenized: bool):
    t = cfg.tokenizer
    if t.kind == "none":
        return None
    if t.kind == "path":
        return _load_tokenizer(t.path)
    if t.kind == "auto":
        for path in (cfg.model.init_from, cfg.model.path):
            if _has_tokenizer(path):
                return _load_tokenizer(path)
        if pretokenized:
            return None
    from refit_fast.data import build_word_tokenizer

    texts = (m["content"] for c in convs if c.messages for m in c.messages)
    return build_word_tokenizer(texts)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _build_model(cfg: TrainConfig, tokenizer, device):
    from refit_fast.model import build_model_from_config, load_model

    m = cfg.model
    source = m.init_from or m.path
    if source:
        with ckpt.quiet_transformers():
            model = load_model(source, attn_backend=m.attn_backend, dtype=_saved_dtype(source, m.dtype),
                               local_files_only=True)
    else:
        conf = dict(m.config)
        if "vocab_size" not in conf:
            if tokenizer is None:
                raise ConfigError("model.config needs vocab_size when the data is pre-tokenized and there is no tokenizer")
            conf["vocab_size"] = len(tokenizer)
        model = build_model_from_config(conf, seed=cfg.seed, attn_backend=m.attn_backend)
        if m.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
    return model.to(device)


def _saved_dtype(source: str, setting: str) -> torch.dtype:
    """model.dtype as a torch dtype; ``auto``: the dtype ``source``'s config.json records (float32 if none)."""
    if setting != "auto":
        return getattr(torch, setting)
    import json

    try:
        with open(os.path.join(source, "config.json")) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return torch.float32
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _check_positions(model, data: TrainData, schedule: Schedule) -> None:
    """Refuse conversations longer than the model's position table (``max_position_embeddings``): in a
    packed row positions restart with every conversation, so only a conversation's own length counts."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    kept = schedule.plan(0).expand(schedule.unit_offsets, schedule.unit_items).items  # what training packs
    lengths = data.flat.lengths[kept]
    too_long = kept[lengths > limit]
    if len(too_long):
        first = int(too_long[0])
        raise ConfigError(
            f"{len(too_long)} conversations are longer than the model's max_position_embeddings={limit}, e.g. "
            f"{data.ids[first]} ({int(data.flat.lengths[first])} tokens); set batch.max_tokens <= {limit} so that "
            "data.overlong (drop, error or truncate_turns) handles them")


def _check_vocab(model, data: TrainData, tokenizer) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}; "
                          "raise model.config.vocab_size (or leave it out to use the tokenizer's size)")
    from refit_fast.data import token_id_problem

    problem = token_id_problem(data.flat.input_ids, vocab)
    if problem:
        raise ConfigError(f"the data does not fit the model: {problem} (the model's embedding)")


@torch.no_grad()
def _reference_logps(lm, batches: Batches, n_pairs: int, env, autocast) -> np.ndarray:
    """log pi_ref of both sides of every DPO pair ([P, 2]), with the initial model, each rank its share
    of the rows, packed exactly as training packs them."""
    was_training = lm.training
    lm.eval()
    out = torch.zeros(n_pairs, 2, dtype=torch.float64, device=env.device)
    for units, row in batches.reference_rows():
        row = {k: v.to(env.device) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        with autocast():
            per_token = lm(row["input_ids"], row["position_ids"], row["cu_seqlens"], row["max_seqlen"],
                           row["labels"], row["seq_ids"], reduction="none")
        logps = sequence_logps(per_token.double(), row["seq_ids"], 2 * len(units))
        out[torch.from_numpy(units).to(env.device)] = logps.view(-1, 2)
    all_reduce_sum(out, env)
    lm.train(was_training)
    return out.cpu().numpy()


def _make_optimizer(cfg: TrainConfig, lm, device):
    o = cfg.optim
    params = [p for p in lm.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    # Weight decay on matrices only (nanoGPT's rule): norms and biases are not decayed.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **extra)


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at the last step."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        span = max(1, total - warmup - 1)
        progress = min(1.0, (s - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _empty_row_loss(wrapped, device):
    """A zero loss through every parameter, for a rank that has no row in this micro-step (the last
    step of an epoch can have fewer rows than ranks x grad_accum): DDP needs every rank to run the
    same number of backward passes, with every parameter in the graph."""
    ids = torch.zeros(1, dtype=torch.long, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)  # one trained token, weight 0 below
    seq = torch.zeros(1, dtype=torch.long, device=device)
    return wrapped(ids, ids, cu, 1, labels, seq, torch.zeros(1, device=device))


def _grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _swift_summary(cfg: TrainConfig, data: TrainData, weighting) -> str:
    """The summary text of Swift's per-conversation weights for swift_stats=group / dataset (computed
    once over the whole data set: every conversation loaded, also those later dropped as longer than
    batch.max_tokens, so the weights never depend on the token budget); "" otherwise.

    Raises ConfigError when every weight is 0 (no group holds two different rewards)."""
    mode = cfg.objective.swift_stats
    if weighting is None or weighting.fixed is None:
        return ""
    w = weighting.fixed
    n, zero = len(w), int((w == 0).sum())
    if mode == "dataset":
        if zero == n:
            raise ConfigError(f"objective.swift_stats: all {n} rewards are equal, so every Swift weight is 0 "
                              "and there is nothing to learn; use algorithm=sft or refit")
        return f"; swift weights from the data set's mean and std: {zero} of {n} conversations have weight 0"
    g = group_index(data.groups)
    size = np.bincount(g)
    lo = np.full(len(size), np.inf)
    hi = np.full(len(size), -np.inf)
    np.minimum.at(lo, g, data.rewards)
    np.maximum.at(hi, g, data.rewards)
    singleton = int((size[g] == 1).sum())
    equal = int(((size[g] > 1) & (lo[g] == hi[g])).sum())
    by = "prompt" if all(k.startswith("p:") for k in data.groups) else f"{cfg.data.group_key!r} field or prompt"
    if zero == n:
        raise ConfigError(
            f"objective.swift_stats=group: no group (by {by}) holds two different rewards ({n} conversations in "
            f"{len(size)} groups: {singleton} alone in their group, {equal} in groups whose rewards are all equal), "
            "so every Swift weight is 0. Log several conversations per prompt, give rows a group field "
            f"(data.group_key={cfg.data.group_key!r}) that joins the conversations of one context, or use "
            "objective.swift_stats=step or dataset")
    hint = ("; most conversations have no group mate with another reward: log several per prompt (the paper "
            "logs 3), join them with a group field, or set objective.swift_stats=step or dataset") if 2 * zero > n else ""
    return (f"; swift weights from {len(size)} groups (by {by}): {zero} of {n} conversations have weight 0 "
               f"({singleton} alone in their group, {equal} in groups whose rewards are all equal){hint}")


def _weight_stats(cfg: TrainConfig, weights: np.ndarray | None) -> dict:
    """Statistics of the per-conversation weights the objective applied in this step (``weights``:
    those of the step's conversations; None: every conversation weighs 1)."""
    if weights is None or not len(weights):
        return {"weight_mean": 1.0, "weight_std": 0.0, "weight_min": 1.0, "weight_max": 1.0}
    out = {"weight_mean": float(weights.mean()), "weight_std": float(weights.std()),
           "weight_min": float(weights.min()), "weight_max": float(weights.max())}
    if cfg.algorithm == "swift" and cfg.objective.swift_stats != "step":  # fixed weights: exact zeros mean something
        out["zero_weight"] = int((weights == 0).sum())
    return out
