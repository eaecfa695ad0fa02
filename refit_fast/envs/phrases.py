"""The words of the clarifying-QA world, in one place: the items, the attributes, and every phrase the
environment and the bundled policies say.

The simulator (`clarify`) and the scripted policies (`policies`) both import from here, so the text the
environment reads as canonical is, by construction, the text the logged policy writes.

    >>> QUESTION.format(attribute="color"), ANSWER.format(value="red", kind="ball")
    ('what color is it ?', 'it is the red ball .')
    >>> VALUE_TO_ATTRIBUTE["glass"]
    'material'
"""
from __future__ import annotations

__all__ = [
    "ANSWER", "ATTRIBUTES", "KINDS", "MALFORMED_TURNS", "NOT_UNDERSTOOD", "OPENINGS", "QUESTION", "REPLY",
    "SHARED_OPENINGS", "VALUE_TO_ATTRIBUTE", "all_phrases",
]

# attribute -> its values. Value words are unique across attributes, so a value names its attribute.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "size": ("tiny", "small", "big", "huge"),
    "material": ("wooden", "metal", "glass", "plastic", "paper"),
}
KINDS: tuple[str, ...] = ("ball", "cup", "box", "hat", "lamp", "book", "key", "bag", "pen", "chair")
VALUE_TO_ATTRIBUTE: dict[str, str] = {v: a for a, values in ATTRIBUTES.items() for v in values}

# The user's side.
# Ambiguous openings: each names the kind of item but none says which one.
OPENINGS: tuple[str, ...] = (
    "please pass me the {kind} .",
    "can you hand me the {kind} ?",
    "i need the {kind} .",
    "where is my {kind} ?",
)
# Openings that also mention a value every item shares (true, but no help).
SHARED_OPENINGS: tuple[str, ...] = (
    "please pass me the {value} {kind} .",
    "i need my {value} {kind} .",
)
REPLY = "it is {value} ."
NOT_UNDERSTOOD = "sorry , i do not understand ."

# The agent's side: the canonical question and answer, and what the logged policy says when it
# rambles (none of these is a question about one attribute or an item, so each wastes a turn; the
# near-miss "what is it ?" included).
QUESTION = "what {attribute} is it ?"
ANSWER = "it is the {value} {kind} ."
MALFORMED_TURNS: tuple[str, ...] = ("hmm , let me think .", "i am not sure .", "what is it ?", "ok .")


def all_phrases() -> list[str]:
    """Every template above, placeholders included (for building the vocabulary).

    Example:
        >>> "what {attribute} is it ?" in all_phrases()
        True
    """
    return [*OPENINGS, *SHARED_OPENINGS, REPLY, NOT_UNDERSTOOD, *MALFORMED_TURNS, ANSWER, QUESTION]
