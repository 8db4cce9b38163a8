"""Tiny random models of each supported family, for exactness tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 101
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,  # large weights: peaked softmaxes and gradients of very different sizes
)

# name → (model class, config); tied and untied heads, rope scaling, sliding windows, qkv bias, qk-norm
FAMILIES = {
    "llama-tied": (LlamaForCausalLM, LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "llama3-untied": (
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        ),
    ),
    "mistral-window": (MistralForCausalLM, MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=6)),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen2-window-untied": (
        Qwen2ForCausalLM,
        Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5, max_window_layers=3),
    ),
    "qwen3-untied": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False)),
    "qwen3-tied": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)),
}
# Between them every feature above: the fast subset (-m "not slow") runs the per-family tests on these only.
FAST_FAMILIES = ("llama3-untied", "qwen2-window-untied", "qwen3-tied")
FAMILY_PARAMS = [pytest.param(name, marks=() if name in FAST_FAMILIES else pytest.mark.slow) for name in FAMILIES]


def _float64_rms_norm(module: torch.nn.Module):
    """Hugging Face's RMSNorm rounds through float32; for float64 checks use the same formula in float64."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    return forward


def tiny_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **config_changes) -> torch.nn.Module:
    """A random model of family ``name`` in ``dtype``, SDPA attention, eval mode (``config_changes``: config fields)."""
    cls, base = FAMILIES[name]
    config = type(base)(**{**base.to_dict(), **config_changes}) if config_changes else base
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = cls(config).to(dtype).eval()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = _float64_rms_norm(module)
    return model


def random_items(n: int, seed: int = 1) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, answer ids, t*) triples of varied lengths, t* anywhere in the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(2, 24, (1,), generator=g))
        n_answer = int(torch.randint(1, 10, (1,), generator=g))
        prompt = torch.randint(0, VOCAB, (n_prompt,), generator=g).tolist()
        answer = torch.randint(0, VOCAB, (n_answer,), generator=g).tolist()
        out.append((prompt, answer, int(torch.randint(0, n_prompt, (1,), generator=g))))
    return out
