"""Chat-template tokenization into `(input_ids, loss_mask)` with verified assistant-turn spans.

Most stock chat templates have no `{% generation %}` markers, so spans come from prefixes: for an
assistant message k, the tokens of `messages[:k]` rendered with the generation prompt end where
turn k's content starts, and the tokens of `messages[:k+1]` end where the turn (content and
end-of-turn tokens) ends. Both must be token prefixes of the whole conversation's tokens.

A conversation that breaks this (a template that rewrites earlier turns, such as one dropping their
`<think>` blocks; content starting with spaces that the tokenizer glues to the role header's newline)
is masked turn by turn instead, and still checked (`_per_turn_mask`): each trained turn's rendered text
is located in the whole text by rendering the conversation with that message's content replaced by
a sentinel, its tokens are taken from the token offsets, and both the text and the tokens are
verified; the conversation is counted as a `per_turn_mask` warning. One whose turns cannot all be
located and verified is reported as `template_mismatch`, never trained on a guessed mask.
"""
from __future__ import annotations

import types
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from refit_fast.data.load import MAX_CHARS_PER_TOKEN, Conversation, load_conversations, token_id_problem
from refit_fast.data.report import ValidationReport
from refit_fast.data.tokenizer import build_word_tokenizer  # noqa: F401  (the doctests use it)


@dataclass(slots=True)
class TokenizedConversation:
    """One conversation ready for the packer.

    `input_ids` int64 [T]; `loss_mask` uint8 [T], 1 where token j is a target (the packer shifts:
    the label of position j-1 is `input_ids[j]` when `loss_mask[j] == 1`); `loss_mask[0]` is always 0.
    `prompt_key` is equal for conversations with the same prompt (messages before the first assistant turn);
    `group` is the row's group field (None when absent), which overrides it as the conversation's group.
    """

    id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    reward: float
    prompt_key: str
    group: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return int(self.loss_mask.sum())


