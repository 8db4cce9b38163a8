"""``eval``: how well each score detects wrong answers, against the baselines, with a flag threshold from data.

For each dataset: greedy answers to the paper's prompt (SPEC) through vLLM (or Hugging Face), K samples per
question for the sampling baselines, correctness from an offline judge, then every score for every answer,
AUROC / AUPRC / PRR per method and the seconds each method costs per answer. Writes a markdown table, a JSON
file, one PNG of ROC curves, the per-answer records (gzipped JSONL) and the profile with the flag threshold
chosen on the pooled answers of all datasets for a target precision or recall, and with the calibrated confidence
fitted on them (``confidence_fit.py``; its held-out figures and reliability diagram: ``confidence_report.py``).
``from_items`` starts from the per-answer records of an earlier run instead: re-judged, re-measured and re-fitted,
nothing generated or scored.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ItemError, SemgradError
from ..scoring import tied_head
from ..scoring.items import GRADIENT_SCORES
from ..scoring.probe_features import scalar_features, vector_features
from ..scoring.profiles import ModelProfile
from . import baselines, judges, metrics
from .cached_items import read_items, report_beside, write_items, write_vectors
from .confidence_fit import FOLDS, MIN_PER_CLASS, FittedConfidence, enough_to_fit, fit_confidence
from .confidence_report import analyse, answer_table, markdown as confidence_markdown, write_reliability_png
from .config import EvalConfig
from .generation import Generation, make_generator
from .prompts import PAPER_PROMPT, paper_messages
from .rauq import rauq_scores
from .report import compute_metrics, markdown, method_list, method_seconds, write_roc_png
from .runs import DatasetRun, dataset_name, read_dataset


def _log(msg: str) -> None:
    print(f"[eval {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- generation, with an optional cache so that a long run can be resumed ------------------------------------


def _cache_path(cfg: EvalConfig, run: DatasetRun, model_dir: Path) -> Path | None:
    if not cfg.cache_dir:
        return None
    key = json.dumps(
        [
            "ids end on the EOS token",
            str(model_dir),
            cfg.dtype,
            cfg.generator,
            cfg.samples,
            cfg.temperature,
            cfg.max_tokens,
            cfg.seed,
            PAPER_PROMPT,
            [r[0] for r in run.rows],
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"generations_{run.name}_{digest}.json.gz"


def _load_cached(path: Path | None, run: DatasetRun) -> bool:
    if path is None or not path.is_file():
        return False
    doc = json.loads(gzip.decompress(path.read_bytes()))
    run.take_answers([Generation.from_dict(a) for a in doc["answers"]])
    run.samples = [[Generation.from_dict(s) for s in group] for group in doc["samples"]]
    run.seconds.update(doc["seconds"])
    _log(f"{run.name}: reusing the generations cached in {path}")
    return True


def _save_cache(path: Path | None, run: DatasetRun) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "answers": [a.to_dict() for a in run.answers],
        "samples": [[s.to_dict() for s in g] for g in run.samples],
        "seconds": {k: v for k, v in run.seconds.items() if k in ("greedy answer", "K samples")},
    }
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))


def generate_all(cfg: EvalConfig, scorer: Any, model_dir: Path, runs: list[DatasetRun]) -> None:
    todo = [r for r in runs if not _load_cached(_cache_path(cfg, r, model_dir), r)]
    if not todo:
        return
    start = time.perf_counter()
    generator = make_generator(cfg.generator, model_dir, scorer.model, scorer.tokenizer, cfg.dtype, cfg.seed)
    _log(
        f"{cfg.generator} generator ready in {time.perf_counter() - start:.0f} s (engine start, not counted per answer)"
    )
    try:
        for run in todo:
            _log(f"{run.name}: {run.n} greedy answers (at most {cfg.max_tokens} tokens)")
            t = time.perf_counter()
            run.take_answers(generator.greedy(run.prompts, cfg.max_tokens))
            run.seconds["greedy answer"] = time.perf_counter() - t
            if cfg.samples > 0:
                _log(f"{run.name}: {cfg.samples} samples per question at temperature {cfg.temperature:g}")
                t = time.perf_counter()
                run.samples = generator.sample(run.prompts, cfg.samples, cfg.temperature, cfg.max_tokens, cfg.seed)
                run.seconds["K samples"] = time.perf_counter() - t
            _save_cache(_cache_path(cfg, run, model_dir), run)
    finally:
        generator.close()


# -- scores ----------------------------------------------------------------------------------------


def _timed(run: DatasetRun, stage: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    run.seconds[stage] = run.seconds.get(stage, 0.0) + time.perf_counter() - t
    return out


def scored_answer(cfg: EvalConfig, scorer: Any, answer: Generation) -> list[int]:
    """The ids of a generated answer that are scored: with the EOS token that ended it unless ``cfg.stop_token``
    is off."""
    return answer.token_ids if cfg.stop_token else scorer.without_stop_token(answer.token_ids)


def score_all(
    cfg: EvalConfig,
    scorer: Any,
    run: DatasetRun,
    extra: list[tuple[str, Any]],
    embedder: judges.Embedder | None,
    rescore: bool = False,
) -> None:
    """Every score of every answer of ``run``; ``rescore``: only the gradient pass (with the probe's features) and
    RAUQ, over answers read from an earlier run's items (their other scores kept)."""
    n = run.n
    nan = [math.nan] * n
    pairs = [(p, scored_answer(cfg, scorer, a)) for p, a in zip(run.prompts, run.answers)]
    for i, a in enumerate(run.answers):
        if not scorer.without_stop_token(a.token_ids):
            run.excluded[i] = "empty answer"
    _log(f"{run.name}: gradient pass (SemGrad, ParaGrad, HybridGrad, ExGrad)")
    asked, scorer.t_star_features = scorer.t_star_features, True
    try:
        results = _timed(run, "gradient pass", scorer.score, pairs, cfg.batch_size, cfg.progress)
    finally:
        scorer.t_star_features = asked
    for key in GRADIENT_SCORES:
        run.scores[key] = list(nan)
    run.features, run.vectors = [{} for _ in range(n)], [{} for _ in range(n)]
    for i, r in enumerate(results):
        if isinstance(r, ItemError):
            run.excluded.setdefault(i, str(r))
            continue
        for key in GRADIENT_SCORES:
            run.scores[key][i] = getattr(r, key)
        run.features[i], run.vectors[i] = scalar_features(r), vector_features(r)
    kept = [i for i in range(n) if i not in run.excluded]
    if scorer.model is not None and cfg.rauq:
        _log(f"{run.name}: RAUQ (one forward with attention weights)")
        values = _timed(run, "RAUQ forward", rauq_scores, scorer.model, [pairs[i] for i in kept], cfg.progress)
        run.scores["rauq"] = list(nan)
        for i, v in zip(kept, values):
            run.scores["rauq"][i] = v
    if rescore:
        return
    if cfg.paragrad_tied:
        _log(f"{run.name}: tied-head ParaGrad (a backward through every layer and position)")
        run.scores["paragrad_tied"] = _timed(run, "tied backward", tied_paragrads, scorer, pairs, results)
    for label, other in extra:
        _log(f"{run.name}: gradient pass with profile {label}")
        res = _timed(run, f"gradient pass [{label}]", other.score, pairs, cfg.batch_size, cfg.progress)
        for key in ("semgrad", "hybridgrad"):
            run.scores[f"{key}[{label}]"] = [math.nan if isinstance(r, ItemError) else getattr(r, key) for r in res]

    if cfg.cheap_baselines:  # the gradient pass's own statistics of the same answer tokens
        stats = [(np.array(results[i].token_logprobs), np.array(results[i].token_entropies)) for i in kept]
    else:
        _log(f"{run.name}: forward pass (NLL, entropy)")
        stats = _timed(
            run,
            "forward pass",
            baselines.answer_token_stats,
            scorer.model,
            [pairs[i] for i in kept],
            cfg.batch_size,
            cfg.progress,
        )
    for key in ("mean_nll", "max_nll", "mean_entropy"):
        run.scores[key] = list(nan)
    for i, (logp, ent) in zip(kept, stats):
        run.scores["mean_nll"][i] = baselines.mean_nll(logp)
        run.scores["max_nll"][i] = baselines.max_nll(logp)
        run.scores["mean_entropy"][i] = float(np.mean(ent))

    if not cfg.cheap_baselines:
        _log(f"{run.name}: P(True)")
        t = time.perf_counter()
        prompts = baselines.p_true_prompts(scorer, [run.rows[i][0] for i in kept], [run.answers[i].text for i in kept])
        values = baselines.p_true_scores(scorer.model, scorer.tokenizer, prompts, 2 * cfg.batch_size, cfg.progress)
        run.seconds["P(True) pass"] = time.perf_counter() - t
        run.scores["p_true"] = list(nan)
        for i, v in zip(kept, values):
            run.scores["p_true"][i] = v

    if run.samples and cfg.samples >= 2:
        _log(f"{run.name}: sampling baselines")
        lexical, entropies, counts, t_lex, t_se = baselines.sampling_scores(
            run.samples, embedder, cfg.cluster_threshold, cfg.progress
        )
        run.scores["lexical_similarity"] = lexical
        run.scores["semantic_entropy"] = entropies
        run.clusters = counts
        run.seconds["ROUGE-L among samples"] = t_lex
        run.seconds["embeddings + clustering"] = t_se


def tied_paragrads(scorer: Any, pairs: list[tuple[list[int], list[int]]], results: list[Any]) -> list[float]:
    """``paragrad_tied`` of every scored answer (NaN where it was not scored)."""
    return [
        math.nan
        if isinstance(r, ItemError)
        else tied_head.paragrad_tied(scorer.weights, scorer.prepare(*pair), r.paragrad, scorer.kernels)
        for pair, r in zip(pairs, results)
    ]


# -- the whole evaluation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the results need from the model side: the profile the scores were computed with (and that the
    threshold and confidence go into), the model's name, each profile's t* and band, the scores' dtype."""

    profile: ModelProfile
    model_name: str
    described: list[tuple[str, str, int, str]]
    dtype: str
    compared: list[str]  # names of the --compare-profile profiles


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Generate and score (or read the cached items of an earlier run), judge, measure, fit, write."""
    if cfg.judge not in judges.JUDGES:
        raise SemgradError(f"unknown judge {cfg.judge!r}; choose one of {', '.join(judges.JUDGES)}")
    metrics.parse_target(cfg.flag_target)
    if cfg.rescore and not cfg.from_items:
        raise SemgradError("--rescore re-scores the answers of --from-items ITEMS; give both")
    names = [dataset_name(d) for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise SemgradError(f"two datasets share the name {names}; give files in differently named folders")
    runs = [DatasetRun(name, str(path), read_dataset(path, cfg.limit)) for name, path in zip(names, cfg.datasets)]
    setup = from_items(cfg, runs) if cfg.from_items else generate_and_score(cfg, runs)
    _log(f"judging answers ({', '.join(judges.JUDGES)})")
    embedder = judges.default_embedder()
    limits = {cfg.judge: cfg.judge_threshold} if cfg.judge_threshold is not None else {}
    for run in runs:
        run.judgements = judges.judge_all(
            [a.text for a in run.answers],
            [g for _, g in run.rows],
            [q for q, _ in run.rows],
            judges.JUDGES,
            limits,
            embedder,
        )
    return write_results(cfg, runs, setup)


def generate_and_score(cfg: EvalConfig, runs: list[DatasetRun]) -> Setup:
    from ..model.loading import resolve_model
    from ..scoring.scorer import Scorer

    compare = [ModelProfile.load(p) for p in cfg.compare_profiles]
    model_dir = resolve_model(cfg.model)
    scorer = Scorer.from_pretrained(
        model_dir, cfg.dtype, cfg.profile, device=cfg.device, paragrad_tied=False
    )  # timed apart: score_all
    if cfg.paragrad_tied is None:
        cfg.paragrad_tied = scorer.profile.paragrad_tied
    if cfg.paragrad_tied:
        tied_head.check_tied(scorer.weights)
    extra = []
    for p in compare:
        other = type(scorer)(scorer.weights, scorer.tokenizer, p, scorer.kernels, eos_ids=scorer.eos_ids)
        other.model = scorer.model
        extra.append((p.name, other))
    for run in runs:
        run.prompts = [scorer.prompt_ids(paper_messages(q)) for q, _ in run.rows]
        run.eos_ids = scorer.eos_ids

    generate_all(cfg, scorer, model_dir, runs)
    embedder = judges.default_embedder()
    for run in runs:
        score_all(cfg, scorer, run, extra, embedder)
    described = [
        (s.profile.name, s.profile.t_star.token, s.profile.t_star.offset, f"{s.band.start}..{s.band.stop - 1}")
        for s in [scorer] + [o for _, o in extra]
    ]
    return Setup(
        scorer.profile,
        model_dir.name,
        described,
        str(scorer.weights.dtype).removeprefix("torch."),
        [label for label, _ in extra],
    )


# settings of the run that wrote the items, taken from its JSON report
RUN_SETTINGS = ("generator", "samples", "temperature", "max_tokens", "seed", "stop_token", "dtype")


def from_items(cfg: EvalConfig, runs: list[DatasetRun]) -> Setup:
    """The answers and scores of an earlier run (``cached_items.py``), nothing generated or scored; the profile
    resolved for the model as ``score`` would (``--profile`` or the built-in one)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..model.loading import resolve_model
    from ..scoring.profiles import resolve_profile

    if cfg.compare_profiles:
        raise SemgradError("--compare-profile needs scoring; it cannot be used with --from-items")
    read_items(cfg.from_items, runs)
    report = report_beside(Path(cfg.from_items))
    if report.is_file():
        earlier = json.loads(report.read_text())["config"]
        for key in RUN_SETTINGS:
            setattr(cfg, key, earlier.get(key, getattr(cfg, key)))
    model_dir = resolve_model(cfg.model)
    config = AutoConfig.from_pretrained(model_dir)
    profile = resolve_profile(config, AutoTokenizer.from_pretrained(model_dir).chat_template, model_dir, cfg.profile)
    band = profile.band_range(config.num_hidden_layers)
    _log(f"read {sum(r.n for r in runs)} answers and their scores from {cfg.from_items}")
    if cfg.rescore:
        rescore_all(cfg, model_dir, runs)
    compared = sorted({k.split("[", 1)[1][:-1] for r in runs for k in r.scores if k.startswith("semgrad[")})
    described = [(profile.name, profile.t_star.token, profile.t_star.offset, f"{band.start}..{band.stop - 1}")]
    return Setup(profile, model_dir.name, described, cfg.dtype, compared)


