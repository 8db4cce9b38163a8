"""Scoring on a GPU, whole batches: the kernels "auto" picks against the torch reference, side by side.

Random-weight Llama decoders at the dimensions of SmolLM2-135M and of a 1.5B Qwen2.5-class model
(no weights can be downloaded on the GPU machine; speed and memory depend on shapes only), in
float32 and bfloat16. Per batch of B answers of A tokens after prompts of P tokens (t* 8 tokens
before the prompt's end, the deeper half of layers as band): milliseconds per batch (best of 5
after 2 warm-ups), answers per second, and the peak GPU memory scoring adds above the weights,
beside the reserve ``scoring_reserve_bytes`` predicts for that batch's tokens (what
``semgrad-serve serve`` keeps outside vLLM's budget on a GPU).

    python benchmarks/scoring_gpu.py [--out benchmarks/results/scoring_cuda.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.serving.worker.scoring_memory import scoring_reserve_bytes

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "SmolLM2-135M dims": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "1.5B dims (Qwen2.5-1.5B-like)": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
}
SHAPES = [(1, 64, 16), (8, 256, 32), (32, 512, 32)]  # (B, P, A)


def build(dims: dict, dtype: torch.dtype):
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    return from_hf_model(model), config


def items(vocab: int, batch: int, prompt: int, answer: int) -> list[PreparedItem]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt + answer), generator=g).tolist()
    return [PreparedItem(tuple(r[:prompt]), tuple(r[prompt:]), prompt - 8) for r in ids]


def time_batch(weights, batch, band, kernels) -> tuple[float, int]:
    for _ in range(2):
        score_batch(weights, batch, band, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        score_batch(weights, batch, band, kernels)  # ends with its read-back: synchronized
        best = min(best, time.perf_counter() - t0)
    return best, torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "scoring_cuda.md")
    args = parser.parse_args()
    rows = [
        "| model | dtype | B × (P + A) | kernels | ms / batch | answers / s | speed-up | peak extra (MiB) | "
        "predicted reserve (MiB) |",
        "|" + "---|" * 9,
    ]
    print(rows[0], flush=True)
    for name, dims in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            weights, config = build(dims, dtype)
            band = range(weights.n_layers - weights.n_layers // 2, weights.n_layers)
            for b, p, a in SHAPES:
                batch = items(config.vocab_size, b, p, a)
                ref = None
                for choice in ("torch", "auto"):
                    kernels = select_kernels(choice, "cuda")
                    seconds, peak = time_batch(weights, batch, band, kernels)
                    ref = ref or seconds
                    reserve = scoring_reserve_bytes(config, dtype, b * (p + a))
                    rows.append(
                        f"| {name} | {str(dtype).removeprefix('torch.')} | {b} × ({p} + {a}) | {kernels.name} | "
                        f"{seconds * 1e3:.1f} | {b / seconds:.0f} | {ref / seconds:.2f}x | {peak / 2**20:.0f} | "
                        f"{reserve / 2**20:.0f} |"
                    )
                    print(rows[-1], flush=True)
            del weights
            torch.cuda.empty_cache()
    text = "\n".join(
        [
            "# Scoring on a GPU (whole batches)",
            "",
            f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}. Random weights at each model's "
            "dimensions; t* 8 tokens before the prompt's end; band = deeper half of layers; prompts recomputed "
            "(no prompt keys/values given). Speed-up: against the torch reference kernels in the same run. Peak "
            "extra: the allocator's peak above the weights during a batch; predicted reserve: "
            "`scoring_reserve_bytes` (serving/scoring_memory.py) for the batch's tokens.",
            "",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
