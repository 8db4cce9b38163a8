"""One dataset of an evaluation run: its questions and gold answers, and what the run finds for each."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SemgradError
from ..jsonl import read_queries
from . import judges
from .generation import Generation


def dataset_name(path: str | Path) -> str:
    p = Path(path)
    return p.parent.name if p.stem in ("test", "dev", "validation", "val") else p.stem


def read_dataset(path: str | Path, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """(query, gold answers) per line: ``query`` a non-empty string, ``truthful answer`` a list of strings with at
    least one non-empty (a single string is accepted; empty ones are dropped); a bad line is an error naming it."""
    rows = []
    for number, obj in read_queries(path, limit):
        gold = obj.get("truthful answer")
        if isinstance(gold, str):
            gold = [gold]
        if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold) or not any(g.strip() for g in gold):
            raise SemgradError(
                f"{path}: line {number}: field 'truthful answer' is missing or not a list of strings with a non-empty "
                "one"
            )
        rows.append(
            (obj["query"], [g for g in gold if g.strip()])
        )  # empty golds (a few TruthfulQA lines have one) are dropped
    return rows


@dataclass
class DatasetRun:
    name: str
    path: str
    rows: list[tuple[str, list[str]]]
    prompts: list[list[int]] = field(default_factory=list)
    answers: list[Generation] = field(default_factory=list)
    samples: list[list[Generation]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # stage → wall seconds for this dataset
    scores: dict[str, list[float]] = field(default_factory=dict)  # method → per-answer score (NaN = excluded)
    judgements: dict[str, list[judges.Judgement]] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)  # answer index → why it has no scores
    clusters: list[int] = field(default_factory=list)
    eos_ids: list[int] = field(default_factory=list)  # the model's EOS ids, to tell answers that ended on one
    answer_tokens: list[int] = field(
        default_factory=list
    )  # per answer: its tokens, the EOS token that ended it not counted
    ended_on_eos: list[bool] = field(default_factory=list)  # per answer: whether it ended on an EOS token
    # per answer: the confidence probe's inputs from its scoring pass (``scoring/probe_features.py``), {} where none
    features: list[dict[str, float]] = field(default_factory=list)
    vectors: list[dict[str, list[float]]] = field(default_factory=list)
    heldout_confidence: list[float] = field(default_factory=list)  # per answer, from nested cross-validation; NaN: none

    @property
    def n(self) -> int:
        return len(self.rows)

    def kept(self) -> np.ndarray:
        return np.array([i not in self.excluded for i in range(self.n)], dtype=bool)

    def wrong(self, judge: str) -> np.ndarray:
        return np.array([not j.correct for j in self.judgements[judge]], dtype=bool)

    def take_answers(self, answers: list[Generation]) -> None:
        """Set the greedy answers and count their tokens (the EOS token that ended one, ``eos_ids``, not counted:
        the same length under both stop-token conventions)."""
        self.answers = answers
        self.ended_on_eos = [bool(a.token_ids) and a.token_ids[-1] in self.eos_ids for a in answers]
        self.answer_tokens = [len(a.token_ids) - e for a, e in zip(answers, self.ended_on_eos)]