def tokenize_conversations(
    conversations: Iterable[Conversation],
    tokenizer,
    *,
    max_tokens: int | None = None,
    overflow: str = "skip",
    strict: bool = False,
    progress: bool = True,
    batch_size: int = 256,
    chat_template: str | None = None,
    exact_prefix: bool = False,
    report: ValidationReport | None = None,
) -> tuple[list[TokenizedConversation], ValidationReport]:
    """Tokenize conversations with the tokenizer's chat template; mask exactly the trained assistant turns.

    The mask covers each assistant turn whose message was not logged `"train": false`: its content
    and everything the template emits after it up to the next turn (the end-of-turn token), but not
    its role header / generation prompt. Rows that cannot be masked safely are reported (or raise
    `DataError` when `strict`): `template_error`, `template_mismatch`, `empty_mask`, and `too_long`
    when longer than `max_tokens` with `overflow="skip"`; `overflow="truncate"` keeps the first
    `max_tokens` tokens instead (a `truncated` warning). Pre-tokenized rows pass through, checked
    against the vocabulary (with `tokenizer=None`, allowed when every row is pre-tokenized, they are
    only checked; the model's vocabulary is the caller's to check). `progress` shows a tqdm bar. Rendering and tokenizing go in batches
    of `batch_size` conversations (the fast tokenizer encodes a batch in one call).

    With `max_tokens`, a conversation whose message contents hold more than
    `MAX_CHARS_PER_TOKEN * max_tokens` characters (64 per token: no supported tokenizer averages
    more on real text) is `too_long` before it is rendered or tokenized, with either `overflow`
    (far too long to be worth truncating; tokenizing it could take minutes and gigabytes).

    A message whose text holds a special token's text (a turn marker such as `<|end|>` or
    `<|assistant|>`, BOS/EOS...) gets it tokenized as that very token, so typed text can forge turns:
    each such row is counted as a `special_token_in_content` warning (row kept, the first locations
    shown), or a problem in strict mode.

    Turn boundaries come from rendered prefixes. A conversation whose prefixes break the prefix
    property is masked turn by turn from the token offsets (fast tokenizers), each turn's span
    verified (see `_per_turn_mask`), and counted as a `per_turn_mask` warning (plus
    `assistant_text_dropped` where the template rendered only the end of an assistant message, e.g.
    without its reasoning block: the rendered part is what is trained); it is `template_mismatch` only
    when that fails too. With a fast
    tokenizer a boundary is settled from the conversation's token offsets when the prefix is a
    character prefix ending exactly at a token end (the common case, one tokenization per
    conversation); any other boundary, and every boundary with `exact_prefix=True`, is checked by
    tokenizing the prefix and comparing it token by token with the conversation's first tokens.

    Example:
        >>> tok = build_word_tokenizer(["hi hello"])
        >>> conv, _ = load_conversations([{"messages": [{"role": "user", "content": "hi"},
        ...     {"role": "assistant", "content": "hello"}], "reward": 1.0}])
        >>> [t], report = tokenize_conversations(conv, tok, progress=False)
        >>> tok.convert_ids_to_tokens(t.input_ids[t.loss_mask == 1])
        ['hello', '<|end|>']
    """
    if overflow not in ("skip", "truncate"):
        raise ValueError(f"overflow must be 'skip' or 'truncate', got {overflow!r}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    conversations = list(conversations)
    if report is None:
        report = ValidationReport(strict=strict)
        report.total = len(conversations)
    report.strict = strict
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if tokenizer is None and any(not c.is_tokenized for c in conversations):
        raise ValueError("tokenizer=None works for pre-tokenized rows only; these rows have messages")
    if any(not c.is_tokenized for c in conversations) and not template:
        raise ValueError("the tokenizer has no chat_template; pass chat_template=... (a Jinja string)")
    vocab = len(tokenizer) if tokenizer is not None else None
    enc = _ChatEncoder(tokenizer, template) if tokenizer is not None else None

    char_limit = None if max_tokens is None else MAX_CHARS_PER_TOKEN * max_tokens
    special = _special_token_pattern(tokenizer) if tokenizer is not None else None
    injected = default_system_prompt(tokenizer, template) if tokenizer is not None and template else None

    from tqdm.auto import tqdm

    out: list[TokenizedConversation] = []
    with tqdm(total=len(conversations), disable=not progress, unit="conv", desc="tokenizing", mininterval=0.5) as bar:
        for lo in range(0, len(conversations), batch_size):
            chunk = conversations[lo : lo + batch_size]
            if char_limit is not None:
                chunk = [c for c in chunk if not _too_many_chars(c, char_limit, max_tokens, report)]
            if special is not None:
                chunk = [c for c in chunk if not _special_in_content(c, special, report)]
            if injected is not None:
                for c in chunk:
                    if not c.is_tokenized and not any(m["role"] == "system" for m in c.messages):
                        report.warn("default_system_prompt", c.location, f"the template adds {_clip(injected)}")
            pairs = _tokenize_chunk(chunk, enc, report, exact_prefix)
            for conv, pair in zip(chunk, pairs):
                if pair is None:
                    continue
                t = _finish(conv, *pair, vocab, max_tokens, overflow, report)
                if t is not None:
                    out.append(t)
            bar.update(min(batch_size, len(conversations) - lo))
    return out, report


def load_tokenized(source, tokenizer, **opts) -> tuple[list[TokenizedConversation], ValidationReport]:
    """`load_conversations` then `tokenize_conversations`, with one report covering both.

    Options are split by name between the two (`messages_key`, `reward_key`, `id_key`, `group_key`, `roles` go to
    loading; `max_tokens`, `overflow`, `progress`, `batch_size`, `chat_template`, `exact_prefix` to
    tokenization;
    `strict` to both; `max_tokens` also to loading, which refuses impossibly long lines unparsed).

    Example:
        >>> data, report = load_tokenized("logs.jsonl", tokenizer, max_tokens=4096)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    load_keys = {"messages_key", "reward_key", "id_key", "group_key", "roles", "max_tokens"}
    tok_keys = {"max_tokens", "overflow", "progress", "batch_size", "chat_template", "exact_prefix"}
    unknown = set(opts) - load_keys - tok_keys - {"strict"}
    if unknown:
        raise TypeError(f"load_tokenized got unknown options {sorted(unknown)}")
    strict = opts.get("strict", False)
    convs, report = load_conversations(source, strict=strict, **{k: v for k, v in opts.items() if k in load_keys})
    return tokenize_conversations(
        convs, tokenizer, strict=strict, report=report, **{k: v for k, v in opts.items() if k in tok_keys}
    )


def assistant_spans(messages: list[dict], tokenizer, *, chat_template: str | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of one conversation and the `[start, end)` token span of every assistant turn.

    Meant for inspecting a template. Where the template breaks the prefix property (it rewrites
    earlier turns, or content starting with spaces glues to the header's newline), the turns are
    located one by one and checked as :func:`tokenize_conversations` does it (a `per_turn_mask`
    there; a `UserWarning` here), and each span is the tokens trained for that turn. Raises
    `ValueError` when neither way can check a turn.

    Example:
        >>> tok = build_word_tokenizer(["hi hello"])
        >>> ids, spans = assistant_spans([{"role": "user", "content": "hi"},
        ...                               {"role": "assistant", "content": "hello"}], tok)
        >>> spans
        [(5, 7)]
    """
    enc = _ChatEncoder(tokenizer, chat_template or tokenizer.chat_template)
    enc.compiled = enc.backend = None  # one conversation: the public calls, nothing to speed up
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    texts = enc.render([messages], False)
    texts += enc.render([messages[:k] for k in turns], True)
    texts += enc.render([messages[: k + 1] for k in turns], False)
    ids = enc.encode(texts)
    full, n = ids[0], len(turns)
    spans = []
    for j, k in enumerate(turns):
        for what, pre in (("generation-prompt prefix", ids[1 + j]), ("prefix ending with this turn", ids[1 + n + j])):
            if _token_boundary(full, pre) is None:
                why = (f"assistant message {k}: the tokens of the {what} are not a prefix of the conversation's "
                       f"tokens; {_diff(tokenizer, full, pre)}")
                return full, _spans_turn_by_turn(messages, turns, tokenizer, chat_template, texts[0], full, why)
        spans.append((len(ids[1 + j]), len(ids[1 + n + j])))
    return full, spans


def _spans_turn_by_turn(messages, turns, tokenizer, chat_template, text, full, why):
    """assistant_spans where the prefix property fails: the spans of `_per_turn_mask`'s mask."""
    enc = _ChatEncoder(tokenizer, chat_template or tokenizer.chat_template)
    enc.compiled = None  # the public render, as the caller's
    [(ids, offsets)] = enc.encode_with_offsets([text])
    mask, notes = (None, "it needs a fast tokenizer's token offsets") if list(ids) != list(full) else \
        _per_turn_mask(types.SimpleNamespace(messages=messages), turns, enc, text, list(ids), offsets)
    if mask is None:
        raise ValueError(f"{why}; per-turn masking failed: {notes}")
    on = np.flatnonzero(mask)
    cuts = np.flatnonzero(np.diff(on) > 1) + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(on, cuts)] if len(on) else []
    if len(runs) != len(turns):
        raise ValueError(f"{why}; per-turn masking found {len(runs)} trained runs for {len(turns)} assistant turns")
    warnings.warn(f"assistant_spans: {why}; located turn by turn: "
                  + ", ".join(f"message {k} {how}" for k, how, _ in notes), UserWarning, stacklevel=3)
    return runs


