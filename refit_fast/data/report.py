"""What happened to every input row: kept, or skipped with a reason and a location.

Nothing is dropped silently: each skipped row is counted under one reason code, and the first few
of each reason keep their location (`file.jsonl:12`) for the summary.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Reason codes (stable: tests and users match on them) and their one-line meaning.
REASONS = {
    "malformed_json": "line is not valid JSON",
    "read_error": "the file could not be read past this line (truncated or corrupt .gz); rows before it kept",
    "not_an_object": "row is not a JSON object",
    "missing_messages": "no messages field",
    "bad_messages": "messages is not a list of {role, content} objects",
    "unknown_role": "a message has a role outside the allowed roles",
    "bad_train_flag": "a message's `train` is not true/false",
    "empty_conversation": "messages is empty",
    "no_assistant_turn": "no assistant message",
    "no_trained_turn": "every assistant message has train: false",
    "missing_reward": "no reward (or null)",
    "bad_reward": "reward is not a number",
    "non_finite_reward": "reward is NaN or infinite",
    "reward_out_of_range": "reward is beyond float32 (|r| > 3.4e38), the dtype it is trained in",
    "bad_id": "id is not a string or integer",
    "bad_group": "group is not a string or integer",
    "bad_tokens": "pre-tokenized input_ids/loss_mask are malformed",
    "empty_tokens": "pre-tokenized input_ids is empty",
    "template_error": "the chat template failed to render",
    "template_mismatch": "the chat template breaks the prefix property and per-turn masking could not locate "
                         "and verify every trained turn",
    "empty_mask": "no token would be trained",
    "too_long": "longer than max_tokens",
    "special_token_in_content": "a message's text holds a special token (strict mode only; else a warning)",
}
WARNINGS = {
    "duplicate_id": "an id seen before (row kept)",
    "truncated": "cut to max_tokens (row kept)",
    "special_token_in_content": "a message's text holds a special token's text (e.g. a turn marker), "
                                "tokenized as that token (row kept)",
    "first_token_trained": "loss_mask[0] was 1; cleared, the first token has no context",
    "default_system_prompt": "no system message, so the chat template adds its default system prompt "
                             "(the policy is trained with it; row kept)",
    "per_turn_mask": "the chat template breaks the prefix property here, so the turns were masked one by one "
                     "from the token offsets, each span verified against the rendered text (row kept)",
    "assistant_text_dropped": "the chat template renders only the end of an assistant message (e.g. without "
                              "its reasoning block); the rendered part is trained (row kept)",
}
_EXAMPLES_PER_REASON = 3


class DataError(ValueError):
    """A bad input row in strict mode; the message starts with its location (`file.jsonl:12: ...`)."""

    def __init__(self, reason: str, location: str, detail: str):
        super().__init__(f"{location}: {detail} [{reason}]")
        self.reason, self.location, self.detail = reason, location, detail


@dataclass
class ValidationReport:
    """Counts of rows read, kept and skipped (by reason), plus warnings, with example locations.

    With `strict=True`, `problem()` raises `DataError` instead of counting.

    Example:
        >>> r = ValidationReport()
        >>> r.total += 2
        >>> r.problem("missing_reward", "a.jsonl:2", "no 'reward' key")
        >>> (r.kept, r.skipped["missing_reward"])
        (1, 1)
        >>> print(r.summary())  # doctest: +ELLIPSIS
        2 rows: 1 kept, 1 skipped
          missing_reward: 1  (no reward (or null)) e.g. a.jsonl:2: no 'reward' key
    """

    strict: bool = False
    total: int = 0
    skipped: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason or warning -> ["location: detail", ...]

    @property
    def kept(self) -> int:
        return self.total - sum(self.skipped.values())

    @property
    def ok(self) -> bool:
        """True when no row was skipped."""
        return not self.skipped

    def problem(self, reason: str, location: str, detail: str) -> None:
        """Record a skipped row (or raise `DataError` in strict mode)."""
        if reason not in REASONS:
            raise KeyError(f"unknown reason code {reason!r}")
        if self.strict:
            raise DataError(reason, location, detail)
        self.skipped[reason] += 1
        self._example(reason, location, detail)

    def warn(self, code: str, location: str, detail: str) -> None:
        """Record something worth knowing about a kept row; never raises."""
        if code not in WARNINGS:
            raise KeyError(f"unknown warning code {code!r}")
        self.warnings[code] += 1
        self._example(code, location, detail)

    def _example(self, code: str, location: str, detail: str) -> None:
        ex = self.examples.setdefault(code, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(f"{location}: {detail}")

    def summary(self) -> str:
        """Human-readable report: totals, then one line per reason and warning with an example."""
        lines = [f"{self.total} rows: {self.kept} kept, {sum(self.skipped.values())} skipped"]
        for kind, counts, meaning in (("", self.skipped, REASONS), ("warning ", self.warnings, WARNINGS)):
            for code, n in counts.most_common():
                lines.append(f"  {kind}{code}: {n}  ({meaning[code]}) e.g. {'; '.join(self.examples[code])}")
        return "\n".join(lines)
