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
from typing import Any, Collection, Sequence

from ..model.tokens import token_texts as texts_of

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt no nos fig figs vs approx ca cf gen col lt sgt capt rev".split()
)

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


def _code_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) of each fenced or inline code piece of ``text``, as the splitter sees them."""
    return [m.span() for m in _PIECE.finditer(text) if m.group().startswith("`")]


def settled_claims(token_texts: Sequence[str], received: int | None = None) -> list[Claim]:
    """The claims of a partial answer (the texts of its tokens so far) that no later text can change: each one
    whose next claim has begun, in order, stopping at the first that later text could still merge or move. A
    claim is settled once the first token of the next claim is among the ``received`` characters (all where
    None: what a stop string may still cut is not), and its end is not inside, nor after an unclosed, code
    backtick on its line (a backtick that comes later could make the break part of inline code)."""
    claims = split_claims(token_texts)
    text = "".join(token_texts)
    limit = len(text) if received is None else received
    offsets = [0]
    for piece in token_texts:
        offsets.append(offsets[-1] + len(piece))
    spans = _code_spans(text)
    settled = []
    for claim, following in zip(claims, claims[1:]):
        boundary = offsets[following.token_start]  # where the next claim's tokens begin
        if offsets[following.token_start + 1] > limit:
            break
        line = text.rfind("\n", 0, len(text[:boundary].rstrip())) + 1  # the line holding the claim's end
        coded = [(s, e) for s, e in spans if s < boundary]
        if any(e > boundary for _, e in coded):
            break  # the break is inside code (an open fence)
        bare = [i for i in range(line, boundary) if text[i] == "`" and not any(s <= i < e for s, e in coded)]
        if bare:
            break  # an unclosed backtick: a later one could put the break inside inline code
        settled.append(claim)
    return settled


def answer_claims(tokenizer: Any, answer_ids: Sequence[int], eos_ids: Collection[int]) -> list[Claim]:
    """The claims of a scored answer: the rule on its decoded text, the stop token it ends on (one of ``eos_ids``)
    joining the last claim."""
    answer = list(answer_ids)
    shown = answer[:-1] if answer and answer[-1] in eos_ids else answer
    return split_claims(texts_of(tokenizer, shown), len(answer))