def rescore_all(cfg: EvalConfig, model_dir: Path, runs: list[DatasetRun]) -> None:
    """The gradient pass (with the probe's features) and RAUQ again over the answers read from items."""
    from ..scoring.scorer import Scorer

    scorer = Scorer.from_pretrained(model_dir, cfg.dtype, cfg.profile, device=cfg.device, paragrad_tied=False)
    for run in runs:
        run.prompts = [scorer.prompt_ids(paper_messages(q)) for q, _ in run.rows]
        run.eos_ids = scorer.eos_ids
        for key in ("gradient pass", "RAUQ forward"):
            run.seconds.pop(key, None)
        score_all(cfg, scorer, run, [], None, rescore=True)


def flag_threshold(cfg: EvalConfig, runs: list[DatasetRun], key: str) -> dict[str, Any] | None:
    """The raw-score flag threshold for the target, on the pooled answers (used by profiles without a confidence)."""
    target_kind, target_value = metrics.parse_target(cfg.flag_target)
    pooled_s = np.concatenate([np.asarray(r.scores[key])[r.kept()] for r in runs])
    pooled_w = np.concatenate([r.wrong(cfg.judge)[r.kept()] for r in runs])
    ok = np.isfinite(pooled_s)
    if not ok.any() or not pooled_w[ok].any():
        return None
    chosen = metrics.choose_threshold(pooled_s[ok], pooled_w[ok], target_kind, target_value)
    return {
        "score": key,
        **chosen.to_dict(),
        "judge": cfg.judge,
        "datasets": [r.name for r in runs],
        "generator": cfg.generator,
        "date": datetime.date.today().isoformat(),
    }


