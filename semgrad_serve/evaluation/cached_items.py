"""The per-answer records of an evaluation (``PREFIX_items.jsonl.gz``): written by every run, read back by
``eval --from-items`` to re-judge, re-measure and re-fit without generating or scoring again.

One JSON line per answer: ``dataset``, ``index`` (line of the dataset file), ``answer`` (text), ``token_ids`` (as
generated, the EOS token that ended it included), ``answer_tokens`` (the EOS token not counted), ``ended_on_eos``,
``correct`` and ``similarity`` per judge, ``scores`` per method (null where not scored) and, for an answer without
scores, ``excluded`` (why), ``heldout_confidence`` (the fitted confidence's nested cross-validation estimate,
null where none) and ``features`` (the confidence probe's scalars, ``scoring/probe_features.py``). The seconds each
stage took are in the JSON report beside it (``PREFIX.json``); the probe's vectors at t* in ``PREFIX_vectors.npz``
(per dataset and vector, [answers, d] float16, NaN rows where none).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

from ..errors import SemgradError
from .generation import Generation
from .runs import DatasetRun


def write_items(path: Path, runs: list[DatasetRun]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in runs:
            for i in range(r.n):
                doc = {
                    "dataset": r.name,
                    "index": i,
                    "answer": r.answers[i].text,
                    "token_ids": r.answers[i].token_ids,
                    "answer_tokens": r.answer_tokens[i],
                    "ended_on_eos": r.ended_on_eos[i],
                    "correct": {j: r.judgements[j][i].correct for j in r.judgements},
                    "similarity": {j: round(r.judgements[j][i].similarity, 4) for j in r.judgements},
                    "scores": {k: (None if not math.isfinite(v[i]) else v[i]) for k, v in r.scores.items()},
                }
                if i in r.excluded:
                    doc["excluded"] = r.excluded[i]
                if r.heldout_confidence:
                    c = r.heldout_confidence[i]
                    doc["heldout_confidence"] = round(c, 6) if math.isfinite(c) else None
                if r.features and r.features[i]:
                    doc["features"] = {k: round(v, 7) for k, v in r.features[i].items()}
                f.write(json.dumps(doc) + "\n")


def vectors_beside(items: Path) -> Path:
    """The probe's vectors written with ``items`` (``X_items.jsonl.gz`` → ``X_vectors.npz``)."""
    return items.with_name(items.name.removesuffix(".jsonl.gz").removesuffix("_items") + "_vectors.npz")


def write_vectors(path: Path, runs: list[DatasetRun]) -> None:
    arrays = {}
    for r in runs:
        names = sorted({k for v in r.vectors for k in v})
        for name in names:
            d = next(len(v[name]) for v in r.vectors if name in v)
            arrays[f"{r.name}/{name}"] = np.array([v.get(name, [math.nan] * d) for v in r.vectors], dtype=np.float16)
    np.savez_compressed(path, **arrays)


def report_beside(items: Path) -> Path:
    """The JSON report written with ``items`` (``X_items.jsonl.gz`` → ``X.json``)."""
    return items.with_name(items.name.removesuffix(".jsonl.gz").removesuffix("_items") + ".json")


def read_items(path: str | Path, runs: list[DatasetRun]) -> None:
    """Fill each run's answers, lengths, scores and exclusions (and, where the JSON report is beside the items,
    the seconds per stage) from the records; every answer of every run must be there, for the same dataset lines."""
    path = Path(path)
    try:
        records = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise SemgradError(f"cannot read the evaluation items {path}: {exc}") from None
    seconds = {}
    if report_beside(path).is_file():
        seconds = {
            name: d.get("seconds_total", {})
            for name, d in json.loads(report_beside(path).read_text())["datasets"].items()
        }
    for run in runs:
        mine = sorted((r for r in records if r.get("dataset") == run.name), key=lambda r: r["index"])
        if [r["index"] for r in mine] != list(range(run.n)):
            raise SemgradError(
                f"{path} does not hold answers 0..{run.n - 1} of dataset {run.name!r} (found {len(mine)}): "
                "give the same --dataset files and --limit as the run that wrote it"
            )
        if any("token_ids" not in r for r in mine):
            raise SemgradError(f"{path} has no token ids (written before they were kept): run eval again")
        run.answers = [Generation([int(t) for t in r["token_ids"]], r["answer"]) for r in mine]
        run.answer_tokens = [int(r["answer_tokens"]) for r in mine]
        run.ended_on_eos = [bool(r["ended_on_eos"]) for r in mine]
        keys = sorted({k for r in mine for k in r["scores"]})
        run.scores = {
            k: [math.nan if r["scores"].get(k) is None else float(r["scores"][k]) for r in mine] for k in keys
        }
        run.excluded = {r["index"]: r["excluded"] for r in mine if "excluded" in r}
        run.features = [dict(r.get("features") or {}) for r in mine]
        run.vectors = [{} for _ in mine]
        if vectors_beside(path).is_file():
            with np.load(vectors_beside(path)) as doc:
                for key in doc.files:
                    name, _, vector = key.partition("/")
                    if name == run.name and len(doc[key]) == run.n:
                        for i, row in enumerate(doc[key]):
                            if np.isfinite(row).all():
                                run.vectors[i][vector] = row.astype(np.float64).tolist()
        run.seconds = dict(seconds.get(run.name, {}))
