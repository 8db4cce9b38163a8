"""Scoring latency of one answer after a short and a long prompt: what vLLM computed reused vs recomputed.

The server scores an answer from t* on over the prompt keys/values vLLM
computed while generating (copied out of its paged cache) and, where the
band's inputs and the answer's logits were recorded while generating, through
the band only and without the head's product; without them it recomputes the
prompt. This times the three paths on the same answer
after a ~100-token and a ~2k-token prompt (default model, float32, one thread,
as the server's scoring thread runs), and the copy out of a paged cache of
vLLM's CPU layout. Ratios are measured side by side in one run.

    python benchmarks/prompt_kv.py
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.scoring.shared_prefix import shared_prefix
from semgrad_serve.serving.worker.kv_layout import CPU_TRANSPOSED_K, copy_blocks, read_prefix, unpack
from semgrad_serve.testing.timing import timed

ROOT = Path(__file__).resolve().parents[1]


ANSWER = "The warehouse in district three stores twenty-one crates of item thirty-nine, according to the notes."
BLOCK_SIZE = 128


def context(n_facts: int) -> str:
    return " ".join(
        f"Fact {i}: the warehouse in district {i % 17} stores {i * 7} crates of item {i * 13 % 101}."
        for i in range(n_facts)
    )


def paged_cache(kv: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The prefix written into per-layer caches of vLLM's CPU layout over shuffled blocks."""
    n_layers, _, heads, n, d = kv.shape
    n_blocks = -(-n // BLOCK_SIZE)
    blocks = torch.randperm(n_blocks + 8)[:n_blocks].tolist()
    caches = []
    for layer in range(n_layers):
        cache = torch.zeros(n_blocks + 8, heads, BLOCK_SIZE, 2 * d)
        halves = cache.view(n_blocks + 8, heads, 2, BLOCK_SIZE * d)
        for i, b in enumerate(blocks):
            k = kv[layer, 0, :, i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            v = kv[layer, 1, :, i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            rows = k.shape[1]
            halves[b, :, 0].view(heads, d, BLOCK_SIZE)[:, :, :rows] = k.transpose(1, 2)
            halves[b, :, 1].view(heads, BLOCK_SIZE, d)[:, :rows] = v
        caches.append(cache)
    return caches, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1, as the server's scoring thread)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_kv_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scorer = Scorer.from_pretrained()
    answer = scorer.answer_ids(ANSWER)
    rows, times = [], {}
    for name, facts in (("short", 0), ("long", 80)):
        question = f"{context(facts)}\nHow many crates does the warehouse in district 3 store?".strip()
        prompt = scorer.prompt_ids([{"role": "user", "content": question}])
        t_star = scorer.prepare(prompt, answer).t_star
        with torch.no_grad():
            kvs = shared_prefix(scorer.weights, prompt[:t_star]).keys_values
        kv = torch.stack([torch.stack((k[0], v[0])) for k, v in kvs])
        caches, blocks = paged_cache(kv)
        assert torch.equal(read_prefix(caches, CPU_TRANSPOSED_K, blocks, t_star), kv)
        first = scorer.band.start
        with torch.no_grad():  # the band's inputs and the answer's logits, as the server records them while generating
            out = scorer.model(torch.tensor([prompt + answer[:-1]]), output_hidden_states=True)
        inputs, logits = out.hidden_states[first][0, t_star:], out.logits[0, len(prompt) - 1 :]
        reuse = dict(given=[Given(kv[first:], inputs, logits)])
        one = [(prompt, answer)]
        recomputed = scorer.score(one)[0]
        gaps = {}
        for path, given in (("cache", dict(given=[Given(kv)])), ("band", reuse)):
            result = scorer.score(one, **given)[0]
            gaps[path] = max(
                abs(getattr(result, k) - getattr(recomputed, k)) / abs(getattr(recomputed, k))
                for k in ("semgrad", "paragrad", "hybridgrad")
            )
        with torch.enable_grad():
            t_recompute = timed(partial(scorer.score, one), args.repeats)
            t_cache = timed(partial(scorer.score, one, given=[Given(kv)]), args.repeats)
            t_band = timed(partial(scorer.score, one, **reuse), args.repeats)
        t_read = timed(partial(copy_blocks, caches, blocks, t_star), args.repeats)
        t_read_band = timed(partial(copy_blocks, caches[first:], blocks, t_star), args.repeats)
        raw, raw_band = copy_blocks(caches, blocks, t_star), copy_blocks(caches[first:], blocks, t_star)
        t_unpack = timed(partial(unpack, raw, CPU_TRANSPOSED_K, t_star), args.repeats)
        t_unpack_band = timed(partial(unpack, raw_band, CPU_TRANSPOSED_K, t_star), args.repeats)
        t_cache += t_unpack + t_read
        t_band += t_unpack_band + t_read_band
        times[name] = (t_cache, t_band)
        rows.append(
            f"| {name} | {len(prompt)} | {len(answer)} | {t_recompute * 1000:.0f} | {t_cache * 1000:.0f} "
            f"({t_read * 1000:.1f}) | {t_band * 1000:.0f} ({t_read_band * 1000:.1f}) | {t_recompute / t_band:.1f}x | "
            f"{gaps['cache']:.1e} / {gaps['band']:.1e} |"
        )
        print(rows[-1], file=sys.stderr)
    ratio_cache = times["long"][0] / times["short"][0]
    ratio = times["long"][1] / times["short"][1]
    text = "\n".join(
        [
            "# Scoring one answer: what vLLM computed reused vs recomputed (CPU)",
            "",
            f"- default model, float32, {args.threads} torch thread(s); median of {args.repeats} runs after a warm-up; "
            f"{time.strftime('%Y-%m-%d %H:%M')}",
            "- recompute: the whole prompt runs (no shared-prefix reuse: one lone request); KV cache: only t* onwards "
            "runs, through",
            "  every layer, over the prompt's keys/values, unpacked on the scoring thread from the blocks the worker "
            "copied out of",
            "  per-layer paged caches of vLLM's CPU layout (block size 128) between engine steps; + band inputs and "
            "logits: only",
            "  the band runs, from the residual stream recorded while generating, over the band layers' keys/values, "
            "and the",
            "  answer's logits are vLLM's (what the server does). Times include copy and unpacking; in brackets the "
            "copy between",
            "  engine steps, the only part on the engine's path (recording adds one gather of the scored rows per "
            "engine step).",
            "",
            "| prompt | prompt tokens | answer tokens | recompute (ms) | KV cache (ms) (copy) | KV cache + band inputs "
            "+ logits (ms) (copy) | speed-up vs recompute | largest relative score gap (cache / + band inputs + "
            "logits) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"- Scoring after the long prompt takes **{ratio:.2f}x** as long as after the short one as the server "
            f"scores, {ratio_cache:.2f}x with the KV cache alone (target ≤ 1.3x: "
            f"{'met' if ratio <= 1.3 else 'NOT met'}).",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