def fit_and_analyse(
    cfg: EvalConfig, runs: list[DatasetRun], setup: Setup, methods
) -> tuple[FittedConfidence | None, dict[str, Any] | None]:
    """The confidence model on every judged answer and its held-out analysis; (None, None) with too few answers."""
    answers, raw, kept = answer_table(runs, cfg.judge, methods)
    if not enough_to_fit(answers):
        _log(f"no confidence fitted: it needs at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} wrong answers")
        return None, None
    target_kind, target_value = metrics.parse_target(cfg.flag_target)
    how = {
        "judge": cfg.judge,
        "datasets": [r.name for r in runs],
        "answers": len(answers),
        "generator": cfg.generator,
        "items": cfg.from_items or "this run",
        "date": datetime.date.today().isoformat(),
    }
    _log(f"fitting the confidence on {len(answers)} answers (nested {FOLDS}-fold cross-validation)")
    fitted = fit_confidence(answers, setup.profile.score, target_kind, target_value, how)
    start = 0
    for r, keep in zip(runs, kept):
        r.heldout_confidence = [math.nan] * r.n
        for i, c in zip(keep, fitted.heldout[start : start + len(keep)]):
            r.heldout_confidence[i] = float(c)
        start += len(keep)
    return fitted, analyse(answers, raw, fitted)


