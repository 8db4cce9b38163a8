"""Claims: an answer split into sentences, each a run of the answer's tokens, for per-claim scores.

The rule, on the decoded answer text:
- a claim ends at a line break, and after a run of ``.``, ``!``, ``?`` or ``…`` (closing quotes or
  brackets may follow) that whitespace or the end of the text follows;
- except after a single ``.`` that ends a known abbreviation (``Dr.``, ``Mr.``, ``vs.``, ...), a single
  letter (an initial: ``J. K. Rowling``), letters with inner periods (``U.S.``, ``e.g.``, ``Ph.D.``) or a number
  that starts its line (a list marker: ``1. Apples``), and before a lowercase letter (``etc. and``);
- nothing splits inside a fenced code block (```` ``` ````) or inline code (`` `x.y` ``): each stays in its claim.
Pieces that hold no visible character join the claim before them.

Each token then belongs to the claim of its first non-whitespace character; a whitespace-only token to the
claim before it (the first claim at the start); a token with no text of its own (the first bytes of a
character that the next token completes) to the claim of the next token. Claims are therefore consecutive
runs of tokens that cover the whole answer, and sentences inside a single token merge. The answer's stop
token belongs to its last claim: the SPEC counts it as an answer token (the model's choice to end there),
so the claims' token ranges partition exactly the tokens the whole-answer scores use.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st mt no nos fig figs vs approx ca cf gen col lt sgt capt rev".split())

# fenced code (to its closing fence, or the end), inline code, a line break, or a sentence end and the
# whitespace after it
_PIECE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`|\n|(?P<end>[.!?…]+)[\"'”’)\]}]*(?=\s|\Z)", re.S)
_WORD_BEFORE = re.compile(r"(\S*)$")
_INITIALS = re.compile(r"[A-Za-z]|[A-Za-z]{1,2}(?:\.[A-Za-z]{1,2})+")  # "J", "U.S", "e.g", "Ph.D" (before the last ".")


@dataclass(frozen=True)
class Claim:
    """One sentence of an answer: its text and its tokens ``[token_start, token_end)`` in the answer."""

    text: str
    token_start: int
    token_end: int


def _is_sentence_end(text: str, start: int, end: int) -> bool:
    """Whether the terminator run ``text[start:end]`` ends a sentence (see the module's rule)."""
    rest = text[end:].lstrip()
    if rest[:1].islower():
        return False
    if text[start:end] != ".":
        return True
    word = _WORD_BEFORE.search(text, 0, start)[1].lstrip("([\"'“‘")
    line_start = text.rfind("\n", 0, start) + 1
    if word.isdigit() and text[line_start:start].strip() == word:
        return False  # a list marker: "1. Apples"
    return not (_INITIALS.fullmatch(word) or word.lower() in ABBREVIATIONS)


def sentence_breaks(text: str) -> list[int]:
    """Character offsets in ``text`` where a new claim may start (after each sentence end or line break)."""
    breaks = []
    for m in _PIECE.finditer(text):
        if m.group() == "\n" or m["end"] and _is_sentence_end(text, m.start(), m.end()):
            breaks.append(m.end())
    return breaks


def split_claims(token_texts: Sequence[str], n_tokens: int | None = None) -> list[Claim]:
    """The claims of an answer whose tokens have the texts ``token_texts`` (joined: the decoded answer).
    ``n_tokens`` (≥ their number) counts the answer's tokens, a stop token after them included: the tokens past
    the texts join the last claim. An answer with no visible character is one claim with no text."""
    text = "".join(token_texts)
    total = len(token_texts) if n_tokens is None else n_tokens
    if not text.strip():
        return [Claim("", 0, total)] if total else []
    breaks = sentence_breaks(text)
    owners: list[int | None] = []  # per token, the claim of its first visible character (the breaks before it)
    offset = 0
    for piece in token_texts:
        visible = offset + len(piece) - len(piece.lstrip())
        owners.append(None if not piece.strip() else bisect_right(breaks, visible))
        offset += len(piece)
    following = None  # a token with no text goes with the next token
    for i in range(len(owners) - 1, -1, -1):
        owners[i] = following if token_texts[i] == "" else owners[i]
        following = owners[i] if owners[i] is not None else following
    current = next(o for o in owners if o is not None)  # leading whitespace joins the first claim
    claim_of = []
    for owner in owners:  # a whitespace-only token joins the claim before it
        current = owner if owner is not None else current
        claim_of.append(current)
    claims, start = [], 0
    for i in range(1, len(claim_of) + 1):
        if i == len(claim_of) or claim_of[i] != claim_of[start]:
            end = total if i == len(claim_of) else i
            claims.append(Claim("".join(token_texts[start:end]).strip(), start, end))
            start = i
    return claims
