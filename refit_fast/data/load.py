"""Read logged conversations (JSONL files or a `datasets.Dataset`) and validate every row.

One row is one conversation with one scalar reward:

    {"id": "c1", "messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello", "train": false},
                              {"role": "user", "content": "bye"},
                              {"role": "assistant", "content": "see you"}], "reward": 0.7}

or an already tokenized row: `{"input_ids": [...], "loss_mask": [0, 0, 1, ...], "reward": 0.7}`.
An optional `"group"` (a string or an integer) names the context a conversation was logged for;
conversations with the same group are the m samples Swift standardizes together (without it, the
prompt key groups them).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np

from refit_fast.data.report import ValidationReport

DEFAULT_ROLES = ("system", "user", "assistant")
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # rewards are trained in float32

# Length bounds checked before the expensive steps (json.loads, the chat template, the tokenizer).
# No tokenizer we support averages more than MAX_CHARS_PER_TOKEN characters per token on real text
# (BPE/SentencePiece vocabularies average 3-5 on prose and code; their longest pieces are runs of
# ~100 spaces or dashes; the word tokenizer maps a word to one token but words are short). So a
# conversation whose message contents hold more than MAX_CHARS_PER_TOKEN * max_tokens characters is
# reported as `too_long` without tokenizing it (a 100 MB line used to take minutes and 15 GB).
# A raw JSON line spells one character in at most 12 bytes (a \uXXXX surrogate pair), so a line of
# more than 12 * MAX_CHARS_PER_TOKEN * max_tokens + MAX_LINE_SLACK bytes (the slack for keys and
# other fields) is `too_long` before it is even parsed, and is never read into memory whole.
MAX_CHARS_PER_TOKEN = 64
MAX_LINE_SLACK = 1 << 20


def max_line_bytes(max_tokens: int | None) -> int | None:
    """The raw JSONL line length (bytes) beyond which a row cannot fit in `max_tokens` tokens."""
    return None if max_tokens is None else 12 * MAX_CHARS_PER_TOKEN * max_tokens + MAX_LINE_SLACK
TRAINED_ROLE = "assistant"


@dataclass(slots=True)
class Conversation:
    """One validated row, before tokenization.

    `messages` are the dicts the chat template sees (the `train` flag removed; other keys kept);
    `train[k]` is False for an assistant message logged with `"train": false`. Pre-tokenized rows
    have `messages=None` and carry `input_ids` / `loss_mask` instead. `location` is where the row
    came from (`file.jsonl:12` or `dataset[11]`), for error messages. `group` is the row's group
    field as a string (None when absent or null): it overrides `prompt_key` as the conversation's group.
    """

    id: str
    messages: list[dict] | None
    reward: float
    prompt_key: str
    train: tuple[bool, ...] = ()
    input_ids: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    location: str = ""
    group: str | None = None

    @property
    def is_tokenized(self) -> bool:
        return self.messages is None


def prompt_key_of_messages(messages: list[dict]) -> str:
    """Stable key of the prompt: a hash of the messages before the first assistant turn.

    Conversations with the same key share their prompt (what the DPO baseline pairs on).

    Example:
        >>> a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
        >>> b = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]
        >>> prompt_key_of_messages(a) == prompt_key_of_messages(b)
        True
    """
    prefix = []
    for m in messages:
        if m.get("role") == TRAINED_ROLE:
            break
        prefix.append(m)
    blob = json.dumps(prefix, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def prompt_key_of_tokens(input_ids: np.ndarray, loss_mask: np.ndarray) -> str:
    """Prompt key of a pre-tokenized row: a hash of the tokens before the first trained token.

    Example:
        >>> ids, mask = np.array([1, 5, 6, 7]), np.array([0, 0, 1, 1])
        >>> prompt_key_of_tokens(ids, mask) == prompt_key_of_tokens(ids, np.array([0, 0, 0, 1]))
        False
    """
    first = int(np.argmax(loss_mask)) if loss_mask.any() else len(loss_mask)
    return "t" + hashlib.blake2b(np.ascontiguousarray(input_ids[:first], dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def load_conversations(
    source,
    *,
    messages_key: str = "messages",
    reward_key: str = "reward",
    id_key: str = "id",
    group_key: str = "group",
    roles: Iterable[str] = DEFAULT_ROLES,
    strict: bool = False,
    max_tokens: int | None = None,
    report: ValidationReport | None = None,
) -> tuple[list[Conversation], ValidationReport]:
    """Read and validate conversations; return the good ones and a report of the rest.

    `source`: a path (`.jsonl`, or `.jsonl.gz`), a list of paths, or rows already in memory (a
    `datasets.Dataset` or any iterable of dicts; `datasets` itself is never imported). Keys are
    configurable (`messages_key`, `reward_key`, `id_key`, `group_key`); roles outside `roles` are
    errors. A file that cannot be read to its end (a truncated `.jsonl.gz`) keeps the rows read
    before the break and adds one `read_error` problem located at the line it could not read.
    With `max_tokens`, a JSONL line longer than `max_line_bytes(max_tokens)` bytes (a row that
    cannot fit, see `MAX_CHARS_PER_TOKEN`) is `too_long` without being parsed or held in memory. Rows without an id get `file.jsonl:LINE` (or `dataset[i]`). A group (optional) must be a
    string or an integer (kept as its string, like ids: 1 and "1" are the same group). Blank lines are not rows. In the default
    mode bad rows are skipped and counted in the report; `strict=True` raises `DataError` (a
    `ValueError` whose message starts with `file:line`) at the first bad row.

    Example:
        >>> convs, report = load_conversations("logs.jsonl", reward_key="score")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
        1000 rows: 998 kept, 2 skipped
          malformed_json: 1  (line is not valid JSON) e.g. logs.jsonl:17: Expecting ',' delimiter ...
          no_assistant_turn: 1  (no assistant message) e.g. logs.jsonl:230: ...
    """
    report = report if report is not None else ValidationReport(strict=strict)
    report.strict = strict
    roles = frozenset(roles)
    out: list[Conversation] = []
    seen_ids: set[str] = set()
    for location, default_id, row in _rows(source, report, max_line_bytes(max_tokens)):
        conv = _parse_row(row, location, default_id, report, messages_key, reward_key, id_key, group_key, roles)
        if conv is None:
            continue
        if conv.id in seen_ids:
            report.warn("duplicate_id", location, f"id {conv.id!r} appeared before")
        seen_ids.add(conv.id)
        out.append(conv)
    return out, report


def _rows(source, report: ValidationReport, line_limit: int | None = None) -> Iterator[tuple[str, str, object]]:
    """Yield (location, default id, parsed row); malformed JSON lines are reported here."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    elif isinstance(source, Mapping) and source and all(hasattr(v, "column_names") for v in source.values()):
        raise TypeError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. ds['train']")
    elif not isinstance(source, Iterable):
        raise TypeError(f"source must be a path, a list of paths or an iterable of rows, got {type(source).__name__}")
    items = source if isinstance(source, (list, tuple)) else None
    if items is not None and items and all(isinstance(p, (str, os.PathLike)) for p in items):
        for path in items:
            yield from _jsonl_rows(os.fspath(path), report, line_limit)
        return
    # In-memory rows (a datasets.Dataset iterates as dicts).
    for i, row in enumerate(source):
        report.total += 1
        yield f"dataset[{i}]", f"row{i}", row


