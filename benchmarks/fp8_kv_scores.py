"""How far scores move when the prompt keys/values come from an FP8 KV cache instead of full precision.

vLLM's ``--kv-cache-dtype fp8`` stores each key/value as e4m3 of value / scale, one scale per layer for keys
and one for values. This scores TruthfulQA questions with their first truthful answer (default model,
float32) three ways, side by side: prompt keys/values recomputed (the SPEC's numbers, what offline ``score``
gives), taken as exact keys/values, and taken from a simulated FP8 cache (quantized as vLLM's writer does,
then read back with ``kv_layout.dequantize``), with calibrated scales (amax / 448, as an FP8 checkpoint
carries) and with vLLM's default scale 1.0 (no scales in the checkpoint). It prints, per score, the largest
relative difference from the recomputed score and how many flags flip, which is what decides whether the
server may reuse an FP8 cache (docs/gpu.md).

    python benchmarks/fp8_kv_scores.py [--n 32] [--out benchmarks/results/fp8_kv_scores_cpu.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from semgrad_serve.model.forward import prefix_keys_values
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.serving.worker.kv_layout import KVQuant, dequantize

ROOT = Path(__file__).resolve().parents[1]


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "test.jsonl"
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCORES = ("semgrad", "paragrad", "hybridgrad")


def exact_prefix(scorer: Scorer, prompt: list[int]) -> torch.Tensor:
    """Keys/values [n_layers, 2, kv_heads, t*, head_dim] of the prompt before t*, full precision."""
    t_star, _ = scorer.locate_t_star(prompt)
    kvs = prefix_keys_values(scorer.weights, prompt[:t_star])
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in kvs])


def fp8_cache(kv: torch.Tensor, calibrated: bool) -> torch.Tensor:
    """``kv`` as vLLM's FP8 cache would give it back: stored as e4m3 of value / scale, dequantized."""
    quants = []
    stored = torch.empty(kv.shape, dtype=torch.uint8)
    for layer, (k, v) in enumerate(kv):
        ks, vs = (k.abs().max().item() / FP8_MAX, v.abs().max().item() / FP8_MAX) if calibrated else (1.0, 1.0)
        stored[layer, 0] = (k / ks).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        stored[layer, 1] = (v / vs).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        quants.append(KVQuant(FP8, ks, vs))
    return dequantize(stored, quants, kv.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="questions (default: 32)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    scorer = Scorer.from_pretrained(device="cpu")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[: args.n]]
    pairs = [
        (scorer.prompt_ids([{"role": "user", "content": r["query"]}]), scorer.answer_ids(r["truthful answer"][0]))
        for r in rows
    ]
    exact = [exact_prefix(scorer, list(p)) for p, _ in pairs]
    runs = {
        "recomputed": scorer.score(pairs),
        "exact keys/values": scorer.score(pairs, given=[Given(kv) for kv in exact]),
        "FP8, calibrated scales": scorer.score(pairs, given=[Given(fp8_cache(kv, True)) for kv in exact]),
        "FP8, scale 1.0": scorer.score(pairs, given=[Given(fp8_cache(kv, False)) for kv in exact]),
    }
    base = runs["recomputed"]
    lines = [
        f"# Scores over FP8 prompt keys/values ({len(pairs)} TruthfulQA answers, default model, float32, CPU)",
        "",
        "`python benchmarks/fp8_kv_scores.py`. Largest relative difference from the recomputed score, and flags "
        "that differ.",
        "",
        "| prompt keys/values | " + " | ".join(f"max rel. diff {s}" for s in SCORES) + " | flags flipped |",
        "|---|" + "---|" * (len(SCORES) + 1),
    ]
    for name, results in runs.items():
        diffs = [
            max(abs(getattr(r, s) - getattr(b, s)) / abs(getattr(b, s)) for r, b in zip(results, base)) for s in SCORES
        ]
        flips = sum(scorer.report(r)["flagged"] != scorer.report(b)["flagged"] for r, b in zip(results, base))
        lines.append(f"| {name} | " + " | ".join(f"{d:.2e}" for d in diffs) + f" | {flips} of {len(pairs)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
