"""The SPS scan of a model over paraphrase groups (``semgrad-serve calibrate``) → t* rule, band, profile, heatmap.

Each group is a query and its paraphrases, each wrapped in the evaluation prompt (SPEC: the paper's "Please
directly answer ..." user message, chat template and generation prompt), so the prompt tail scanned is the one
that is scored. t* is the template position (same token in every prompt) with the highest SPS averaged over the
upper half of layers; the band spans the layers whose SPS at t* is at least half height (``sps.choose_band``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import SemgradError
from ..evaluation.prompts import PAPER_PROMPT, paper_messages
from ..jsonl import read_queries
from ..model.loading import chat_prompt_ids, load_hf_model
from ..scoring.items import DEFAULT_SCORE
from ..scoring.profiles import ModelProfile, TStarRule, deeper_half, resolve_profile
from .sps import SPSTable, best_position, choose_band, position_labels, scan, t_star_rule

MIN_POSITIONS = 8


def check_positions(n_positions: int) -> None:
    """The number of last prompt positions to scan: at least ``MIN_POSITIONS``."""
    if n_positions < MIN_POSITIONS:
        raise SemgradError(f"scan at least {MIN_POSITIONS} prompt positions (got {n_positions})")


def read_paraphrases(path: str | Path, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """(query, paraphrases) per line; a line without a non-empty ``query`` string or with an empty or non-string
    ``paraphrases`` list is an error naming the line."""
    groups = []
    for number, obj in read_queries(path, limit):
        paraphrases = obj.get("paraphrases")
        if not isinstance(paraphrases, list):
            raise SemgradError(f"{path}: line {number}: field 'paraphrases' is missing or not a list")
        if not paraphrases:
            raise SemgradError(f"{path}: line {number}: the 'paraphrases' list is empty")
        if not all(isinstance(p, str) and p.strip() for p in paraphrases):
            raise SemgradError(f"{path}: line {number}: every paraphrase must be a non-empty string")
        groups.append((obj["query"], paraphrases))
    if len(groups) < 2:
        raise SemgradError(f"{path}: SPS needs at least two queries, found {len(groups)}")
    return groups


@dataclass
class ScanResult:
    """What the scan found: the SPS table, each scanned position's token label, t* (column and rule) and the band."""

    table: SPSTable
    labels: list[str]
    t_star_column: int
    rule: TStarRule
    band: tuple[int, int]
    n_layers: int

    @property
    def t_star_offset(self) -> int:
        return self.table.offsets[self.t_star_column]

    def summary(self) -> dict[str, Any]:
        """What goes into the profile's ``calibration`` field (so named in the profiles already written; small: the
        SPS table rounded to 4 decimals)."""
        sps = self.table.sps
        rows = list(deeper_half(self.n_layers))
        return {
            "method": "SPS scan (SPEC): S_within − S_across of cosine similarities of hidden states",
            "prompt": PAPER_PROMPT,
            "queries": self.table.groups,
            "prompts": self.table.prompts,
            "positions": self.table.offsets,
            "position_tokens": self.labels,
            "t_star_position": self.t_star_offset,
            "t_star_rule": "template position (same token in every prompt) with the highest mean SPS over the upper "
            "half of layers",
            "band_rule": "span of hidden-state indices 1..L-1 whose SPS at t* is at least half height",
            "upper_half_mean_sps": [round(float(x), 4) for x in sps[rows].mean(0)],
            "sps": [[round(float(x), 4) for x in row] for row in sps],
        }


def find_t_star_and_band(
    model: Any,
    tokenizer: Any,
    groups: Sequence[tuple[str, list[str]]],
    n_positions: int = 10,
    batch_size: int = 16,
    progress: bool = True,
) -> ScanResult:
    """Scan the last ``n_positions`` prompt positions of each paraphrase group; t* and the band from the SPS."""
    check_positions(n_positions)
    prompt_groups = [
        [chat_prompt_ids(tokenizer, paper_messages(q)) for q in [query, *paras]] for query, paras in groups
    ]
    shortest = min(len(p) for g in prompt_groups for p in g)
    if shortest < n_positions:
        raise SemgradError(f"the shortest prompt has {shortest} tokens, fewer than the {n_positions} positions to scan")
    table = scan(model, prompt_groups, n_positions, batch_size=batch_size, progress=progress)
    n_layers = table.sps.shape[0] - 1
    flat = [p for g in prompt_groups for p in g]
    id_to_token = tokenizer.convert_ids_to_tokens
    labels = position_labels(flat, n_positions, id_to_token)
    # t* must be a template token (SPEC: defined by the token): positions whose token differs between prompts
    # are shown but not eligible; their raw SPS is high because paraphrases share the question's words.
    column = best_position(table, n_layers, eligible=[not label.endswith("*") for label in labels])
    rule = t_star_rule(flat, table.offsets[column], id_to_token)
    band = choose_band(table.sps[:, column], n_layers)
    return ScanResult(table, labels, column, rule, band, n_layers)