def _jsonl_rows(path: str, report: ValidationReport, line_limit: int | None = None) -> Iterator[tuple[str, str, object]]:
    opener = gzip.open if path.endswith(".gz") else open
    name = os.path.basename(path)
    # Binary lines: a line with bad UTF-8 is one malformed row, not a crash of the whole read.
    with opener(path, "rb") as f:
        lineno = 0
        while True:
            try:
                line = f.readline() if line_limit is None else f.readline(line_limit + 1)
                over = line_limit is not None and len(line) > line_limit and not line.endswith(b"\n")
                if over:  # skip the rest of the line without holding it
                    n = len(line)
                    while line and not line.endswith(b"\n"):
                        line = f.readline(1 << 20)
                        n += len(line)
            except (EOFError, OSError, zlib.error) as e:
                # A truncated or corrupt .gz (or a failing disk): the rows read so far are kept and
                # the failure is one located problem (`read_error`), not a traceback.
                report.total += 1
                report.problem("read_error", f"{path}:{lineno + 1}",
                               f"cannot read past line {lineno} ({type(e).__name__}: {e}); "
                               f"the {lineno} lines before are kept (truncated file?)")
                return
            if not line and not over:
                return
            lineno += 1
            if over:
                report.total += 1
                report.problem("too_long", f"{path}:{lineno}", f"line of {n} bytes > {line_limit} (no row of max_tokens="
                               f"{(line_limit - MAX_LINE_SLACK) // (12 * MAX_CHARS_PER_TOKEN)} tokens is that long); not parsed")
                continue
            if not line.strip():
                continue
            report.total += 1
            location = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.problem("malformed_json", location, f"malformed JSON at column {e.colno}: {e.msg}")
                continue
            except ValueError as e:  # bad UTF-8
                report.problem("malformed_json", location, f"malformed JSON: {e}")
                continue
            yield location, f"{name}:{lineno}", row


