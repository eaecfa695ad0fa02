"""Training configuration: nested dataclasses, loaded from YAML with ``key=value`` dotted overrides.

    cfg = load_config("examples/tiny_llama_refit.yaml", ["optim.lr=3e-4", "algorithm=swift"])
    cfg = TrainConfig.from_dict({"algorithm": "refit", "data": {"path": "logs.jsonl"}, ...})

Every field has a default except the data source and the model; :meth:`TrainConfig.validate` turns a
bad value into a ``ConfigError`` that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ALGORITHMS",
    "SWIFT_STATS",
    "BatchConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
]

ALGORITHMS = ("sft", "filtered_sft", "star_gate", "refit", "swift", "dpo")
SWIFT_STATS = ("group", "step", "dataset")


MODEL_DTYPES = ("float32", "bfloat16", "auto")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None  # a local Hugging Face model directory
    config: dict | None = None  # a transformers config dict (with "model_type") for a random model
    init_from: str | None = None  # weights to start from (a save_pretrained or checkpoint-N dir)
    attn_backend: str = "auto"  # auto | flash | torch_varlen | sdpa
    gradient_checkpointing: bool = False
    # the dtype the weights are held, trained and saved in: float32 (fp32 weights, optimizer state and
    # final/), bfloat16, or auto (the dtype model.path / init_from was saved in; float32 for model.config)
    dtype: str = "float32"


@dataclass
class TokenizerConfig:
    # auto: the tokenizer saved in model.init_from / model.path if any, else none for pre-tokenized
    # data, else a word-level tokenizer built from the data; word: always build one; none: data
    # must be pre-tokenized; path: a local tokenizer directory.
    kind: str = "auto"
    path: str | None = None


@dataclass
class DataConfig:
    path: Any = None  # a JSONL path, a list of paths, or (Python API) a list of row dicts
    messages_key: str = "messages"
    reward_key: str = "reward"
    id_key: str = "id"
    # the row field naming a conversation's group (the context it was logged for); rows without it
    # are grouped by prompt (the messages before the first assistant turn). Used by swift_stats=group,
    # star_gate and dpo.
    group_key: str = "group"
    # conversations (DPO: pairs) longer than batch.max_tokens: drop them, stop with an error naming
    # them, or truncate_turns: drop a conversation's oldest whole exchanges until it fits (the final
    # exchange is kept; the packer's rule, refit_fast.packing.turns), dropping it only if that cannot fit
    overlong: str = "drop"


@dataclass
class BatchConfig:
    max_tokens: int = 4096  # token budget of one packed row = one micro-batch
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    strategy: str = "bfd"  # packer strategy: bfd | ffs
    pad_to: int | None = None  # pad every row to this many tokens (>= max_tokens; fixed shapes for compilers)
    row_dtype: str = "int64"  # int32 halves the row bytes the packer writes and the host-to-device copy moves


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd (plain SGD: for tests and checks)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0  # applied to matrices only (not norms / biases)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ObjectiveConfig:
    normalize: str = "sequence"  # sequence: divide by #conversations in the step; token: by #trained tokens
    # Swift's r~ = (r - mean) / (std + swift_eps), population std, with the mean and std of:
    # group: the conversations of the same group (prompt or group field), over the whole data set,
    # computed once before training (the paper's); dataset: all conversations, computed once;
    # step: the conversations of each optimizer step.
    swift_stats: str = "group"
    swift_eps: float = 1e-6
    filter_top_fraction: float = 0.5  # filtered_sft keeps this fraction of highest-reward conversations
    filter_min_reward: float | None = None  # filtered_sft: keep reward >= this instead (overrides the fraction)
    dpo_beta: float = 0.1
    dpo_pairs: str = "disjoint"  # disjoint: each conversation in <= 1 pair per group; all: every ordered pair


@dataclass
class CheckpointConfig:
    every: int = 0  # save checkpoint-{step} every N steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    save_final: bool = True  # output_dir/final: save_pretrained (safetensors) + tokenizer


@dataclass
class LogConfig:
    every: int = 10  # one log line every N steps (0: none)
    progress: str = "auto"  # auto (when stderr is a TTY) | true | false
    tensorboard: str = "auto"  # auto (when installed) | true | false
    quiet: bool = False  # no log lines at all (the Python API in loops)


@dataclass
class TrainConfig:
    """All training options. See the field comments; defaults in parentheses in the README."""

    algorithm: str = "refit"  # sft | filtered_sft | star_gate | refit | swift | dpo
    output_dir: str = "runs/refit"
    seed: int = 0
    steps: int | None = None  # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0  # used when steps is None (a fraction stops mid-epoch)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int = 0  # torch threads on CPU; 0: auto (1 for models < 20M parameters, else torch's default)
    distributed: str = "ddp"  # ddp | fsdp  (only used under torchrun with WORLD_SIZE > 1)
    # true: continue from the latest checkpoint in output_dir (refused when the settings that change
    # the result differ from the checkpoint's); false: start fresh; force: continue anyway (the
    # changed settings are printed and recorded in metrics.jsonl as resume_forced)
    resume: bool | str = False
    overwrite: bool = False  # delete checkpoints already in output_dir (else they stop a fresh run)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, overrides: list[str] | dict | None = None) -> "TrainConfig":
        """Build from a nested dict (YAML-shaped), apply overrides, validate.

        ``overrides``: ``["optim.lr=1e-4", ...]`` or ``{"optim.lr": 1e-4}``.

        Example:
            >>> cfg = TrainConfig.from_dict({"data": {"path": "x.jsonl"}, "model": {"config": {}}},
            ...                             ["optim.lr=3e-4", "algorithm=swift"])
            >>> cfg.optim.lr, cfg.algorithm
            (0.0003, 'swift')
        """
        d = _normalize_shorthands(_deep_copy(d or {}))
        if overrides:
            items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
            for key, value in items:
                _set_dotted(d, key, value)
            d = _normalize_shorthands(d)
        cfg = _build(cls, d, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """Plain nested dict (what is written to ``output_dir/config.yaml``)."""
        out = asdict(self)
        out["optim"]["betas"] = list(out["optim"]["betas"])
        return out

    def replace(self, **overrides) -> "TrainConfig":
        """A validated copy with dotted overrides, e.g. ``cfg.replace(**{"optim.lr": 1e-5})``.

        Example:
            >>> cfg = TrainConfig.from_dict({"data": {"path": "x.jsonl"}, "model": {"config": {}}})
            >>> cfg.replace(algorithm="sft", **{"batch.grad_accum": 4}).batch.grad_accum
            4
        """
        return TrainConfig.from_dict(self.to_dict(), overrides)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config {key}: {why}")

        need(self.algorithm in ALGORITHMS, "algorithm", f"must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        m = self.model
        need(not (m.path and m.config is not None), "model", "give model.path or model.config, not both")
        need(bool(m.path) or m.config is not None or bool(m.init_from), "model",
             "give model.path (a local HF directory), model.config (a dict for a random model) or model.init_from")
        need(m.config is None or isinstance(m.config, dict), "model.config", "must be a mapping of transformers config fields")
        for key, p in (("model.path", m.path), ("model.init_from", m.init_from), ("tokenizer.path", self.tokenizer.path)):
            need(p is None or os.path.isdir(str(p)), key,
                 f"{p!r} is not a local directory (nothing is downloaded at run time)")
        from refit_fast.model.attention import check_backend_name
        from refit_fast.packing import check_max_tokens, check_overlong, check_pad_to, check_strategy

        def rule(key: str, check, *args) -> None:  # the packer's and the model's own validators
            try:
                check(*args)
            except ValueError as e:
                msg = str(e).removeprefix(f"{key}: ")
                raise ConfigError(f"config {key}: {msg}") from None

        rule("model.attn_backend", check_backend_name, m.attn_backend, "model.attn_backend")
        need(m.dtype in MODEL_DTYPES, "model.dtype", f"must be one of {list(MODEL_DTYPES)}, got {m.dtype!r}")
        need(self.tokenizer.kind in ("auto", "word", "none", "path"), "tokenizer",
             f"must be auto, word, none or a local path, got {self.tokenizer.kind!r}")
        need(self.tokenizer.kind != "path" or bool(self.tokenizer.path), "tokenizer.path", "is missing")
        need(self.data.path is not None and self.data.path != [], "data.path", "is missing (a JSONL file or a list of files)")
        need(isinstance(self.data.group_key, str) and bool(self.data.group_key), "data.group_key",
             f"must be a non-empty field name, got {self.data.group_key!r}")
        rule("data.overlong", check_overlong, self.data.overlong)
        b = self.batch
        rule("batch.max_tokens", check_max_tokens, b.max_tokens)
        # one token is never trained (no earlier token predicts it): a row needs two
        need(_is_int(b.max_tokens) and b.max_tokens >= 2, "batch.max_tokens", f"must be an integer >= 2, got {b.max_tokens!r}")
        need(_is_int(b.grad_accum) and b.grad_accum >= 1, "batch.grad_accum", f"must be an integer >= 1, got {b.grad_accum!r}")
        rule("batch.strategy", check_strategy, b.strategy)
        rule("batch.pad_to", check_pad_to, b.pad_to, b.max_tokens)
        need(b.row_dtype in ("int64", "int32"), "batch.row_dtype", f"must be int64 or int32, got {b.row_dtype!r}")
        need(self.steps is None or (_is_int(self.steps) and self.steps >= 1), "steps", f"must be an integer >= 1 or null, got {self.steps!r}")
        need(_num(self.epochs) and self.epochs > 0, "epochs", f"must be > 0, got {self.epochs!r}")
        need(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        o = self.optim
        need(o.name in ("adamw", "sgd"), "optim.name", f"must be adamw or sgd, got {o.name!r}")
        need(_num(o.lr) and o.lr >= 0, "optim.lr", f"must be a finite number >= 0, got {o.lr!r}")
        need(_num(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio!r}")
        need(_is_int(o.warmup_steps) and o.warmup_steps >= 0, "optim.warmup_steps", f"must be an integer >= 0, got {o.warmup_steps!r}")
        need(_num(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay!r}")
        need(isinstance(o.betas, (list, tuple)) and len(o.betas) == 2 and all(_num(x) and 0 <= x < 1 for x in o.betas),
             "optim.betas", f"must be two numbers in [0, 1), got {o.betas!r}")
        need(_num(o.eps) and o.eps > 0, "optim.eps", f"must be > 0, got {o.eps!r}")
        need(_num(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip!r}")
        j = self.objective
        need(j.normalize in ("sequence", "token"), "objective.normalize", f"must be sequence or token, got {j.normalize!r}")
        need(j.swift_stats in SWIFT_STATS, "objective.swift_stats",
             f"must be one of {list(SWIFT_STATS)}, got {j.swift_stats!r}")
        need(_num(j.swift_eps) and j.swift_eps >= 0, "objective.swift_eps", f"must be >= 0, got {j.swift_eps!r}")
        need(_num(j.filter_top_fraction) and 0 < j.filter_top_fraction <= 1, "objective.filter_top_fraction",
             f"must be in (0, 1], got {j.filter_top_fraction!r}")
        need(j.filter_min_reward is None or _num(j.filter_min_reward), "objective.filter_min_reward", "must be a number or null")
        need(_num(j.dpo_beta) and j.dpo_beta > 0, "objective.dpo_beta", f"must be > 0, got {j.dpo_beta!r}")
        need(j.dpo_pairs in ("disjoint", "all"), "objective.dpo_pairs", f"must be disjoint or all, got {j.dpo_pairs!r}")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", f"must be auto, fp32 or bf16, got {self.precision!r}")
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "device",
             f"must be auto, cpu or cuda, got {self.device!r}")
        need(_is_int(self.cpu_threads) and self.cpu_threads >= 0, "cpu_threads", f"must be an integer >= 0, got {self.cpu_threads!r}")
        need(self.distributed in ("ddp", "fsdp"), "distributed", f"must be ddp or fsdp, got {self.distributed!r}")
        c = self.checkpoint
        need(_is_int(c.every) and c.every >= 0, "checkpoint.every", f"must be an integer >= 0, got {c.every!r}")
        need(_is_int(c.keep_last) and c.keep_last >= 1, "checkpoint.keep_last", f"must be an integer >= 1, got {c.keep_last!r}")
        need(_is_int(self.log.every) and self.log.every >= 0, "log.every", f"must be an integer >= 0, got {self.log.every!r}")
        for key in ("progress", "tensorboard"):
            v = getattr(self.log, key)
            need(v in ("auto", "true", "false"), f"log.{key}", f"must be auto, true or false, got {v!r}")
        need(self.resume in (True, False, "force"), "resume", f"must be true, false or force, got {self.resume!r}")
        need(bool(self.output_dir), "output_dir", "is missing")
        need(not os.path.isfile(str(self.output_dir)), "output_dir",
             f"{self.output_dir!r} is a file, not a directory{_resolved(self.output_dir)}")
        return self

    def check_files(self) -> "TrainConfig":
        """Check that every data.path file exists, is a file and is not empty (``ConfigError`` naming
        the key, the path and the directory a relative path was resolved against); rows given in
        memory are not checked. :meth:`validate` leaves the data files alone, so that a config can be
        built before its data is written; ``refit-fast train`` calls both."""
        p = self.data.path
        paths = [p] if isinstance(p, (str, os.PathLike)) else p if isinstance(p, (list, tuple)) else []
        for i, path in enumerate(paths):
            if not isinstance(path, (str, os.PathLike)):
                continue  # in-memory rows
            key = "data.path" if isinstance(p, (str, os.PathLike)) else f"data.path[{i}]"
            path = os.fspath(path)
            if not os.path.exists(path):
                raise ConfigError(f"config {key}: {path!r} does not exist{_resolved(path)}")
            if not os.path.isfile(path):
                raise ConfigError(f"config {key}: {path!r} is a directory, not a JSONL file{_resolved(path)}")
            if os.path.getsize(path) == 0:
                raise ConfigError(f"config {key}: {path!r} is empty (no conversation to train on)")
        return self


def load_config(path_or_dict, overrides: list[str] | dict | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file (or a dict) plus ``key=value`` overrides.

    Example:
        >>> cfg = load_config({"data": {"path": "x.jsonl"}, "model": {"config": {}}}, ["batch.max_tokens=512"])
        >>> cfg.batch.max_tokens
        512
    """
    if isinstance(path_or_dict, TrainConfig):
        return TrainConfig.from_dict(path_or_dict.to_dict(), overrides) if overrides else path_or_dict
    if isinstance(path_or_dict, (str, os.PathLike)):
        import yaml

        path = os.fspath(path_or_dict)
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist{_resolved(path)}")
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory, not a YAML file")
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path_or_dict}: the YAML must be a mapping at the top level")
    else:
        d = path_or_dict
    return TrainConfig.from_dict(d, overrides)


