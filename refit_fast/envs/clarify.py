"""A deterministic, seeded simulator of question answering with clarifying questions.

The agent sees a small scene of items of one kind that differ in exactly one attribute (their colour,
size or material); the user asks for "the ball" without saying which. At each of `max_turns` agent
turns the agent either asks about one attribute (the simulated user answers truthfully) or names an
item. Asking about the attribute in which the items differ identifies the item; asking about any
other attribute is useless, because all items share its value.

The reward arrives on the last step of an episode (every earlier step pays 0.0). It is **graded** by
default, shaped like a judge's 0-10 "overall" score rescaled to [0, 1] (the paper's reward): getting
the item right dominates, and play quality gives partial credit, so two right (or two wrong)
conversations can differ. With `max_turns` = T:

- a turn is **wasted** if it is malformed, a question about an attribute every item shares
  (useless), or a question about an attribute already asked (repeated); each turn counts once;
- `informative` = 1 if the agent asked about the attribute the items differ in on a turn before its
  final one (so the reply could still be used), else 0;
- quality `q = 0.5 * informative + 0.5 * (1 - wasted / T)`, in [0, 1];
- reward = `0.6 + 0.4 * q` if the final turn names the hidden item, else `0.4 * q` (a wrong item, an
  ambiguous answer, or no answer by the end of the last turn); rounded to 6 decimals.

So every right conversation (>= 0.6) beats every wrong one (<= 0.4), and `reward > 0.5` means right
in both modes (`SUCCESS_THRESHOLD`). With T = 3: ask the informative question then name the item
1.0; a lucky answer at once 0.8; a wrong answer at once 0.2; informative question then a wrong item
0.4; useless question, informative question, right item 0.933333 (q = 5/6). Requiring the question
before the final turn keeps stalling from paying: an episode with no answer has at most one turn that
is not wasted, so it scores at most 0.2 (T = 1) or 0.4 * (0.5 + 0.5 / T) <= 0.3, less than answering
at once is worth in expectation (0.2 + 0.6 / n_candidates >= 0.35). `graded_reward` is
the rule as a function. `ClarifyConfig(reward="binary")` pays 1 for the right item and 0 otherwise
(a wrong or ambiguous item, running out of turns), with no credit for play.

    >>> env = ClarifyEnv()
    >>> messages = env.reset(episode_seed=7)
    >>> messages[0]["content"]
    'items : yellow book , red book , black book , green book . ask about color , size or material , or name the item . you have 3 turns .'
    >>> messages[1]["content"]
    'can you hand me the book ?'
    >>> env.step("what size is it ?")[:3]      # useless: every book is tiny
    ('it is tiny .', False, 0.0)
    >>> env.step("what color is it ?")[:3]     # informative
    ('it is yellow .', False, 0.0)
    >>> env.step("it is the yellow book .")[1:3]   # right, one wasted turn of 3: 0.6 + 0.4 * 5/6
    (True, 0.933333)
    >>> env = ClarifyEnv(reward="binary"); _ = env.reset(7)  # the same play, paid 0/1
    >>> [env.step(t)[2] for t in ("what size is it ?", "what color is it ?", "it is the yellow book .")]
    [0.0, 0.0, 1.0]

Every text the environment and the bundled policies emit is lower-case words and punctuation separated
by single spaces, so `str.split()` tokenizes it losslessly and `vocabulary()` lists every word.
Agent turns are parsed leniently (case, punctuation, extra words); a turn that cannot be read as one
question or one item is a wasted turn, never an error. The grammar is in `parse_turn`.
"""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

from refit_fast.envs.phrases import (
    ANSWER,
    ATTRIBUTES,
    KINDS,
    NOT_UNDERSTOOD,
    OPENINGS,
    QUESTION,
    REPLY,
    SHARED_OPENINGS,
    VALUE_TO_ATTRIBUTE,
    all_phrases,
)

