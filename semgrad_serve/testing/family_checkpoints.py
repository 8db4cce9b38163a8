"""Small random-weight checkpoints on disk, one per model family that vLLM serves and SemGrad scores beyond the
Llama layout: Gemma-3 (text), Phi-3, Qwen3-MoE and Mixtral. Each is saved with ``save_pretrained`` in float32 with
the default model's tokenizer and chat template (SmolLM2's), so ``semgrad-serve serve``, vLLM and the offline
scorer load it as they would a downloaded model. Tiny on purpose: hidden size 128, 4 layers, 8 experts (top 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from semgrad_serve.model.loading import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# The default model's special tokens: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2.
SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.1,  # peaked enough that answers differ in confidence
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)


def _gemma3(vocab: int) -> tuple[Callable[[Any], torch.nn.Module], Any]:
    # Sliding layers with a 32-token window (shorter than the chat prompts, so keys fall out of it) and a full
    # layer every fourth; query_pre_attn_scalar apart from head_dim, so a wrong attention scale shows.
    config = Gemma3TextConfig(
        vocab_size=vocab,
        **SHAPE,
        head_dim=32,
        sliding_window=32,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )
    return Gemma3ForCausalLM, config


def _phi3(vocab: int) -> tuple[Callable[[Any], torch.nn.Module], Any]:
    # Phi-4-mini's shape of rotary: partial (3/4 of each head), untied head
    config = Phi3Config(vocab_size=vocab, **SHAPE, partial_rotary_factor=0.75, tie_word_embeddings=False)
    return Phi3ForCausalLM, config


def _qwen3_moe(vocab: int) -> tuple[Callable[[Any], torch.nn.Module], Any]:
    # layer 1 dense (mlp_only_layers), the others 8 experts, top 2, renormalised
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        **SHAPE,
        head_dim=32,
        num_experts=8,
        **MOE,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM, config


def _mixtral(vocab: int) -> tuple[Callable[[Any], torch.nn.Module], Any]:
    shape = {**SHAPE, "intermediate_size": MOE["moe_intermediate_size"]}
    config = MixtralConfig(
        vocab_size=vocab, **shape, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False
    )
    return MixtralForCausalLM, config


FAMILIES: dict[str, Callable[[int], tuple[Callable[[Any], torch.nn.Module], Any]]] = {
    "gemma3_text": _gemma3,
    "phi3": _phi3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
}


def save_family_checkpoint(family: str, target: Path, seed: int = 0, **config_changes: Any) -> Path:
    """A random float32 model of ``family`` (a ``model_type``; ``config_changes``: config fields) saved in
    ``target``, with the default model's tokenizer and chat template; returns ``target``."""
    source = resolve_model(None)
    vocab = len(json.loads((source / "tokenizer.json").read_text())["model"]["vocab"])
    cls, config = FAMILIES[family](vocab)
    for field, value in config_changes.items():  # by attribute: the config's own aliases apply (num_experts)
        setattr(config, field, value)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    with torch.no_grad():  # norms start at their identity (1, or 0 for Gemma's 1 + w): make a swapped norm show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    return target


if (
    __name__ == "__main__"
):  # python -m semgrad_serve.testing.family_checkpoints OUT_DIR: every family, for exploring by hand
    import sys

    root = Path(sys.argv[1])
    for name in FAMILIES:
        print(save_family_checkpoint(name, root / name.replace("_", "-")))
