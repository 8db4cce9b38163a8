"""Tiny random models of each supported family, for exactness tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.gemma2 import modeling_gemma2

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
        Qwen2Config(
            **COMMON, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5, max_window_layers=3
        ),
    ),
    "qwen3-untied": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False)),
    "qwen3-tied": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)),
    # Gemma-2: (1 + w) norms around attention and MLP, GELU-tanh, query_pre_attn_scalar, attention and final-logit
    # soft-caps small enough to bend the scores, alternating sliding/full layers
    "gemma2-softcap": (
        Gemma2ForCausalLM,
        Gemma2Config(
            **COMMON,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
    ),
    # Gemma-3: q/k norms, a rotary base of its own for the sliding layers, linear scaling on the full ones
    "gemma3-untied": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=False,
        ),
    ),
    # Phi-3: fused qkv and gate_up, partial rotary, LongRoPE whose original window (16) the longer items pass
    "phi3-longrope": (
        Phi3ForCausalLM,
        Phi3Config(
            **COMMON,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 1.7, 2.2],
                "long_factor": [1.5, 2.5, 4.0, 6.5],
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # Mixture of experts: top-2 of 8 experts, renormalised (Mixtral, Qwen3-MoE) or not with a gated shared expert
    # (Qwen2-MoE), dense layers between sparse ones
    "mixtral-moe": (
        MixtralForCausalLM,
        MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    ),
    "qwen2-moe-shared": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            qkv_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-moe-tied": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[2],
            tie_word_embeddings=True,
        ),
    ),
}
# Phi-3 whose test sequences all lie within LongRoPE's original window: what scoring takes as given (keys/values,
# states) must come from a forward with the same frequencies, which a window-crossing sequence's prefix is not
_phi3 = FAMILIES["phi3-longrope"][1]
FAMILIES["phi3-short"] = (
    Phi3ForCausalLM,
    Phi3Config(
        **{
            **_phi3.to_dict(),
            "original_max_position_embeddings": 64,
            "rope_parameters": {**_phi3.rope_parameters, "original_max_position_embeddings": 64},
        }
    ),
)
# Between them every feature above: the fast subset (-m "not slow") runs the per-family tests on these only.
FAST_FAMILIES = (
    "llama3-untied",
    "qwen2-window-untied",
    "qwen3-tied",
    "gemma2-softcap",
    "phi3-longrope",
    "qwen2-moe-shared",
)
FAMILY_PARAMS = [
    pytest.param(name, marks=() if name in FAST_FAMILIES else pytest.mark.slow)
    for name in FAMILIES
    if name != "phi3-short"
]
# for tests that give scoring states computed from a prompt alone (as vLLM's cache holds them)
GIVEN_STATE_PARAMS = [
    pytest.param(name, marks=() if name in FAST_FAMILIES else pytest.mark.slow)
    for name in FAMILIES
    if name != "phi3-longrope"
]


def _float64_rms_norm(module: torch.nn.Module):
    """Hugging Face's RMSNorm rounds through float32; for float64 checks use the same formula in float64
    (Gemma's: (1 + w))."""
    gemma = type(module).__name__.startswith("Gemma")
    eps = module.eps if gemma else module.variance_epsilon

    def forward(x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (1 + module.weight) * normed if gemma else module.weight * normed

    return forward


def _float64_router(module: torch.nn.Module):
    """Hugging Face's MoE routers take the softmax in float32; for float64 checks the same routing in float64."""
    renormalise = getattr(module, "norm_topk_prob", True)  # Mixtral's router always renormalises

    def forward(hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, module.hidden_dim), module.weight)
        top, chosen = torch.topk(torch.softmax(logits, dim=-1), module.top_k, dim=-1)
        if renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, chosen

    return forward


def _eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Gemma-2's eager attention with the softmax in the query's dtype when that is wider than float32 (the
    library's takes it in float32), so that float64 checks hold at 1e-9; unchanged otherwise."""
    key = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
    value = modeling_gemma2.repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


modeling_gemma2.eager_attention_forward = _eager_attention


def tiny_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, **config_changes) -> torch.nn.Module:
    """A random model of family ``name`` in ``dtype``, SDPA attention, eval mode (``config_changes``: config fields)."""
    cls, base = FAMILIES[name]
    config = type(base)(**{**base.to_dict(), **config_changes}) if config_changes else base
    torch.manual_seed(seed)
    config._attn_implementation = "eager" if config.model_type == "gemma2" else "sdpa"  # SDPA has no soft-cap
    config._experts_implementation = "eager"  # the reference: one expert at a time (grouped GEMMs take no float64)
    model = cls(config).to(dtype).eval()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = _float64_rms_norm(module)
            if type(module).__name__.endswith("TopKRouter"):
                module.forward = _float64_router(module)
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