def _parse_row(row, location, default_id, report, messages_key, reward_key, id_key, group_key, roles) -> Conversation | None:
    if not isinstance(row, Mapping):
        report.problem("not_an_object", location, f"expected a JSON object, got {type(row).__name__}")
        return None
    cid = row.get(id_key)
    if cid is None:
        cid = default_id
    elif isinstance(cid, (str, int)) and not isinstance(cid, bool):
        cid = str(cid)
    else:
        report.problem("bad_id", location, f"{id_key!r} must be a string or integer, got {type(cid).__name__}")
        return None
    group = row.get(group_key)
    if group is not None:
        if not isinstance(group, (str, int)) or isinstance(group, bool):
            report.problem("bad_group", location, f"{group_key!r} must be a string or integer, got {type(group).__name__} {_short(group)}")
            return None
        group = str(group)

    if messages_key not in row and "input_ids" in row:
        parsed = _parse_tokens(row, location, report)
        if parsed is None:
            return None
        reward = _parse_reward(row, location, report, reward_key)
        if reward is None:
            return None
        ids, mask = parsed
        return Conversation(cid, None, reward, prompt_key_of_tokens(ids, mask), (), ids, mask, location, group)

    parsed = _parse_messages(row, location, report, messages_key, roles)
    if parsed is None:
        return None
    messages, train = parsed
    reward = _parse_reward(row, location, report, reward_key)
    if reward is None:
        return None
    return Conversation(cid, messages, reward, prompt_key_of_messages(messages), train, None, None, location, group)


