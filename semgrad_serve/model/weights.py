"""A family-neutral, frozen view of a decoder-only model's weights.

The scoring forward (``decoder.py``) runs on this view, so the same code scores a
Hugging Face model and the modules vLLM has loaded (``serving/weights.py``).
Every tensor is detached: weights never enter the autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SemgradError
from .tensor_parallel import TensorParallel

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. ``qkv`` and ``gate_up`` hold either one fused matrix or the separate ones."""

    input_norm: torch.Tensor
    qkv: tuple[torch.Tensor, ...]
    qkv_bias: tuple[torch.Tensor | None, ...]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: tuple[torch.Tensor, ...]
    down: torch.Tensor
    window: int | None  # sliding-window size of this layer's attention, None for full attention


@dataclass(frozen=True)
class DecoderWeights:
    """Everything the scoring forward needs: weights, attention shape and rotary frequencies. Under tensor
    parallelism (``tp``), one rank's shards: its heads, projection slices and vocabulary rows."""

    family: str
    embed: torch.Tensor  # [V, d] (this rank's vocabulary rows under tensor parallelism)
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor
    head: torch.Tensor  # [V, d]; its own copy in the maths even when tied to ``embed``
    tied: bool  # the head is the input embedding matrix (one tensor)
    padding_idx: int | None  # the embedding row Hugging Face gives no gradient (``config.pad_token_id``)
    norm_eps: float
    n_heads: int  # query heads (this rank's)
    n_kv_heads: int  # key/value heads (this rank's)
    head_dim: int
    inv_freq: torch.Tensor  # float32 rotary inverse frequencies [head_dim / 2]
    rope_scale: float  # post-processing factor on cos/sin (1 for plain RoPE)
    max_positions: int
    tp: TensorParallel | None = None  # this rank's place in a tensor-parallel group; None: unsharded

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary (the head holds ``head.shape[0]`` rows of it on this rank)."""
        return self.head.shape[0] if self.tp is None else self.tp.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


def check_family(config: Any) -> str:
    """Return the config's model family, or raise naming it and the supported ones."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise SemgradError(
            f"model family {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise SemgradError(f"{family} model with activation {act!r} is not supported (only silu)")
    return family


def layer_windows(config: Any) -> list[int | None]:
    """Sliding-window size per layer, as Hugging Face applies it for this config."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    return [window] * n


def rotary_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies and cos/sin scale exactly as transformers computes them."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(config=config)
    return rotary.inv_freq.float(), float(rotary.attention_scaling)


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a config."""
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def build_decoder_weights(
    config: Any,
    embed: torch.Tensor,
    layers: list[LayerWeights],
    final_norm: torch.Tensor,
    head: torch.Tensor,
    norm_eps: float,
    tp: TensorParallel | None = None,
) -> DecoderWeights:
    """Assemble a ``DecoderWeights`` from tensors extracted from a model of a checked family. Under tensor
    parallelism, ``embed`` and ``head`` hold the rank's vocabulary rows from ``tp.vocab_start`` on (rows past the
    vocabulary are padding and dropped) and the layers its shards: its share of the query heads and of the
    key/value heads (one replicated head per rank where there are fewer key/value heads than ranks)."""
    n_heads, n_kv, head_dim = attention_shape(config)
    inv_freq, rope_scale = rotary_frequencies(config)
    vocab = config.vocab_size
    rows = vocab if tp is None else min(embed.shape[0], vocab - tp.vocab_start)
    if tp is not None:
        n_heads, n_kv = n_heads // tp.size, max(1, n_kv // tp.size)
    pad = getattr(config, "pad_token_id", None)
    return DecoderWeights(
        family=config.model_type,
        embed=embed.detach()[:rows],
        layers=tuple(layers),
        final_norm=final_norm.detach(),
        head=head.detach()[:rows],
        tied=head.data_ptr() == embed.data_ptr(),
        padding_idx=pad if isinstance(pad, int) and 0 <= pad < vocab else None,
        norm_eps=float(norm_eps),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        inv_freq=inv_freq.to(embed.device),
        rope_scale=rope_scale,
        max_positions=int(getattr(config, "max_position_embeddings", 1 << 30)),
        tp=tp,
    )


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def from_hf_model(model: torch.nn.Module) -> DecoderWeights:
    """View a transformers ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3 layouts) as ``DecoderWeights``."""
    config = model.config
    check_family(config)
    base = model.model
    windows = layer_windows(config)
    layers = []
    for layer, window in zip(base.layers, windows):
        attn, mlp = layer.self_attn, layer.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.detach(),
                qkv=tuple(p.weight.detach() for p in projs),
                qkv_bias=tuple(_d(p.bias) for p in projs),
                q_norm=_d(getattr(getattr(attn, "q_norm", None), "weight", None)),
                k_norm=_d(getattr(getattr(attn, "k_norm", None), "weight", None)),
                o_proj=attn.o_proj.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                gate_up=(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()),
                down=mlp.down_proj.weight.detach(),
                window=window,
            )
        )
    return build_decoder_weights(
        config,
        embed=base.embed_tokens.weight,
        layers=layers,
        final_norm=base.norm.weight,
        head=model.lm_head.weight,
        norm_eps=config.rms_norm_eps,
    )
