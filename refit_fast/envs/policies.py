"""Scripted policies for the clarifying-QA environment: the logged (behaviour) policy and references.

A policy is any callable `messages -> str` (the text of the next agent turn), so a model-backed policy
slots in anywhere these do. The scripted ones read only what the agent sees (the messages), never the
environment's hidden state:

- `BehaviorPolicy`: the logged policy, a stochastic mixture of good and bad behaviour (right about
  47% of the time; mean graded reward about 0.54).
- `OptimalPolicy`: asks about the attribute the items differ in, then names the item (reward 1).
- `AnswerAtOncePolicy`: names a random item at once (right 1 time in n_candidates; graded reward
  0.8 when right, 0.2 when wrong).

    >>> from refit_fast.envs.clarify import ClarifyEnv
    >>> env = ClarifyEnv(); messages = env.reset(7)
    >>> OptimalPolicy()(messages)
    'what color is it ?'
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from refit_fast.envs.clarify import ClarifyConfig, parse_turn
from refit_fast.envs.phrases import ANSWER, ATTRIBUTES, KINDS, MALFORMED_TURNS, QUESTION, VALUE_TO_ATTRIBUTE


@dataclass
class VisibleState:
    """What an agent can read off the conversation.

    kind / options: the item noun and the listed values (from the system message); attribute: the
    attribute those values belong to (the one worth asking about); revealed: attribute -> value the
    user has told; asked: attributes asked so far; turn: agent turns taken so far.

    Example:
        >>> from refit_fast.envs.clarify import ClarifyEnv
        >>> read_state(ClarifyEnv().reset(7)).options
        ['yellow', 'red', 'black', 'green']
    """

    kind: str | None
    options: list[str]
    attribute: str | None
    revealed: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    turn: int = 0
    max_turns: int | None = None


def read_state(messages: list[dict]) -> VisibleState:
    """Parse the visible state from `messages` (the environment's own phrasing).

    Example:
        >>> msgs = [{"role": "system", "content": "items : red cup , blue cup . you have 2 turns ."},
        ...         {"role": "user", "content": "i need the cup ."},
        ...         {"role": "assistant", "content": "what color is it ?"},
        ...         {"role": "user", "content": "it is blue ."}]
        >>> s = read_state(msgs); (s.attribute, s.revealed, s.turn, s.max_turns)
        ('color', {'color': 'blue'}, 1, 2)
    """
    system = str(next((m.get("content") or "" for m in messages if m.get("role") == "system"), ""))
    words = system.split()
    kind, options, max_turns = None, [], None
    if "items" in words:
        listing = words[words.index("items") + 2:]
        listing = listing[: listing.index(".")] if "." in listing else listing
        for item in " ".join(listing).split(" , "):
            parts = item.split()
            if len(parts) == 2 and parts[1] in KINDS and parts[0] in VALUE_TO_ATTRIBUTE:
                options.append(parts[0])
                kind = parts[1]
    if "have" in words and words.index("have") + 1 < len(words) and words[words.index("have") + 1].isdigit():
        max_turns = int(words[words.index("have") + 1])
    attribute = VALUE_TO_ATTRIBUTE[options[0]] if options else None
    state = VisibleState(kind, options, attribute, max_turns=max_turns)
    pending = None  # the attribute of the last question, awaiting the user's reply
    for m in messages:
        if m.get("role") == "assistant":
            state.turn += 1
            turn = parse_turn(m.get("content") or "")
            pending = turn.attribute if turn.kind == "question" else None
            if pending:
                state.asked.append(pending)
        elif m.get("role") == "user" and pending:
            reply = str(m.get("content") or "").split()
            told = [w for w in reply if VALUE_TO_ATTRIBUTE.get(w) == pending]
            if told:
                state.revealed[pending] = told[0]
            pending = None
    return state


def _rng(seed: int, messages: list[dict]) -> random.Random:
    # Randomness is a pure function of (seed, visible conversation): reproducible, order-independent,
    # and independent of anything hidden.
    key = json.dumps([seed, [[m.get("role"), m.get("content")] for m in messages]])
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


@dataclass
class BehaviorPolicy:
    """The logged policy: a stochastic mixture of good and bad behaviour (accuracy ~0.47, graded reward ~0.54).

    First turn: answer at once with a random item (`p_hasty`), ask the informative question
    (`p_informative`), otherwise ask about a useless attribute. Once the user has told the value that
    singles out the item: name it (`p_correct`), else name a wrong item. Later turns with the item
    still unknown: ask the informative question (`p_informative_later`), guess (`p_guess_later`), or ask
    a useless one; on the last turn, guess. Any turn rambles with `p_malformed` (a wasted turn).

    `p_hasty` > 1/2 on purpose: the single most likely first move of the logged data is then a
    premature guess, so behaviour cloning decoded greedily guesses (accuracy ~1/n_candidates), while the
    successful conversations are mostly ask-then-answer, which reward weighting can find.
    Randomness comes from `(seed, messages)` only, so a call is reproducible.

    Example:
        >>> from refit_fast.envs.clarify import ClarifyEnv
        >>> env = ClarifyEnv(); policy = BehaviorPolicy(seed=0)
        >>> policy(env.reset(7)) == policy(env.reset(7))
        True
    """

    seed: int = 0
    config: ClarifyConfig = field(default_factory=ClarifyConfig)
    p_hasty: float = 0.6
    p_informative: float = 0.3
    p_correct: float = 0.85
    p_informative_later: float = 0.5
    p_guess_later: float = 0.3
    p_malformed: float = 0.05

    def __call__(self, messages: list[dict]) -> str:
        rng = _rng(self.seed, messages)
        state = read_state(messages)
        if not state.options:
            return rng.choice(MALFORMED_TURNS)
        max_turns = state.max_turns or self.config.max_turns
        if rng.random() < self.p_malformed:
            return rng.choice(MALFORMED_TURNS)
        useless = [a for a in ATTRIBUTES if a != state.attribute]
        known = state.revealed.get(state.attribute)
        if known in state.options:
            if rng.random() < self.p_correct:
                return _answer(known, state.kind)
            return _answer(rng.choice([v for v in state.options if v != known]), state.kind)
        u = rng.random()
        if state.turn >= max_turns - 1:
            return _answer(rng.choice(state.options), state.kind)
        if state.turn == 0:
            p_guess, p_ask = self.p_hasty, self.p_informative
        else:
            p_guess, p_ask = self.p_guess_later, self.p_informative_later
        if u < p_guess:
            return _answer(rng.choice(state.options), state.kind)
        if u < p_guess + p_ask:
            return QUESTION.format(attribute=state.attribute)
        return QUESTION.format(attribute=rng.choice(useless))


@dataclass
class OptimalPolicy:
    """Ask about the attribute in which the listed items differ, then name the item the user described.

    Reads only the visible text; scores 1.0 (graded and binary) whenever `max_turns >= 2`.

    Example:
        >>> from refit_fast.envs.clarify import ClarifyEnv
        >>> env = ClarifyEnv(); msgs = env.reset(7)
        >>> reply, *_ = env.step(OptimalPolicy()(msgs))
        >>> OptimalPolicy()(env.messages)
        'it is the yellow book .'
    """

    def __call__(self, messages: list[dict]) -> str:
        state = read_state(messages)
        if not state.options:
            return MALFORMED_TURNS[0]
        known = state.revealed.get(state.attribute)
        if known in state.options:
            return _answer(known, state.kind)
        if state.max_turns is not None and state.turn >= state.max_turns - 1:
            return _answer(state.options[0], state.kind)
        return QUESTION.format(attribute=state.attribute)


@dataclass
class AnswerAtOncePolicy:
    """Name a random listed item on the first turn (accuracy 1/n_candidates in expectation).

    Example:
        >>> from refit_fast.envs.clarify import ClarifyEnv
        >>> AnswerAtOncePolicy(seed=0)(ClarifyEnv().reset(7)).startswith("it is the")
        True
    """

    seed: int = 0

    def __call__(self, messages: list[dict]) -> str:
        state = read_state(messages)
        if not state.options:
            return MALFORMED_TURNS[0]
        return _answer(_rng(self.seed, messages).choice(state.options), state.kind)


def _answer(value: str, kind: str | None) -> str:
    return ANSWER.format(value=value, kind=kind or "")


OPTIMAL = OptimalPolicy()
