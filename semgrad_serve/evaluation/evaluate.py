"""``eval``: how well each score detects wrong answers, against the baselines, with a flag threshold from data.

For each dataset: greedy answers to the paper's prompt (SPEC) through vLLM (or Hugging Face), K samples per
question for the sampling baselines, correctness from an offline judge, then every score for every answer,
AUROC / AUPRC / PRR per method and the seconds each method costs per answer. Writes a markdown table, a JSON
file, one PNG of ROC curves, the per-answer records (gzipped JSONL) and the profile with the flag threshold
chosen on the pooled answers of all datasets for a target precision or recall.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..scoring import tied_head
from ..scoring.items import GRADIENT_SCORES
from . import baselines, judges, metrics
from ..errors import ItemError, SemgradError
from .generation import MAX_NEW_TOKENS, PAPER_PROMPT, Generation, make_generator, paper_messages
from ..jsonl import read_queries
from ..scoring.profiles import ModelProfile

# (key, label, family); the order of the tables
METHODS = [
    ("semgrad", "SemGrad", "ours"),
    ("paragrad", "ParaGrad", "ours"),
    ("paragrad_tied", "ParaGrad, tied head (authors')", "ours"),
    ("hybridgrad", "HybridGrad", "ours"),
    ("mean_nll", "Mean token NLL (perplexity)", "single pass"),
    ("max_nll", "Max token NLL", "single pass"),
    ("mean_entropy", "Mean token entropy", "single pass"),
    ("exgrad", "ExGrad", "single pass"),
    ("p_true", "P(True)", "single pass"),
    ("lexical_similarity", "Lexical similarity (K samples)", "sampling"),
    ("semantic_entropy", "Semantic entropy (K samples)", "sampling"),
]


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
            raise SemgradError(f"{path}: line {number}: field 'truthful answer' is missing or not a list of strings with a non-empty one")
        rows.append((obj["query"], [g for g in gold if g.strip()]))  # empty golds (a few TruthfulQA lines have one) are dropped
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

    @property
    def n(self) -> int:
        return len(self.rows)

    def kept(self) -> np.ndarray:
        return np.array([i not in self.excluded for i in range(self.n)], dtype=bool)

    def wrong(self, judge: str) -> np.ndarray:
        return np.array([not j.correct for j in self.judgements[judge]], dtype=bool)


@dataclass
class EvalConfig:
    datasets: list[str]
    model: str | None = None
    dtype: str = "float32"
    profile: str | None = None
    compare_profiles: list[str] = field(default_factory=list)
    limit: int | None = None
    samples: int = 5
    temperature: float = 1.0
    max_tokens: int = MAX_NEW_TOKENS
    generator: str = "vllm"
    judge: str = "containment"
    judge_threshold: float | None = None
    cluster_threshold: float = baselines.DEFAULT_CLUSTER_THRESHOLD
    flag_target: str = "recall:0.8"
    out: str = "eval_results"
    prefix: str = "eval"
    profile_out: str | None = None
    batch_size: int = 8
    cache_dir: str | None = None
    seed: int = 0
    stop_token: bool = True  # score the EOS token that ended an answer (SPEC); False: the old convention
    paragrad_tied: bool | None = None  # also the tied-head ParaGrad; None: the profile's setting
    progress: bool = True


def _log(msg: str) -> None:
    print(f"[eval {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- generation, with an optional cache so that a long run can be resumed ------------------------------------


def _cache_path(cfg: EvalConfig, run: DatasetRun, model_dir: Path) -> Path | None:
    if not cfg.cache_dir:
        return None
    key = json.dumps(["ids end on the EOS token", str(model_dir), cfg.dtype, cfg.generator, cfg.samples, cfg.temperature, cfg.max_tokens, cfg.seed,
                      PAPER_PROMPT, [r[0] for r in run.rows]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"generations_{run.name}_{digest}.json.gz"


def _load_cached(path: Path | None, run: DatasetRun) -> bool:
    if path is None or not path.is_file():
        return False
    doc = json.loads(gzip.decompress(path.read_bytes()))
    run.answers = [Generation.from_dict(a) for a in doc["answers"]]
    run.samples = [[Generation.from_dict(s) for s in group] for group in doc["samples"]]
    run.seconds.update(doc["seconds"])
    _log(f"{run.name}: reusing the generations cached in {path}")
    return True


def _save_cache(path: Path | None, run: DatasetRun) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"answers": [a.to_dict() for a in run.answers], "samples": [[s.to_dict() for s in g] for g in run.samples],
           "seconds": {k: v for k, v in run.seconds.items() if k in ("greedy answer", "K samples")}}
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))


def generate_all(cfg: EvalConfig, scorer: Any, model_dir: Path, runs: list[DatasetRun]) -> None:
    todo = [r for r in runs if not _load_cached(_cache_path(cfg, r, model_dir), r)]
    if not todo:
        return
    start = time.perf_counter()
    generator = make_generator(cfg.generator, model_dir, scorer.model, scorer.tokenizer, cfg.dtype, cfg.seed)
    _log(f"{cfg.generator} generator ready in {time.perf_counter() - start:.0f} s (engine start, not counted per answer)")
    try:
        for run in todo:
            _log(f"{run.name}: {run.n} greedy answers (at most {cfg.max_tokens} tokens)")
            t = time.perf_counter()
            run.answers = generator.greedy(run.prompts, cfg.max_tokens)
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
    """The ids of a generated answer that are scored: with the EOS token that ended it unless ``cfg.stop_token`` is off."""
    return answer.token_ids if cfg.stop_token else scorer.without_stop_token(answer.token_ids)


def score_all(cfg: EvalConfig, scorer: Any, run: DatasetRun, extra: list[tuple[str, Any]], embedder: judges.Embedder) -> None:
    n = run.n
    nan = [math.nan] * n
    pairs = [(p, scored_answer(cfg, scorer, a)) for p, a in zip(run.prompts, run.answers)]
    for i, a in enumerate(run.answers):
        if not scorer.without_stop_token(a.token_ids):
            run.excluded[i] = "empty answer"
    _log(f"{run.name}: gradient pass (SemGrad, ParaGrad, HybridGrad, ExGrad)")
    results = _timed(run, "gradient pass", scorer.score, pairs, cfg.batch_size, cfg.progress)
    for key in GRADIENT_SCORES:
        run.scores[key] = list(nan)
    for i, r in enumerate(results):
        if isinstance(r, ItemError):
            run.excluded.setdefault(i, str(r))
            continue
        for key in GRADIENT_SCORES:
            run.scores[key][i] = getattr(r, key)
    if cfg.paragrad_tied:
        _log(f"{run.name}: tied-head ParaGrad (a backward through every layer and position)")
        run.scores["paragrad_tied"] = _timed(run, "tied backward", tied_paragrads, scorer, pairs, results)
    for label, other in extra:
        _log(f"{run.name}: gradient pass with profile {label}")
        res = _timed(run, f"gradient pass [{label}]", other.score, pairs, cfg.batch_size, cfg.progress)
        for key in ("semgrad", "hybridgrad"):
            run.scores[f"{key}[{label}]"] = [math.nan if isinstance(r, ItemError) else getattr(r, key) for r in res]

    kept = [i for i in range(n) if i not in run.excluded]
    _log(f"{run.name}: forward pass (NLL, entropy)")
    stats = _timed(run, "forward pass", baselines.answer_token_stats, scorer.model, [pairs[i] for i in kept], cfg.batch_size, cfg.progress)
    for key in ("mean_nll", "max_nll", "mean_entropy"):
        run.scores[key] = list(nan)
    for i, (logp, ent) in zip(kept, stats):
        run.scores["mean_nll"][i] = baselines.mean_nll(logp)
        run.scores["max_nll"][i] = baselines.max_nll(logp)
        run.scores["mean_entropy"][i] = float(np.mean(ent))

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
        lexical, entropies, counts, t_lex, t_se = baselines.sampling_scores(run.samples, embedder, cfg.cluster_threshold, cfg.progress)
        run.scores["lexical_similarity"] = lexical
        run.scores["semantic_entropy"] = entropies
        run.clusters = counts
        run.seconds["ROUGE-L among samples"] = t_lex
        run.seconds["embeddings + clustering"] = t_se


def tied_paragrads(scorer: Any, pairs: list[tuple[list[int], list[int]]], results: list[Any]) -> list[float]:
    """``paragrad_tied`` of every scored answer (NaN where it was not scored)."""
    return [math.nan if isinstance(r, ItemError) else tied_head.paragrad_tied(scorer.weights, scorer.prepare(*pair), r.paragrad, scorer.kernels)
            for pair, r in zip(pairs, results)]


def method_seconds(run: DatasetRun, key: str) -> float | None:
    """Seconds per answer that ``key`` costs on top of generating the greedy answer."""
    s = run.seconds
    if key in GRADIENT_SCORES:
        total = s.get("gradient pass")
    elif key == "paragrad_tied":
        total = s.get("gradient pass", 0.0) + s.get("tied backward", 0.0)
    elif "[" in key:
        total = s.get(f"gradient pass [{key.split('[', 1)[1][:-1]}]")
    elif key in ("mean_nll", "max_nll", "mean_entropy"):
        total = s.get("forward pass")
    elif key == "p_true":
        total = s.get("P(True) pass")
    elif key == "lexical_similarity":
        total = s.get("K samples", 0.0) + s.get("ROUGE-L among samples", 0.0) if "K samples" in s else None
    elif key == "semantic_entropy":
        total = s.get("K samples", 0.0) + s.get("embeddings + clustering", 0.0) if "K samples" in s else None
    else:
        total = None
    return None if total is None else total / run.n


# -- metrics and reports ---------------------------------------------------------------------------


def method_list(runs: list[DatasetRun], extra_labels: list[str]) -> list[tuple[str, str, str]]:
    present = set().union(*(r.scores for r in runs))
    out = [m for m in METHODS if m[0] in present]
    for label in extra_labels:
        out.insert(3, (f"hybridgrad[{label}]", f"HybridGrad [{label}]", "ours"))
        out.insert(3, (f"semgrad[{label}]", f"SemGrad [{label}]", "ours"))
    return out


def compute_metrics(run: DatasetRun, methods: list[tuple[str, str, str]], judge: str) -> dict[str, dict[str, float]]:
    wrong = run.wrong(judge)
    out = {}
    for key, _, _ in methods:
        s = np.asarray(run.scores.get(key, [math.nan] * run.n), dtype=np.float64)
        ok = run.kept() & np.isfinite(s)
        if ok.sum() < 2:
            continue
        out[key] = {**metrics.summarize(s[ok], wrong[ok]), "n": int(ok.sum())}
    return out


def _pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def write_roc_png(runs: list[DatasetRun], methods: list[tuple[str, str, str]], judge: str, all_metrics: dict, path: Path, title: str) -> None:
    """One panel per dataset, one curve per method; one legend (with each dataset's AUROC) beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs) + 3.6, 5.0), dpi=90, squeeze=False)
    colors = plt.get_cmap("tab20").colors
    handles: dict[str, Any] = {}
    for ax, run in zip(axes[0], runs):
        wrong = run.wrong(judge)
        for c, (key, label, family) in enumerate(methods):
            s = np.asarray(run.scores.get(key, []), dtype=np.float64)
            if len(s) != run.n:
                continue
            ok = run.kept() & np.isfinite(s)
            if ok.sum() < 2 or wrong[ok].all() or not wrong[ok].any():
                continue
            fpr, tpr, _ = metrics.roc_curve(s[ok], wrong[ok])
            style = "-" if family == "ours" else ("--" if family == "single pass" else ":")
            (line,) = ax.plot(fpr, tpr, style, color=colors[(2 * c) % 20 if c < 10 else (2 * c + 1) % 20], lw=2.2 if family == "ours" else (1.9 if family == "sampling" else 1.4))
            handles.setdefault(key, line)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        acc = 1 - run.wrong(judge)[run.kept()].mean()
        ax.set_title(f"{run.name}: {run.kept().sum()} answers, {100 * acc:.1f}% correct", fontsize=10)
        ax.set_xlabel("false-positive rate (correct answers flagged)", fontsize=9)
        ax.set_ylabel("true-positive rate (wrong answers flagged)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    labels = []
    for key, label, _ in methods:
        if key in handles:
            aucs = " / ".join(_pct(all_metrics[r.name].get(key, {}).get("auroc", math.nan)) for r in runs)
            labels.append((handles[key], f"{label}: {aucs}"))
    fig.legend([h for h, _ in labels], [t for _, t in labels], loc="center right", fontsize=8, frameon=False,
               title="AUROC % (" + " / ".join(r.name for r in runs) + ")\nsolid: ours, dashed: single pass, dotted: sampling",
               title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 3.6 / (4.6 * len(runs) + 3.6), 0.96))
    fig.savefig(path)
    plt.close(fig)


def markdown(cfg: EvalConfig, runs: list[DatasetRun], methods, all_metrics, per_judge, threshold, profile_name: str, model_name: str,
             profiles: Sequence[tuple[str, str, int, str]] = ()) -> str:
    lines = [
        f"# Hallucination detection: {model_name}",
        "",
        f"Greedy answers ({cfg.generator}, at most {cfg.max_tokens} new tokens) to the paper's prompt "
        f"\"{PAPER_PROMPT.splitlines()[0]}\\n{{query}}\"; profile `{profile_name}`; "
        f"{cfg.samples} samples per question at temperature {cfg.temperature:g} for the sampling baselines.",
        "Stop token: " + ("counted (SPEC): an answer that ended on the model's EOS token is scored with it."
                          if cfg.stop_token else "not counted (the old convention): answers are scored without their EOS token."),
        "Profiles: " + "; ".join(f"`{name}`: t* = last {tok!r} {off:+d}, band = hidden states {band}" for name, tok, off, band in profiles) + ".",
        f"Judge: **{cfg.judge}** — correct if {judges.describe(cfg.judge, cfg.judge_threshold)}. "
        "Positive class = wrong answer; higher score = more likely wrong.",
        "Seconds per answer: wall time of the work each method needs on top of the greedy answer, "
        "on this machine, divided by the number of answers.",
        "",
    ]
    header = "| method | kind | " + " | ".join(f"{r.name} AUROC | AUPRC | PRR | s/answer" for r in runs) + " |"
    lines += [header, "|---|---|" + "---|---|---|---|" * len(runs)]
    for key, label, family in methods:
        cells = []
        for r in runs:
            m = all_metrics[r.name].get(key)
            if m is None:
                cells.append("– | – | – | –")
            else:
                cells.append(f"{_pct(m['auroc'])} | {_pct(m['auprc'])} | {_pct(m['prr'])} | {_secs(method_seconds(r, key))}")
        lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    lines += ["", "Per dataset:", ""]
    for r in runs:
        kept = r.kept()
        acc = {j: 1 - r.wrong(j)[kept].mean() for j in r.judgements}
        gen = r.seconds.get("greedy answer")
        lines.append(
            f"- {r.name}: {r.n} questions, {int(kept.sum())} scored ({len(r.excluded)} excluded: empty answers); "
            f"accuracy " + ", ".join(f"{j} {100 * a:.1f}%" for j, a in acc.items())
            + (f"; greedy answer {gen / r.n:.3f} s/answer" if gen else "")
            + f"; mean answer length {np.mean(text_tokens(r)):.1f} tokens, {np.mean(ended_on_eos(r)) * 100:.1f}% ended on the EOS token"
            + (f"; {np.mean(r.clusters):.2f} clusters of {cfg.samples} samples on average" if r.clusters else "")
        )
    lines += ["", "AUROC (%) of every method under each judge:", ""]
    judge_names = list(runs[0].judgements)
    lines.append("| method | " + " | ".join(f"{r.name} {j}" for r in runs for j in judge_names) + " |")
    lines.append("|---|" + "---|" * (len(runs) * len(judge_names)))
    for key, label, _ in methods:
        cells = [_pct(per_judge[r.name][j].get(key, {}).get("auroc", math.nan)) for r in runs for j in judge_names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if threshold is not None:
        t = threshold
        lines += [
            "",
            f"Flag threshold for `{t['score']}` (target {t['target']} ≥ {t['target_value']:g} on the pooled answers of "
            f"{', '.join(r.name for r in runs)}, {cfg.judge} judge): **{t['threshold']:.6g}** — flags {t['flagged']} of {t['n']} "
            f"answers, precision {100 * t['precision']:.1f}%, recall {100 * t['recall']:.1f}%"
            + ("" if t["met"] else " (target not reachable: highest precision shown)") + ".",
        ]
    return "\n".join(lines) + "\n"


def text_tokens(run: DatasetRun) -> list[int]:
    """Answer lengths in tokens, the EOS token that ended an answer not counted (the same under both conventions)."""
    return [len(a.token_ids) - e for a, e in zip(run.answers, ended_on_eos(run))]


def ended_on_eos(run: DatasetRun) -> list[bool]:
    return [bool(a.token_ids) and a.token_ids[-1] in run.eos_ids for a in run.answers]


def write_items(path: Path, runs: list[DatasetRun]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in runs:
            for i in range(r.n):
                doc = {
                    "dataset": r.name, "index": i, "answer": r.answers[i].text[:300], "answer_tokens": text_tokens(r)[i],
                    "ended_on_eos": ended_on_eos(r)[i],
                    "correct": {j: r.judgements[j][i].correct for j in r.judgements},
                    "similarity": {j: round(r.judgements[j][i].similarity, 4) for j in r.judgements},
                    "scores": {k: (None if not math.isfinite(v[i]) else v[i]) for k, v in r.scores.items()},
                }
                if i in r.excluded:
                    doc["excluded"] = r.excluded[i]
                f.write(json.dumps(doc) + "\n")


# -- the whole evaluation --------------------------------------------------------------------------


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    from ..scoring.scorer import Scorer

    if cfg.judge not in judges.JUDGES:
        raise SemgradError(f"unknown judge {cfg.judge!r}; choose one of {', '.join(judges.JUDGES)}")
    target_kind, target_value = metrics.parse_target(cfg.flag_target)
    names = [dataset_name(d) for d in cfg.datasets]
    if len(set(names)) != len(names):
        raise SemgradError(f"two datasets share the name {names}; give files in differently named folders")
    runs = [DatasetRun(name, str(path), read_dataset(path, cfg.limit)) for name, path in zip(names, cfg.datasets)]
    compare = [ModelProfile.load(p) for p in cfg.compare_profiles]

    scorer = Scorer.from_pretrained(cfg.model, cfg.dtype, cfg.profile, paragrad_tied=False)  # timed apart: score_all
    if cfg.paragrad_tied is None:
        cfg.paragrad_tied = scorer.profile.paragrad_tied
    if cfg.paragrad_tied:
        tied_head.check_tied(scorer.weights)
    from ..model.default_model import default_model_dir

    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    extra = []
    for p in compare:
        other = type(scorer)(scorer.weights, scorer.tokenizer, p, scorer.kernels, eos_ids=scorer.eos_ids)
        other.model = scorer.model
        extra.append((p.name, other))
    for run in runs:
        run.prompts = [scorer.prompt_ids(paper_messages(q)) for q, _ in run.rows]
        run.eos_ids = scorer.eos_ids

    generate_all(cfg, scorer, model_dir, runs)

    _log("judging answers (containment, ROUGE-L, embeddings)")
    embedder = judges.default_embedder()
    limits = {cfg.judge: cfg.judge_threshold} if cfg.judge_threshold is not None else {}
    for run in runs:
        run.judgements = judges.judge_all([a.text for a in run.answers], [g for _, g in run.rows], judges.JUDGES, limits, embedder)
        score_all(cfg, scorer, run, extra, embedder)

    methods = method_list(runs, [label for label, _ in extra])
    per_judge = {r.name: {j: compute_metrics(r, methods, j) for j in judges.JUDGES} for r in runs}
    all_metrics = {r.name: per_judge[r.name][cfg.judge] for r in runs}

    # the flag threshold, on the pooled answers, for the profile's score
    key = scorer.profile.score
    pooled_s = np.concatenate([np.asarray(r.scores[key])[r.kept()] for r in runs])
    pooled_w = np.concatenate([r.wrong(cfg.judge)[r.kept()] for r in runs])
    ok = np.isfinite(pooled_s)
    threshold = None
    if ok.any() and pooled_w[ok].any():
        chosen = metrics.choose_threshold(pooled_s[ok], pooled_w[ok], target_kind, target_value)
        threshold = {"score": key, **chosen.to_dict(), "judge": cfg.judge, "datasets": names,
                     "generator": cfg.generator, "date": datetime.date.today().isoformat()}

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_name = model_dir.name
    report = {
        "model": model_name,
        "profile": scorer.profile.name,
        "config": {k: v for k, v in cfg.__dict__.items() if k not in ("progress",)},
        "prompt": PAPER_PROMPT,
        "judge": {"name": cfg.judge, "rule": judges.describe(cfg.judge, cfg.judge_threshold)},
        "methods": [{"key": k, "label": l, "kind": f} for k, l, f in methods],
        "datasets": {
            r.name: {
                "file": r.path, "questions": r.n, "scored": int(r.kept().sum()), "excluded": len(r.excluded),
                "accuracy": {j: float(1 - r.wrong(j)[r.kept()].mean()) for j in r.judgements},
                "mean_answer_tokens": float(np.mean(text_tokens(r))),
                "ended_on_eos": float(np.mean(ended_on_eos(r))),
                "seconds_total": r.seconds,
                "seconds_per_answer": {k: method_seconds(r, k) for k, _, _ in methods},
                "greedy_seconds_per_answer": r.seconds.get("greedy answer", math.nan) / r.n,
                "metrics": per_judge[r.name],
            }
            for r in runs
        },
        "threshold": threshold,
    }
    stem = out / cfg.prefix
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    described = [(s.profile.name, s.profile.t_star.token, s.profile.t_star.offset, f"{s.band.start}..{s.band.stop - 1}") for s in [scorer] + [o for _, o in extra]]
    report["profiles"] = [dict(zip(("name", "t_star_token", "t_star_offset", "band"), d)) for d in described]
    Path(f"{stem}.md").write_text(markdown(cfg, runs, methods, all_metrics, per_judge, threshold, scorer.profile.name, model_name, described))
    write_roc_png(runs, methods, cfg.judge, all_metrics, Path(f"{stem}_roc.png"),
                  f"ROC of wrong-answer detection, {model_name}, judge: {cfg.judge}")
    write_items(Path(f"{stem}_items.jsonl.gz"), runs)
    if threshold is not None:
        calibration = dict(scorer.profile.calibration or {})
        calibration["flag_threshold"] = {k: v for k, v in threshold.items() if k != "score"}
        profile = replace(scorer.profile, threshold=threshold["threshold"], calibration=calibration)
        profile_path = Path(cfg.profile_out) if cfg.profile_out else Path(f"{stem}_profile.json")
        profile.save(profile_path)
        report["profile_path"] = str(profile_path)
    report["files"] = [f"{stem}.md", f"{stem}.json", f"{stem}_roc.png", f"{stem}_items.jsonl.gz"]
    return report