# --- internals -------------------------------------------------------------------------------


class _ChatEncoder:
    """Renders chats and encodes texts the way `apply_chat_template(tokenize=True)` would, but faster.

    Public transformers calls cost ~2x the Jinja render and the Rust encode themselves (message
    normalization, BatchEncoding). So plain `{role, content}` chats render through the compiled
    template directly and texts encode through the backend tokenizer, after a one-time check that
    both give exactly what the public calls give; anything else takes the public path.
    """

    _PLAIN_KEYS = frozenset(("role", "content"))

    def __init__(self, tokenizer, template: str | None):
        self.tok, self.template = tokenizer, template
        self.compiled = None
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._checked = False
        if template:
            try:  # private helper, so only an optimization: any failure keeps the public path
                from transformers.utils.chat_template_utils import _compile_jinja_template

                self.compiled = _compile_jinja_template(template)
                self.template_vars = dict(tokenizer.special_tokens_map)
            except Exception:
                self.compiled = None

    def render(self, chats: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not chats:
            return []
        if self.compiled is None:
            return self._render_public(chats, add_generation_prompt)
        out = [None] * len(chats)
        slow = []
        for i, chat in enumerate(chats):
            if all(m.keys() <= self._PLAIN_KEYS for m in chat):
                out[i] = self.compiled.render(
                    messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.template_vars
                )
            else:
                slow.append(i)
        for i, text in zip(slow, self._render_public([chats[i] for i in slow], add_generation_prompt)):
            out[i] = text
        return out

    def _render_public(self, chats, add_generation_prompt) -> list[str]:
        if not chats:
            return []
        out = self.tok.apply_chat_template(
            list(chats), chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return [out] if isinstance(out, str) else list(out)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self._encode_public(texts)

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list | None]]:
        """(ids, character offsets per token) per text; offsets None without a fast backend."""
        if self.backend is not None:
            return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [(ids, None) for ids in self._encode_public(texts)]

    def _encode_public(self, texts: list[str]) -> list[list[int]]:
        # add_special_tokens=False as in apply_chat_template: the template writes BOS and friends itself.
        enc = self.tok(texts, add_special_tokens=False, return_attention_mask=False)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc  # BatchEncoding/dict, or a bare list
        return [list(x) for x in ids]

    def check_fast_path(self, chat: list[dict]) -> None:
        """Compare the fast path with the public calls on one chat; fall back for good on any difference."""
        if self._checked:
            return
        # A template that raises on this chat raises here: the caller reports the row, and the
        # check runs again on the next chat (`_checked` is set only once it completed).
        for gen in (False, True):
            if self.compiled is not None and self.render([chat], gen) != self._render_public([chat], gen):
                self.compiled = None
        if self.backend is not None:
            texts = self._render_public([chat], False)
            if self.encode(texts) != self._encode_public(texts):
                self.backend = None
        self._checked = True