def build_profile(base: ModelProfile | None, config: Any, found: ScanResult, source: str) -> ModelProfile:
    """The scanned model's profile: t* rule and band from the scan, no threshold (``eval`` chooses one)."""
    match = (
        dict(base.match)
        if base is not None and base.match
        else {
            k: getattr(config, k)
            for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
            if hasattr(config, k)
        }
    )
    summary = {"paraphrases": source, "date": datetime.date.today().isoformat(), **found.summary()}
    name = f"{base.name if base is not None else getattr(config, 'model_type', 'model')}-calibrated"
    return ModelProfile(
        name=name,
        t_star=found.rule,
        band=found.band,
        score=base.score if base is not None else DEFAULT_SCORE,
        threshold=None,
        match=match,
        calibration={"sps": summary},
    )


def _pretty(token: str) -> str:
    return token.replace("Ġ", "␣").replace("Ċ", "\\n").replace("▁", "␣")


def plot_heatmap(found: ScanResult, path: str | Path, title: str = "") -> None:
    """SPS over (hidden-state index × prompt position) with t* and the band marked: all scanned positions on
    the left, the template positions (eligible for t*) on their own colour scale on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    sps = found.table.sps
    n_rows, n_cols = sps.shape
    template = [c for c, label in enumerate(found.labels) if not label.endswith("*")]
    panels = [("all scanned positions", list(range(n_cols)))]
    if template and len(template) < n_cols:
        panels.append(("template positions only (eligible for t*)", template))
    widths = [max(len(cols), 3) for _, cols in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(2.4 + 0.62 * sum(widths), 6.6),
        dpi=100,
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    first, last = found.band
    for ax, (name, cols) in zip(axes[0], panels):
        data = sps[:, cols]
        image = ax.imshow(
            data, origin="lower", aspect="auto", cmap="viridis", vmin=float(data.min()), vmax=float(data.max())
        )
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([f"{found.table.offsets[c]}\n{_pretty(found.labels[c])}" for c in cols], fontsize=7)
        ax.set_yticks(range(0, n_rows, 2))
        ax.set_ylabel("hidden-state index (0 = embeddings)")
        ax.set_title(name, fontsize=9)
        if found.t_star_column in cols:
            x = cols.index(found.t_star_column)
            ax.add_patch(Rectangle((x - 0.5, first - 0.5), 1, last - first + 1, fill=False, lw=2.4, ec="red"))
            ax.axvline(x, color="red", lw=0.8, ls=":")
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="SPS")
    axes[0][0].set_xlabel("prompt position from the end (token; * = differs between prompts)")
    rule = found.rule
    fig.suptitle(title or "SPS = S_within − S_across", fontsize=10)
    fig.text(
        0.01,
        0.01,
        "SPS = S_within − S_across (cosine). t* = last "
        f"{_pretty(rule.token)}{'' if rule.offset == 0 else f' {rule.offset:+d}'} (position {found.t_star_offset}); "
        f"band = hidden states {first}..{last} (red box).",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def run_scan(
    model_dir: str | None,
    paraphrases: str,
    limit: int | None,
    n_positions: int,
    batch_size: int,
    out: str,
    heatmap: str | None = None,
    dtype: str = "float32",
    base_profile: str | None = None,
    device: str = "cpu",
) -> tuple[ModelProfile, ScanResult, Path]:
    """Everything ``semgrad-serve calibrate`` does; returns the profile, what the scan found and the heatmap path."""
    check_positions(n_positions)
    base = ModelProfile.load(base_profile) if base_profile else None
    groups = read_paraphrases(paraphrases, limit)
    model, tokenizer, path = load_hf_model(model_dir, dtype, device)
    if base is None:
        try:
            base = resolve_profile(model.config, tokenizer.chat_template, path, None)
        except SemgradError:
            pass  # a new model family: the profile is built from scratch
    found = find_t_star_and_band(model, tokenizer, groups, n_positions, batch_size)
    profile = build_profile(base, model.config, found, str(paraphrases))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out_path)
    png = Path(heatmap) if heatmap else out_path.with_suffix(".png")
    title = f"SPS of {path.name} over {found.table.groups} queries ({found.table.prompts} prompts)"
    plot_heatmap(found, png, title=title)
    return profile, found, png