def _parse_messages(row, location, report, key, roles):
    if key not in row:
        have = ", ".join(map(repr, list(row)[:8]))
        report.problem("missing_messages", location, f"no {key!r} key (row has {have}); set messages_key?")
        return None
    raw = row[key]
    if not isinstance(raw, (list, tuple)):
        report.problem("bad_messages", location, f"{key!r} must be a list, got {type(raw).__name__}")
        return None
    if not raw:
        report.problem("empty_conversation", location, f"{key!r} is empty")
        return None
    messages, train, any_assistant = [], [], False
    for k, m in enumerate(raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            report.problem("bad_messages", location, f"message {k} must be an object with string 'role' and 'content', got {_short(m)}")
            return None
        role = m["role"]
        if role not in roles:
            report.problem("unknown_role", location, f"message {k} has role {role!r}; allowed: {sorted(roles)}")
            return None
        flag = m.get("train", True)
        if not isinstance(flag, bool):
            report.problem("bad_train_flag", location, f"message {k}: 'train' must be true or false, got {flag!r}")
            return None
        any_assistant |= role == TRAINED_ROLE
        train.append(flag and role == TRAINED_ROLE)
        messages.append({k2: v for k2, v in m.items() if k2 != "train"} if "train" in m else dict(m))
    if not any_assistant:
        report.problem("no_assistant_turn", location, f"no {TRAINED_ROLE!r} message among {len(messages)}")
        return None
    if not any(train):
        report.problem("no_trained_turn", location, "every assistant message has train: false, nothing to learn")
        return None
    return messages, tuple(train)


def _parse_reward(row, location, report, key) -> float | None:
    r = row.get(key)
    if r is None:
        report.problem("missing_reward", location, f"no {key!r} (one float per conversation); set reward_key?")
        return None
    if isinstance(r, bool) or not isinstance(r, Real):
        report.problem("bad_reward", location, f"{key!r} must be a number, got {type(r).__name__} {_short(r)}")
        return None
    try:
        r = float(r)
    except OverflowError:  # an integer too large for a float64 (e.g. 400 digits)
        report.problem("reward_out_of_range", location, f"{key!r} is an integer of {len(str(abs(r)))} digits, beyond float32")
        return None
    if not math.isfinite(r):
        report.problem("non_finite_reward", location, f"{key!r} is {r}")
        return None
    if abs(r) > _FLOAT32_MAX:
        # Rewards are trained in float32: this one would become inf there (and NaN after standardizing).
        report.problem("reward_out_of_range", location, f"{key!r} is {r:.4g}, beyond float32 (|r| <= {_FLOAT32_MAX:.4g})")
        return None
    return r


def token_id_problem(ids: np.ndarray, vocab: int | None = None) -> str | None:
    """What is wrong with a conversation's token ids, or None: the one rule for ids wherever they come
    from (pre-tokenized rows here, the tokenizer's vocabulary in tokenization, the model's in the
    trainer). Every id is >= 0 and, when ``vocab`` is given, < ``vocab``.

    Example:
        >>> token_id_problem(np.array([3, 7]), vocab=8) is None, token_id_problem(np.array([3, 8]), vocab=8)
        (True, 'token id 8 >= vocabulary size 8')
    """
    if ids.size == 0:
        return None
    if int(ids.min()) < 0:
        return f"negative token id {int(ids.min())}"
    if vocab is not None and int(ids.max()) >= vocab:
        return f"token id {int(ids.max())} >= vocabulary size {vocab}"
    return None


def _parse_tokens(row, location, report):
    ids, mask = row.get("input_ids"), row.get("loss_mask")
    if mask is None:
        report.problem("bad_tokens", location, "a pre-tokenized row needs both 'input_ids' and 'loss_mask'")
        return None
    if isinstance(ids, (list, tuple)) and len(ids) == 0:
        # np.asarray([]) is float64: checked first, so an empty row is not called malformed.
        report.problem("empty_tokens", location, "input_ids is empty" + ("" if isinstance(mask, (list, tuple)) and not mask
                                                                         else " (loss_mask is not)"))
        return None
    try:
        ids_a = np.asarray(ids)
        mask_a = np.asarray(mask)
    except (ValueError, TypeError) as e:
        report.problem("bad_tokens", location, f"input_ids/loss_mask are not flat integer lists: {e}")
        return None
    if ids_a.ndim != 1 or mask_a.ndim != 1 or ids_a.dtype.kind not in "iu" or mask_a.dtype.kind not in "iub":
        report.problem("bad_tokens", location, "input_ids and loss_mask must be flat lists of integers")
        return None
    if len(ids_a) != len(mask_a):
        report.problem("bad_tokens", location, f"len(input_ids)={len(ids_a)} != len(loss_mask)={len(mask_a)}")
        return None
    if len(ids_a) == 0:
        report.problem("empty_tokens", location, "input_ids is empty")
        return None
    problem = token_id_problem(ids_a)
    if problem:
        report.problem("bad_tokens", location, problem)
        return None
    if not np.isin(mask_a, (0, 1)).all():
        report.problem("bad_tokens", location, "loss_mask values must be 0 or 1")
        return None
    return ids_a.astype(np.int64), mask_a.astype(np.uint8)


def _short(x, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."