# ---- helpers -------------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    """A finite real number (not a bool; 1e400 reads as inf and is refused, as is nan)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _resolved(path) -> str:
    """' (resolved against CWD)' for a relative path: where the run looked for it."""
    return "" if os.path.isabs(os.fspath(path)) else f" (resolved against {os.getcwd()})"


def _yaml_problem(e) -> str:
    """One line from a PyYAML error: the problem and where, e.g. 'mapping values are not allowed
    here (line 2, column 7)'."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _normalize_shorthands(d: dict) -> dict:
    """``tokenizer: word`` / ``tokenizer: some/dir`` and ``data: file.jsonl`` as shorthands."""
    tok = d.get("tokenizer")
    if tok is None and "tokenizer" in d:
        d["tokenizer"] = {"kind": "none"}
    elif isinstance(tok, str):
        d["tokenizer"] = {"kind": tok} if tok in ("auto", "word", "none") else {"kind": "path", "path": tok}
    elif isinstance(tok, dict) and tok.get("path") and tok.get("kind", "auto") == "auto":
        tok["kind"] = "path"
    data = d.get("data")
    if isinstance(data, (str, list)):
        d["data"] = {"path": data}
    return d


def _split_override(item: str) -> tuple[str, Any]:
    import yaml

    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; numbers are what users mean here.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str) and p in ("tokenizer", "data"):
            node[p] = nxt = _normalize_shorthands({p: nxt})[p]
        if nxt is None:
            node[p] = nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls, d, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or 'root'}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"config: unknown key {prefix}{key}{hint}")
        f = fields[key]
        sub = _SECTIONS.get((cls, key))
        if sub is not None:
            kwargs[key] = _build(sub, value if value is not None else {}, f"{prefix}{key}.")
        elif key == "config" and cls is ModelConfig:
            kwargs[key] = value  # free-form transformers fields
        else:
            kwargs[key] = _coerce(f, value, prefix + key)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value, key: str):
    """YAML gives ints for floats (lr: 1) and strings for 1e-4; make them what the field means."""
    default = f.default if f.default is not dataclasses.MISSING else None
    ann = str(f.type)
    if value is None:
        return None
    if "float" in ann and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config {key}: expected a number, got {value!r}") from None
    if ann.startswith("float") and _is_int(value):
        return float(value)
    if ann.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, str) and isinstance(value, bool):
        return "true" if value else "false"  # log.progress: true
    if ann == "bool | str" and isinstance(value, str):  # resume: true | false | force
        v = value.strip().lower()
        if v in ("true", "false", "1", "0", "yes", "no"):
            return v in ("true", "1", "yes")
        if v == "force":
            return "force"
        raise ConfigError(f"config {key}: expected true, false or force, got {value!r}")
    if ann == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if ann == "bool" and not isinstance(value, bool):
        raise ConfigError(f"config {key}: expected true or false, got {value!r}")
    if ann == "tuple" and isinstance(value, list):
        return tuple(value)
    return value


_SECTIONS = {
    (TrainConfig, "model"): ModelConfig,
    (TrainConfig, "tokenizer"): TokenizerConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "batch"): BatchConfig,
    (TrainConfig, "optim"): OptimConfig,
    (TrainConfig, "objective"): ObjectiveConfig,
    (TrainConfig, "checkpoint"): CheckpointConfig,
    (TrainConfig, "log"): LogConfig,
}