def write_results(cfg: EvalConfig, runs: list[DatasetRun], setup: Setup) -> dict[str, Any]:
    methods = method_list(runs, setup.compared)
    per_judge = {r.name: {j: compute_metrics(r, methods, j) for j in judges.JUDGES} for r in runs}
    all_metrics = {r.name: per_judge[r.name][cfg.judge] for r in runs}
    threshold = flag_threshold(cfg, runs, setup.profile.score)
    fitted, analysis = fit_and_analyse(cfg, runs, setup, methods)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": setup.model_name,
        "profile": setup.profile.name,
        "config": {k: v for k, v in cfg.__dict__.items() if k not in ("progress",)},
        "prompt": PAPER_PROMPT,
        "judge": {"name": cfg.judge, "rule": judges.describe(cfg.judge, cfg.judge_threshold)},
        "methods": [{"key": key, "label": label, "kind": kind} for key, label, kind in methods],
        "datasets": {
            r.name: {
                "file": r.path,
                "questions": r.n,
                "scored": int(r.kept().sum()),
                "excluded": len(r.excluded),
                "accuracy": {j: float(1 - r.wrong(j)[r.kept()].mean()) for j in r.judgements},
                "mean_answer_tokens": float(np.mean(r.answer_tokens)),
                "ended_on_eos": float(np.mean(r.ended_on_eos)),
                "seconds_total": r.seconds,
                "seconds_per_answer": {k: method_seconds(r, k) for k, _, _ in methods},
                "greedy_seconds_per_answer": r.seconds.get("greedy answer", math.nan) / r.n,
                "metrics": per_judge[r.name],
            }
            for r in runs
        },
        "threshold": threshold,
        "confidence": analysis,
    }
    stem = out / cfg.prefix
    files = [f"{stem}.md", f"{stem}.json", f"{stem}_roc.png", f"{stem}_items.jsonl.gz"]
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    report["profiles"] = [dict(zip(("name", "t_star_token", "t_star_offset", "band"), d)) for d in setup.described]
    text = markdown(
        cfg, runs, methods, all_metrics, per_judge, threshold, setup.profile.name, setup.model_name, setup.described
    )
    if analysis is not None:
        text += "\n" + confidence_markdown(analysis, methods, setup.profile.score, cfg.judge)
        write_reliability_png(
            analysis,
            Path(f"{stem}_reliability.png"),
            f"Reliability of the held-out confidence, {setup.model_name}, judge: {cfg.judge}",
        )
        files.insert(3, f"{stem}_reliability.png")
    Path(f"{stem}.md").write_text(text)
    write_roc_png(
        runs,
        methods,
        cfg.judge,
        all_metrics,
        Path(f"{stem}_roc.png"),
        f"ROC of wrong-answer detection, {setup.model_name}, judge: {cfg.judge}",
    )
    write_items(Path(f"{stem}_items.jsonl.gz"), runs)
    if any(v for r in runs for v in r.vectors):
        write_vectors(Path(f"{stem}_vectors.npz"), runs)
        files.append(f"{stem}_vectors.npz")
    if threshold is not None:
        calibration = dict(setup.profile.calibration or {})
        calibration["flag_threshold"] = {k: v for k, v in threshold.items() if k != "score"}
        profile = replace(
            setup.profile,
            threshold=threshold["threshold"],
            calibration=calibration,
            dtype=setup.dtype,
            confidence=None if fitted is None else fitted.model,
        )
        profile_path = Path(cfg.profile_out) if cfg.profile_out else Path(f"{stem}_profile.json")
        profile.save(profile_path)
        report["profile_path"] = str(profile_path)
    report["files"] = files
    return report
