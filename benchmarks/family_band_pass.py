"""Scoring pass time per answer token of each supported family against the dense Llama of the same size.

Random-weight models built from transformers' configs, all with SmolLM2-135M's shape (hidden 576, 9 query /
3 key-value heads, intermediate 1536, vocabulary 49152) over ``--layers`` layers; the mixture-of-experts
families route each token to 2 of 8 experts of intermediate 768, so that the active MLP width per token
matches the dense models'. Each model scores the same batches (``score_batch``: band forward, closed-form
head gradient, one backward) of ``--batch`` items with ``--prompt``-token prompts and ``--answer``-token
answers; the median of ``--repeats`` runs is taken, in float32 on the CPU. Prints the table with each family's
ratio to Llama and writes it to benchmarks/results/family_band_pass_cpu.md.

    python benchmarks/family_band_pass.py [--layers 8] [--batch 4] [--prompt 256] [--answer 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.scoring.profiles import deeper_half

RESULT = Path(__file__).resolve().parent / "results" / "family_band_pass_cpu.md"
SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=768)
# name → (model_type, config fields beyond SHAPE)
FAMILIES = {
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 64, "sliding_window": 4096}),
    "gemma3_text": ("gemma3_text", {"query_pre_attn_scalar": 64, "sliding_window": 512}),
    "phi3": ("phi3", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 768}),
    "qwen2_moe": ("qwen2_moe", {**MOE, "num_experts": 8, "shared_expert_intermediate_size": 768}),
    "qwen3_moe": ("qwen3_moe", {**MOE, "num_experts": 8, "norm_topk_prob": True}),
}


def build(model_type: str, fields: dict, layers: int) -> torch.nn.Module:
    config = CONFIG_MAPPING[model_type](**{**SHAPE, **fields}, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval().requires_grad_(False)


def items(n: int, prompt: int, answer: int, seed: int) -> list[PreparedItem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 49000, (prompt + answer,), generator=g).tolist()
        out.append(PreparedItem(tuple(ids[:prompt]), tuple(ids[prompt:]), prompt - 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kernels = select_kernels("auto")
    rows = []
    for name, (model_type, fields) in FAMILIES.items():
        weights = from_hf_model(build(model_type, fields, args.layers))
        band = deeper_half(weights.n_layers)
        batch = items(args.batch, args.prompt, args.answer, seed=1)
        score_batch(weights, items(1, 32, 4, seed=2), band, kernels)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            score_batch(weights, batch, band, kernels)
            times.append(time.perf_counter() - start)
        per_token = statistics.median(times) / (args.batch * args.answer)
        rows.append((name, per_token))
        print(f"{name}: {per_token * 1e3:.2f} ms per answer token", flush=True)
    llama = rows[0][1]
    lines = [
        "# Scoring pass per answer token, each family against the dense Llama of the same size",
        "",
        f"Random weights, SmolLM2-135M's shape over {args.layers} layers (hidden 576, 9/3 heads, intermediate 1536,",
        "vocabulary 49152; MoE: top-2 of 8 experts of intermediate 768), float32, "
        f"batches of {args.batch} items with {args.prompt}-token prompts and {args.answer}-token answers, "
        f"median of {args.repeats} runs. CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads.",
        "",
        "| family | ms per answer token | ratio to llama |",
        "|---|---|---|",
        *[f"| {name} | {t * 1e3:.2f} | {t / llama:.2f} |" for name, t in rows],
        "",
        f"Generated by `python benchmarks/family_band_pass.py` on {date.today().isoformat()}.",
    ]
    RESULT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