def _tokenize_chunk(chunk: Sequence[Conversation], enc: _ChatEncoder, report, exact: bool = False):
    """(input_ids, loss_mask) or None per conversation of the chunk.

    Each trained assistant turn k has two boundaries: the end of `messages[:k]` rendered with the
    generation prompt (content starts) and the end of `messages[:k+1]` (turn ends; the whole text
    for the last message). A boundary is settled from the full text's token offsets when the prefix
    is a character prefix ending exactly at a token's end with no token across it; otherwise
    (or with `exact`) the prefix is tokenized and must equal the conversation's first tokens.
    """
    results: list = [None] * len(chunk)
    jobs = []  # (chunk index, trained turns, [(start text, end text) per turn])
    full_chats, start_chats, end_chats = [], [], []
    for i, conv in enumerate(chunk):
        if conv.is_tokenized:
            results[i] = (conv.input_ids, conv.loss_mask)
            continue
        msgs, last = conv.messages, len(conv.messages) - 1
        turns = [k for k, t in enumerate(conv.train) if t]
        jobs.append((i, turns))
        full_chats.append(msgs)
        start_chats.extend(msgs[:k] for k in turns)
        end_chats.extend(msgs[: k + 1] for k in turns if k != last)  # the last turn ends with the text
    if not jobs:
        return results
    try:
        enc.check_fast_path(full_chats[0])
        full_texts = enc.render(full_chats, False)
        start_texts = iter(enc.render(start_chats, True))
        end_texts = iter(enc.render(end_chats, False))
    except Exception:
        # One conversation broke the batch: redo them one by one to locate and report it.
        return _tokenize_one_by_one(chunk, [i for i, _ in jobs], enc, report, results, exact)
    full_enc = enc.encode_with_offsets(full_texts)

    # Pass 1: settle boundaries from offsets; collect the prefixes that need tokenizing.
    pending = {}  # prefix text -> token ids (filled in pass 2)
    work = []
    for (i, turns), text, (ids, offsets) in zip(jobs, full_texts, full_enc):
        ends = starts = None
        if offsets is not None and not exact and len(offsets):
            starts, ends = (np.asarray(x) for x in zip(*offsets))
            if (np.diff(ends) < 0).any() or (np.diff(starts) < 0).any():
                starts = ends = None  # out-of-order offsets: trust only tokenized prefixes
        bounds = []
        last = len(chunk[i].messages) - 1
        for k in turns:
            pair = []
            for prefix in (next(start_texts), text if k == last else next(end_texts)):
                n = len(ids) if prefix is text else _offset_boundary(prefix, text, starts, ends)
                if n is None:
                    pending[prefix] = None
                    n = prefix
                pair.append(n)
            bounds.append(pair)
        work.append((i, turns, ids, bounds, text, offsets))

    # Pass 2: tokenize the unsettled prefixes in one batch (each distinct text once).
    if pending:
        for prefix, ids in zip(pending, enc.encode(list(pending))):
            pending[prefix] = ids
    for i, turns, ids, bounds, text, offsets in work:
        conv, full = chunk[i], list(ids)
        mask = np.zeros(len(full), dtype=np.uint8)
        for k, (start, end) in zip(turns, bounds):
            s, e = (_token_boundary(full, pending[b]) if isinstance(b, str) else b for b in (start, end))
            if s is None or e is None or e < s:
                what = "generation-prompt prefix" if s is None else "prefix ending with this turn"
                pre = pending[start] if s is None else pending.get(end) if isinstance(end, str) else None
                why = (f"assistant message {k}: the tokens of the {what} are not a prefix of the conversation's tokens"
                       + (f"; {_diff(enc.tok, full, pre)}" if pre is not None else ""))
                mask, notes = _per_turn_mask(conv, turns, enc, text, full, offsets)
                if mask is None:
                    report.problem("template_mismatch", conv.location, f"{why}; per-turn masking failed: {notes}")
                    break
                report.warn("per_turn_mask", conv.location, f"{why}; masked turn by turn: " +
                            ", ".join(f"message {k2} {how}" for k2, how, _ in notes))
                for k2, how, dropped in notes:
                    if dropped:
                        report.warn("assistant_text_dropped", conv.location,
                                    f"message {k2}: the template renders it {how}, without {_clip(dropped)}")
                results[i] = (full, mask)
                break
            mask[s:e] = 1
        else:
            results[i] = (full, mask)
    return results


