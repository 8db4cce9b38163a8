"""Word-level text helpers shared by the judges and the baselines: SQuAD-style normalisation, whole-word
containment, longest common subsequence and ROUGE-L."""

from __future__ import annotations

import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "‘’“”—–"})


def normalize(text: str) -> str:
    """Lower case, punctuation → space, articles dropped, whitespace collapsed (SQuAD-style)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains(answer: str, gold: str) -> bool:
    """Whether the normalised gold occurs in the normalised answer as whole words."""
    g, a = normalize(gold), normalize(answer)
    return bool(g) and f" {g} " in f" {a} "


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over normalised words (0 when either side is empty)."""
    c, r = normalize(candidate).split(), normalize(reference).split()
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