MAX_CHARS = 4096  # agent text beyond this is not read: bounds the work on very long turns
REWARDS = ("graded", "binary")
# Every right conversation scores above this and every wrong one below, in both reward modes
# (graded: right >= 0.6, wrong <= 0.4; binary: 1 and 0), so a logged reward tells right from wrong.
SUCCESS_THRESHOLD = 0.5

_WORD = re.compile(r"[a-z0-9]+|\?")


@dataclass(frozen=True)
class ClarifyConfig:
    """Knobs of the clarifying-QA world; the defaults are what `collect` and `evaluate` use.

    n_candidates: items in the scene (answering at once is right with probability 1/n_candidates);
        at most the number of values of the smallest attribute (4).
    max_turns: agent turns per episode; the last one must be an answer to score.
    p_mention_shared: probability that the opening names a value all items share (a distractor).
    instructions: end the system message with a one-line protocol hint, so any chat model can play.
    reward: "graded" (default; the judge-like score in [0, 1] of `graded_reward`: 0.6 + 0.4 * q for the
        right item, 0.4 * q otherwise, where the play quality q = 0.5 * [asked the informative question
        before the final turn] + 0.5 * (1 - wasted turns / max_turns), rounded to 6 decimals) or
        "binary" (1.0 for the right item, 0.0 otherwise).

    Example:
        >>> ClarifyConfig(n_candidates=3).n_candidates, ClarifyConfig().reward
        (3, 'graded')
    """

    n_candidates: int = 4
    max_turns: int = 3
    p_mention_shared: float = 0.25
    instructions: bool = True
    reward: str = "graded"

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        smallest = min(len(v) for v in ATTRIBUTES.values())
        if not 2 <= self.n_candidates <= smallest:
            raise ValueError(f"n_candidates must be in [2, {smallest}], got {self.n_candidates}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.p_mention_shared <= 1.0:
            raise ValueError(f"p_mention_shared must be in [0, 1], got {self.p_mention_shared}")


@dataclass(frozen=True)
class Episode:
    """The hidden and visible facts of one episode.

    kind: the item noun; attribute: the one attribute in which the items differ; shared: the values of
    the other attributes (common to all items); options: the items' values of `attribute`, in the
    order shown; target: index into `options` of the item the user means.

    Example:
        >>> ep = make_episode(7)
        >>> ep.attribute, ep.options[ep.target], ep.shared
        ('color', 'yellow', {'size': 'tiny', 'material': 'glass'})
    """

    seed: int
    kind: str
    attribute: str
    shared: dict[str, str]
    options: tuple[str, ...]
    target: int
    opening: str

    def value_of(self, attribute: str, option: int | None = None) -> str:
        """The value of `attribute` for item `option` (default: the hidden target).

        Example:
            >>> make_episode(7).value_of("color") in ATTRIBUTES["color"]
            True
        """
        option = self.target if option is None else option
        return self.options[option] if attribute == self.attribute else self.shared[attribute]

    def item_name(self, option: int | None = None) -> str:
        """Short name of item `option` (default: the target), e.g. 'yellow book'.

        Example:
            >>> make_episode(7).item_name()
            'yellow book'
        """
        option = self.target if option is None else option
        return f"{self.options[option]} {self.kind}"


def make_episode(episode_seed: int, config: ClarifyConfig | None = None) -> Episode:
    """Draw one episode; a pure function of `(episode_seed, config)`.

    Example:
        >>> make_episode(3) == make_episode(3)
        True
    """
    config = config or ClarifyConfig()
    # random.Random(int) is stable across Python versions and processes (no hash randomization).
    rng = random.Random(int(episode_seed))
    kind = rng.choice(KINDS)
    attribute = rng.choice(list(ATTRIBUTES))
    options = tuple(rng.sample(ATTRIBUTES[attribute], config.n_candidates))
    shared = {a: rng.choice(v) for a, v in ATTRIBUTES.items() if a != attribute}
    target = rng.randrange(config.n_candidates)
    if rng.random() < config.p_mention_shared:
        value = shared[rng.choice(sorted(shared))]
        opening = rng.choice(SHARED_OPENINGS).format(value=value, kind=kind)
    else:
        opening = rng.choice(OPENINGS).format(kind=kind)
    return Episode(int(episode_seed), kind, attribute, shared, options, target, opening)


def system_message(episode: Episode, config: ClarifyConfig | None = None) -> str:
    """The scene as the agent sees it: the items, then (optionally) the protocol and the turn budget.

    Example:
        >>> system_message(make_episode(7)).split(" . ")[0]
        'items : yellow book , red book , black book , green book'
    """
    config = config or ClarifyConfig()
    text = "items : " + " , ".join(f"{v} {episode.kind}" for v in episode.options) + " ."
    if config.instructions:
        names = list(ATTRIBUTES)
        text += f" ask about {' , '.join(names[:-1])} or {names[-1]} , or name the item ."
        text += f" you have {config.max_turns} turns ."
    return text


def normalize(text) -> list[str]:
    """Lenient word split used to read agent turns: NFKC, lower case, words, digits and '?' only.

    Example:
        >>> normalize("  What COLOR is it?!  ")
        ['what', 'color', 'is', 'it', '?']
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = unicodedata.normalize("NFKC", text[:MAX_CHARS]).casefold()
    return _WORD.findall(text)


# Synonyms a chat model might use; mapped before parsing.
_ALIASES = {"colour": "color", "colors": "color", "colours": "color", "sizes": "size",
            "materials": "material", "wood": "wooden"}


@dataclass(frozen=True)
class Turn:
    """A parsed agent turn.

    kind: 'question', 'answer' or 'malformed'; attribute: the attribute asked about (questions);
    values / kinds: the value words and item nouns named (answers).

    Example:
        >>> parse_turn("What size is it?").attribute
        'size'
    """

    kind: str
    attribute: str | None = None
    values: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()


def parse_turn(text) -> Turn:
    """Read an agent turn leniently. The grammar, on the words of `normalize(text)`:

    - a **question** names exactly one attribute (color, size, material) and no value word:
      "what color is it ?", "size ?", "tell me the material";
    - an **answer** names at least one value word, no attribute and no '?': "it is the red ball .",
      "red"; it commits to the items consistent with every value and noun it names;
    - anything else is **malformed** (empty, no known word, two attributes, "is it red ?" — yes/no
      questions are not part of the game) and wastes the turn.

    Example:
        >>> parse_turn("It's the RED ball!").kind, parse_turn("is it red ?").kind
        ('answer', 'malformed')
    """
    words = [_ALIASES.get(w, w) for w in normalize(text)]
    attributes = sorted({w for w in words if w in ATTRIBUTES})
    values = tuple(dict.fromkeys(w for w in words if w in VALUE_TO_ATTRIBUTE))
    kinds = tuple(dict.fromkeys(w for w in words if w in KINDS))
    if len(attributes) == 1 and not values:
        return Turn("question", attribute=attributes[0])
    if values and not attributes and "?" not in words:
        return Turn("answer", values=values, kinds=kinds)
    return Turn("malformed")


def _is_canonical(text, turn: Turn, episode: Episode) -> bool:
    """Is the turn said exactly as the logged policy says it ("what color is it ?", "it is the red ball .")?

    Lenient parsing accepts rambling such as "it is the red red red ball it is"; this stricter check lets
    an evaluation report language quality beyond parseability. Case and punctuation are ignored.
    """
    words = normalize(text)
    if turn.kind == "question":
        return _same_words(words, QUESTION.format(attribute=turn.attribute))
    if turn.kind == "answer":
        return len(turn.values) == 1 and _same_words(words, ANSWER.format(value=turn.values[0], kind=episode.kind))
    return False


def _same_words(words: list[str], phrase: str) -> bool:
    # The policies' phrases (phrases.QUESTION / ANSWER) are the reference; '?' is punctuation here.
    return [w for w in words if w != "?"] == [w for w in normalize(phrase) if w != "?"]


def _matching_options(episode: Episode, turn: Turn) -> list[int]:
    """Indices of the items consistent with every value and noun an answer names."""
    if any(k != episode.kind for k in turn.kinds):
        return []
    return [i for i in range(len(episode.options))
            if all(episode.value_of(VALUE_TO_ATTRIBUTE[v], i) == v for v in turn.values)]


def graded_reward(correct: bool, informative: bool, wasted: int, max_turns: int) -> float:
    """The graded reward of one episode (see the module docstring), rounded to 6 decimals.

    correct: the final turn named the hidden item; informative: the informative question was asked
    before the final turn; wasted: malformed, useless or repeated turns (each counted once), in
    [0, max_turns]. Computed in exact fractions, so equal inputs give the same float everywhere.

    Example:
        >>> graded_reward(True, True, 0, 3), graded_reward(True, False, 0, 3), graded_reward(False, False, 0, 3)
        (1.0, 0.8, 0.2)
        >>> graded_reward(True, True, 1, 3), graded_reward(False, True, 0, 3)
        (0.933333, 0.4)
    """
    if max_turns < 1 or not 0 <= wasted <= max_turns:
        raise ValueError(f"need max_turns >= 1 and 0 <= wasted <= max_turns, got {wasted}, {max_turns}")
    quality = Fraction(int(bool(informative)), 2) + Fraction(max_turns - wasted, 2 * max_turns)
    reward = (Fraction(3, 5) if correct else Fraction(0)) + Fraction(2, 5) * quality
    return float(round(reward, 6))


class ClarifyEnv:
    """The clarifying-QA environment. One episode at a time; text in, text out.

    `reset(episode_seed)` returns the opening `messages` (system scene + ambiguous user request);
    `step(agent_text)` returns `(user_reply_or_None, done, reward, info)`. The reply is None when the
    episode ends (an answer, or the last turn). `info` holds `well_formed` (bool), `kind`
    ('question' | 'answer' | 'malformed'), `canonical` (said exactly in the logged policy's words,
    e.g. "what color is it ?"; stricter than `well_formed`), `attribute` (asked), `answer` (the item
    named, or None when the answer did not single out one item), `correct`, `informative` (the
    question asked about the attribute that tells the items apart), `wasted` (a malformed turn, or a
    useless or repeated question: what the graded reward docks) and `turn` (0-based). `messages` is
    the conversation so far; `reward` is the last step's reward (the episode's, once it is done).
    With `episode_seed=None`, `reset` draws the next seed from the env's own stream (`seed`).

    Construct with a `ClarifyConfig`, or with its fields as keywords: `ClarifyEnv(seed=0,
    n_candidates=3, max_turns=2)`; `ClarifyEnv(5)` means seed 5 with the default config.

    Example:
        >>> env = ClarifyEnv(seed=0)
        >>> _ = env.reset(7)
        >>> reply, done, reward, info = env.step("hmm")
        >>> reply, done, info["well_formed"]
        ('sorry , i do not understand .', False, False)
    """

    def __init__(self, config: ClarifyConfig | int | None = None, seed: int = 0, **config_fields):
        if isinstance(config, int) and not isinstance(config, bool):  # ClarifyEnv(seed) by position
            config, seed = None, config
        if config is not None and config_fields:
            raise ValueError("pass either a ClarifyConfig or its fields as keywords, not both")
        self.config = config if config is not None else ClarifyConfig(**config_fields)
        self.seed = seed
        self._rng = random.Random(seed)
        self.episode: Episode | None = None
        self.messages: list[dict] = []
        self.turn = 0
        self.done = True
        self.reward = 0.0
        self._asked: set[str] = set()
        self._wasted = 0
        self._informative = False

    def reset(self, episode_seed: int | None = None) -> list[dict]:
        """Start an episode; returns a copy of the opening messages.

        Example:
            >>> [m["role"] for m in ClarifyEnv().reset(1)]
            ['system', 'user']
        """
        if episode_seed is None:
            episode_seed = self._rng.randrange(2**62)
        self.episode = make_episode(episode_seed, self.config)
        self.messages = [
            {"role": "system", "content": system_message(self.episode, self.config)},
            {"role": "user", "content": self.episode.opening},
        ]
        self.turn, self.done, self.reward = 0, False, 0.0
        self._asked, self._wasted, self._informative = set(), 0, False
        return [dict(m) for m in self.messages]

    def step(self, agent_text) -> tuple[str | None, bool, float, dict]:
        """Play one agent turn. Never raises on any text (malformed turns are wasted turns).

        Example:
            >>> env = ClarifyEnv(); _ = env.reset(7)
            >>> env.step("what color is it ?")[0]
            'it is yellow .'
        """
        if self.episode is None or self.done:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        ep = self.episode
        text = agent_text if isinstance(agent_text, str) else ("" if agent_text is None else str(agent_text))
        self.messages.append({"role": "assistant", "content": text})
        turn = parse_turn(text)
        last = self.turn == self.config.max_turns - 1
        info = {"turn": self.turn, "kind": turn.kind, "well_formed": turn.kind != "malformed",
                "canonical": _is_canonical(text, turn, ep), "attribute": turn.attribute, "answer": None,
                "correct": False, "informative": False, "wasted": turn.kind == "malformed"}
        reply, done = None, last
        if turn.kind == "answer":
            matches = _matching_options(ep, turn)
            info["answer"] = ep.item_name(matches[0]) if len(matches) == 1 else None
            info["correct"] = matches == [ep.target]
            done = True
        elif turn.kind == "question":
            info["informative"] = turn.attribute == ep.attribute
            info["wasted"] = not info["informative"] or turn.attribute in self._asked
            if info["informative"] and not last:
                self._informative = True  # heard while a turn remains to use it
            self._asked.add(turn.attribute)
            # Truthful: the target's value (shared attributes have one value for all items).
            reply = REPLY.format(value=ep.value_of(turn.attribute))
        else:
            reply = NOT_UNDERSTOOD
        self._wasted += info["wasted"]
        reward = 0.0
        if done and self.config.reward == "binary":
            reward = float(info["correct"])
        elif done:
            reward = graded_reward(info["correct"], self._informative, self._wasted, self.config.max_turns)
        if done:
            reply = None
        else:
            self.messages.append({"role": "user", "content": reply})
        self.turn += 1
        self.done, self.reward = done, reward
        return reply, done, reward, info


def vocabulary(config: ClarifyConfig | None = None) -> list[str]:
    """Every word the environment and the bundled policies can emit, sorted.

    Feed it (or `corpus()`) to a word-level tokenizer builder; a model can then say anything the
    logged data says. Roles and chat-template tokens are not included.

    Example:
        >>> v = vocabulary(); "ball" in v and "?" in v and len(v) < 300
        True
    """
    config = config or ClarifyConfig()
    words = set()
    for text in all_phrases():
        words.update(text.replace("{kind}", "").replace("{value}", "").replace("{attribute}", "").split())
    words.update(KINDS)
    words.update(ATTRIBUTES)
    words.update(VALUE_TO_ATTRIBUTE)
    ep = make_episode(0, config)
    words.update(system_message(ep, config).split())
    words.update(str(t) for t in range(1, config.max_turns + 1))
    return sorted(words)


def corpus(n: int = 200, seed: int = 0, config: ClarifyConfig | None = None) -> list[str]:
    """Texts covering the whole vocabulary (one per word, plus `n` sampled scenes), for a tokenizer.

    Example:
        >>> set(" ".join(corpus(5)).split()) == set(vocabulary())
        True
    """
    config = config or ClarifyConfig()
    texts = list(vocabulary(config))
    for i in range(n):
        ep = make_episode(seed * 1_000_003 + i, config)
        texts += [system_message(ep, config), ep.opening]
    return texts