# Stands in for one message's content to locate where the template puts it: plain lowercase letters,
# which trimming, splitting on tags and the like leave alone.
_SENTINEL = "refitfastturnsentinel"


def _per_turn_mask(conv, turns, enc, text: str, ids: list[int], offsets):
    """The loss mask of a conversation whose prefixes break the prefix property, turn by turn, checked.

    Returns `(mask, notes)` with one `(message index, how it was rendered, dropped text)` per trained
    turn, or `(None, why)`. For each trained assistant message k, in order:

    1. Locate. The conversation is rendered with message k's content replaced by a sentinel; the
       sentinel must appear exactly once, and the text before and after it must be the whole text's
       own start and end (so rendering message k changes nothing else). What lies between is the
       template's rendering of message k, `X`.
    2. Check the text. `X` must be the content itself, the content with whitespace trimmed off its
       ends, or its end (the template dropped a leading part, e.g. a `<think>` block: reported as
       `assistant_text_dropped`; `X` must then hold non-whitespace text).
    3. End of turn. `messages[:k+1]` rendered with the sentinel gives what the template writes after
       message k when it ends the chat (the end-of-turn token and what follows it, the exact path's
       rule); the whole text must continue with exactly that right after `X`.
    4. Tokens. The trained tokens are those whose offsets lie inside `X` plus the end-of-turn text;
       they must be consecutive, follow the previous turn's, cover every non-whitespace character of
       it, and decode to it (whitespace aside; normalized as the tokenizer normalizes; not checked
       where a token is unknown); a token reaching across either edge may hold only whitespace of
       the turn (it stays untrained: the role header's newline glued to the content's leading
       spaces), never its text.
    """
    if offsets is None or enc.backend is None:
        return None, "it needs a fast tokenizer's token offsets"
    msgs, last = conv.messages, len(conv.messages) - 1
    if _SENTINEL in text:
        return None, "the conversation holds the sentinel text"
    swapped = [[{**m, "content": _SENTINEL} if j == k else m for j, m in enumerate(msgs)] for k in turns]
    try:
        located = enc.render(swapped, False)
        ending = iter(enc.render([sw[: k + 1] for k, sw in zip(turns, swapped) if k != last], False))
    except Exception as e:
        return None, f"the template failed on the sentinel: {type(e).__name__}: {e}"
    st = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
    en = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
    normalizer = getattr(enc.backend, "normalizer", None)
    unk = getattr(enc.tok, "unk_token_id", None)
    mask = np.zeros(len(ids), dtype=np.uint8)
    notes, pos, next_token = [], 0, 0
    for k, rendered in zip(turns, located):
        where = f"assistant message {k}"
        if rendered.count(_SENTINEL) != 1:
            return None, f"{where}: the template does not render its content once, verbatim"
        cut = rendered.index(_SENTINEL)
        before, after = rendered[:cut], rendered[cut + len(_SENTINEL):]
        if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
            return None, f"{where}: changing its content changes the rest of the rendered conversation"
        x0, x1 = len(before), len(text) - len(after)
        how, dropped = _rendered_as(msgs[k]["content"], text[x0:x1])
        if how is None:
            return None, f"{where}: the template renders it as {_clip(text[x0:x1])}, not its content"
        if k == last:
            eot = after
        else:
            alone = next(ending)
            if alone.count(_SENTINEL) != 1:
                return None, f"{where}: the template does not render it once when it ends the chat"
            eot = alone[alone.index(_SENTINEL) + len(_SENTINEL):]
            if not text.startswith(eot, x1):
                return None, (f"{where}: the text after it is not the end of turn {_clip(eot)} the template "
                              "writes when it ends the chat")
        xe = x1 + len(eot)
        if x0 < pos:
            return None, f"{where}: it overlaps the previous trained turn"
        inside = (st >= x0) & (en <= xe)
        idx = np.flatnonzero(inside)
        if not len(idx) or idx[-1] - idx[0] + 1 != len(idx) or idx[0] < next_token:
            return None, f"{where}: its tokens are not one run after the previous turn's"
        for j in np.flatnonzero((st < xe) & (en > x0) & ~inside):
            if text[max(st[j], x0): min(en[j], xe)].strip():
                return None, (f"{where}: token {j} ({enc.tok.convert_ids_to_tokens(ids[j])!r}) holds both "
                              "this turn's text and the text next to it")
        segment = text[x0:xe]
        covered = np.zeros(len(segment) + 1, dtype=np.int64)
        np.add.at(covered, st[idx] - x0, 1)
        np.add.at(covered, en[idx] - x0, -1)
        covered = np.cumsum(covered)[:-1] > 0
        if any(not c.isspace() and not ok for c, ok in zip(segment, covered)):
            return None, f"{where}: its tokens do not cover its text"
        sel = [ids[j] for j in idx]
        if unk is None or unk not in sel:
            decoded = enc.tok.decode(sel, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            want = normalizer.normalize_str(segment) if normalizer is not None else segment
            if "".join(decoded.split()) != "".join(want.split()):
                return None, f"{where}: its tokens decode to {_clip(decoded)}, not {_clip(segment)}"
        mask[idx] = 1
        notes.append((k, how, dropped))
        pos, next_token = xe, int(idx[-1]) + 1
    return mask, notes


def _rendered_as(content: str, shown: str) -> tuple[str | None, str]:
    """How the template rendered `content` as `shown`: ("exact" | "trimmed" | "as its last N characters", the
    dropped leading text), or (None, "") when `shown` is none of these."""
    if shown == content:
        return "exact", ""
    tail = len(content) - len(content.rstrip())
    for cut in range(tail + 1):  # trailing whitespace the template may have trimmed
        body = content[: len(content) - cut]
        if body.endswith(shown):
            lead = body[: len(body) - len(shown)]
            if not lead.strip():
                return "trimmed", ""
            if shown.strip():
                return f"as its last {len(shown)} characters", lead
    return None, ""


def _offset_boundary(prefix: str, text: str, starts, ends) -> int | None:
    """Token index where `prefix` ends in `text`'s tokens, if the offsets settle it; else None.

    Settled only when the prefix is a character prefix and ends exactly where a token ends with no
    token across it. A gap before the boundary (whitespace the offsets leave out, e.g. byte-level
    BPE trims a leading space off `" word"`) is not settled: that space may be tokenized with the
    next word in the conversation but alone in the prefix.
    """
    if ends is None or not text.startswith(prefix):
        return None
    b = len(prefix)
    n = int(np.searchsorted(ends, b, side="right"))
    tight = (n == 0 and b == 0) or (n > 0 and ends[n - 1] == b)
    if tight and (n == len(starts) or starts[n] >= b):
        return n
    return None


def _token_boundary(full: list[int], prefix_ids: list[int]) -> int | None:
    """len(prefix_ids) if they are the first tokens of `full`, else None (prefix property broken)."""
    return len(prefix_ids) if full[: len(prefix_ids)] == list(prefix_ids) else None


def _tokenize_one_by_one(chunk, indices, enc, report, results, exact):
    for i in indices:
        conv = chunk[i]
        try:
            enc.check_fast_path(conv.messages)  # until one chat passed it, the check itself may raise
            enc.render([conv.messages], False)
            for k, t in enumerate(conv.train):
                if t:
                    enc.render([conv.messages[:k]], True)
                    enc.render([conv.messages[: k + 1]], False)
        except Exception as e:  # template code can raise anything (jinja raise_exception, TypeError...)
            report.problem("template_error", conv.location, f"chat template failed: {type(e).__name__}: {e}")
            continue
        results[i] = _tokenize_chunk([conv], enc, report, exact)[0]
    return results


def _special_token_pattern(tokenizer):
    """A regex matching the text of any special token of the tokenizer (None if it has none)."""
    import re

    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            texts.add(str(t))
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def default_system_prompt(tokenizer, chat_template: str | None = None) -> str | None:
    r"""The system block a chat template adds to a conversation without a system message (Qwen 2.5's
    "You are Qwen, created by Alibaba Cloud...", Llama 3.1's knowledge-date block), or None.

    Found by rendering one user turn with and without a system message: the text the template puts
    before a given system prompt's content (its system header) also appearing before the user turn
    when there is none means the template injected one. A template that refuses either rendering, or
    has no system header, gives None.

    Example:
        >>> tok = build_word_tokenizer(["hi"])
        >>> default_system_prompt(tok) is None          # the word tokenizer's template adds nothing
        True
        >>> qwen_like = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
        ...              "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        ...              "{% endfor %}")
        >>> default_system_prompt(tok, qwen_like)
        '<|im_start|>system\nYou are helpful.'
    """
    user, system = "refitfastuserturn", "refitfastsystemturn"
    try:
        plain = tokenizer.apply_chat_template([{"role": "user", "content": user}], chat_template=chat_template,
                                              tokenize=False)
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}], chat_template=chat_template,
            tokenize=False)
    except Exception:  # no template, or one that refuses a system message
        return None
    if not (isinstance(plain, str) and isinstance(with_system, str) and user in plain and system in with_system):
        return None
    header = with_system.split(system, 1)[0]
    bos = tokenizer.bos_token or ""
    header_only = header[len(bos):] if bos and header.startswith(bos) else header
    before_user = plain.split(user, 1)[0]
    if not header_only.strip() or header_only not in before_user:
        return None
    start = before_user.index(header_only)
    # with a system message the user turn follows its content after ``between`` (the system block's end
    # and the user header); the injected block is what comes before that
    between = with_system.split(system, 1)[1].split(user, 1)[0]
    end = len(before_user) - len(between) if between and before_user.endswith(between) else len(before_user)
    return before_user[start:end] or None


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _special_in_content(conv, pattern, report) -> bool:
    """Report a message text holding a special token's text; True (skip) only in strict mode."""
    if conv.is_tokenized:
        return False
    for k, m in enumerate(conv.messages):
        hit = pattern.search(m["content"])
        if hit:
            detail = f"message {k} ({m['role']}) contains {hit.group()!r} at character {hit.start()}"
            if report.strict:
                report.problem("special_token_in_content", conv.location, detail)
                return True
            report.warn("special_token_in_content", conv.location, detail)
            return False
    return False


def _too_many_chars(conv, limit: int, max_tokens: int, report) -> bool:
    """True (and reported `too_long`) when the contents alone cannot fit in max_tokens tokens."""
    if conv.is_tokenized:
        return False
    n = sum(len(m["content"]) for m in conv.messages)
    if n <= limit:
        return False
    report.problem("too_long", conv.location, f"{n} characters > {limit} = {MAX_CHARS_PER_TOKEN} per token x "
                   f"max_tokens={max_tokens} (not tokenized)")
    return True


def _finish(conv, ids, mask, vocab, max_tokens, overflow, report) -> TokenizedConversation | None:
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=np.uint8)
    problem = token_id_problem(ids, vocab) if conv.is_tokenized else None
    if problem:
        report.problem("bad_tokens", conv.location, problem)
        return None
    if max_tokens is not None and len(ids) > max_tokens:
        if overflow == "skip":
            report.problem("too_long", conv.location, f"{len(ids)} tokens > max_tokens={max_tokens}")
            return None
        report.warn("truncated", conv.location, f"{len(ids)} tokens cut to {max_tokens}")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    if mask[0]:
        # The packer never trains position 0 (nothing precedes it); say so rather than lose it quietly.
        report.warn("first_token_trained", conv.location, "loss_mask[0] was 1")
        mask = mask.copy()
        mask[0] = 0
    if not mask.any():
        report.problem("empty_mask", conv.location, f"no trained token among {len(ids)} (all assistant turns empty or cut?)")
        return None
    return TokenizedConversation(conv.id, ids, mask, conv.reward, conv.prompt_key, conv.group)


def _diff(tokenizer, full, pre) -> str:
    j = next((j for j, (a, b) in enumerate(zip(full, pre)) if a != b), min(len(full), len(pre)))
    show = lambda x: tokenizer.convert_ids_to_tokens(list(x[max(0, j - 3) : j + 3]))  # noqa: E731
    return f"first difference at token {j}: conversation {show(full)} vs prefix {show(pre)}"
