"""A family-neutral, frozen view of a decoder-only model's weights.

The scoring forward (``decoder.py``) runs on this view, so the same code scores a
Hugging Face model and the modules vLLM has loaded (``serving/worker/vllm_weights.py``).
Every tensor is detached: weights never enter the autograd graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SemgradError
from .tensor_parallel import TensorParallel

# model_type → the layout its layers follow (``from_hf_model``; vLLM's modules: ``serving/worker/vllm_weights.py``)
SUPPORTED_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
# Families that are refused, with the reason: what the scoring forward would need and does not have.
REFUSED_FAMILIES = {
    "deepseek_v2": "multi-head latent attention is not supported",
    "deepseek_v3": "multi-head latent attention is not supported",
    "kimi_k2": "multi-head latent attention is not supported",
    "mamba": "state-space (Mamba) layers are not supported",
    "mamba2": "state-space (Mamba) layers are not supported",
    "jamba": "hybrid Mamba/attention models are not supported",
    "falcon_h1": "hybrid Mamba/attention models are not supported",
    "nemotron_h": "hybrid Mamba/attention models are not supported",
    "qwen3_next": "hybrid linear-attention models are not supported",
    "gemma3": "multimodal models (a vision tower) are not supported; use a text-only checkpoint (gemma3_text)",
    "llava": "multimodal models (a vision tower) are not supported",
    "mllama": "multimodal models (a vision tower) are not supported",
    "qwen2_vl": "multimodal models (a vision tower) are not supported",
    "qwen2_5_vl": "multimodal models (a vision tower) are not supported",
}


@dataclass(frozen=True)
class MoEWeights:
    """A sparse mixture-of-experts MLP: a softmax router over ``router``'s rows, the top-k experts of each token
    (their probabilities renormalised to sum to 1 where ``renormalise``), and Qwen2-MoE's shared expert scaled
    by sigmoid(``shared_gate`` · x). Experts as one tensor each, as vLLM's fused experts and transformers hold them."""

    router: torch.Tensor  # [E, d]
    # Each expert's matrix dense ([E, out, in]) or in vLLM's CPU row blocks ([E, out / b, b, in], a view of its
    # packing): ``expert_layout.expert_linear`` multiplies either without a copy.
    gate_up: torch.Tensor  # out = 2I: each expert's gate rows, then its up rows
    down: torch.Tensor  # out = d, in = I
    top_k: int
    renormalise: bool
    shared_gate_up: tuple[torch.Tensor, ...] = ()  # the shared expert's gate/up (fused or separate); () = none
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None  # [1, d]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. ``qkv`` and ``gate_up`` hold either one fused matrix or the separate ones. ``post_norm``
    is the norm before the MLP (Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm)."""

    input_norm: torch.Tensor
    qkv: tuple[torch.Tensor, ...]
    qkv_bias: tuple[torch.Tensor | None, ...]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: tuple[torch.Tensor, ...]  # the dense MLP's; () where ``moe`` replaces it
    down: torch.Tensor | None
    window: int | None  # sliding-window size of this layer's attention, None for full attention
    attn_out_norm: torch.Tensor | None = None  # Gemma: norm of the attention output before the residual add
    mlp_out_norm: torch.Tensor | None = None  # Gemma: norm of the MLP output before the residual add
    moe: MoEWeights | None = None
    rope: int = 0  # index of this layer's rotary in ``DecoderWeights.rotaries``


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding of one kind of layer, as transformers computes it: inverse frequencies over the first
    ``2 * len(inv_freq)`` dims of each head (partial rotary), a cos/sin scale, and LongRoPE's second set of
    frequencies, which a sequence longer than ``long_after`` tokens uses at every position."""

    inv_freq: torch.Tensor  # float32 [rotary_dim / 2]
    scale: float
    long_inv_freq: torch.Tensor | None = None
    long_after: int = 0


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
    rotaries: tuple[Rotary, ...]  # one per kind of layer (``LayerWeights.rope``)
    max_positions: int
    tp: TensorParallel | None = None  # this rank's place in a tensor-parallel group; None: unsharded
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): 1 for Gemma's (1 + w), 0 for Llama's w
    activation: str = "silu"  # the gated MLP's: "silu" or "gelu_tanh"
    embed_scale: float | None = None  # Gemma multiplies the embedding by sqrt(hidden size)
    attn_scale: float | None = None  # query scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma-2: attention scores → c·tanh(s / c)
    final_softcap: float | None = None  # Gemma-2: logits → c·tanh(z / c)

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
    def long_rope_after(self) -> int | None:
        """The length past which a sequence takes LongRoPE's long frequencies; None without LongRoPE."""
        longs = [r.long_after for r in self.rotaries if r.long_inv_freq is not None]
        return min(longs) if longs else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}  # config name → ours


def check_family(config: Any) -> str:
    """Return the config's model family, or raise naming it and why it is refused."""
    family = getattr(config, "model_type", None)
    if family in REFUSED_FAMILIES:
        raise SemgradError(f"model family {family!r} is not supported: {REFUSED_FAMILIES[family]}")
    if family not in SUPPORTED_FAMILIES:
        raise SemgradError(
            f"model family {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    act = activation_name(config)
    if act not in ACTIVATIONS:
        raise SemgradError(f"{family} model with activation {act!r} is not supported (only silu and gelu_tanh)")
    rope_types = {p.get("rope_type", "default") for p in rope_parameters(config).values()}
    if rope_types - {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}:
        raise SemgradError(f"{family} model with rotary type {sorted(rope_types)} is not supported")
    return family


def activation_name(config: Any) -> str:
    """The gated MLP's activation as the config names it (Gemma: ``hidden_activation``)."""
    if config.model_type in GEMMA_FAMILIES:
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return getattr(config, "hidden_act", "silu")


def layer_windows(config: Any) -> list[int | None]:
    """Sliding-window size per layer, as Hugging Face applies it for this config."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:n]]
    return [window] * n


def layer_rotary_kinds(config: Any) -> list[str | None]:
    """Per layer, the key of its rotary parameters: its layer type where the config gives each type its own
    (Gemma-3's sliding layers have their own base), else None."""
    n = config.num_hidden_layers
    if set(rope_parameters(config)) == {None}:
        return [None] * n
    return list(config.layer_types[:n])


def rope_parameters(config: Any) -> dict[str | None, dict]:
    """The config's rotary parameters by layer type (None: one set for every layer)."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return dict(params)
    return {None: dict(params)}


def rotary_of(config: Any, kind: str | None) -> Rotary:
    """One kind of layer's rotary exactly as transformers computes it (its ROPE_INIT_FUNCTIONS), LongRoPE's long
    frequencies included."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(config)[kind]
    rope_type = params.get("rope_type", "default")
    kwargs = {} if kind is None else {"layer_type": kind}
    if rope_type == "default":
        _, _, head_dim = attention_shape(config)
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return Rotary(inv_freq.float(), 1.0)
    init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scale = init(config, None, **kwargs)
    if rope_type != "longrope":
        return Rotary(inv_freq.float(), float(scale))
    original = params.get("original_max_position_embeddings") or config.original_max_position_embeddings
    long_inv_freq, _ = init(config, None, seq_len=original + 1, **kwargs)
    return Rotary(inv_freq.float(), float(scale), long_inv_freq.float(), int(original))


def rotaries(config: Any) -> tuple[tuple[Rotary, ...], list[int]]:
    """The config's distinct rotaries and, per layer, the index of its own."""
    kinds = layer_rotary_kinds(config)
    order = list(dict.fromkeys(kinds))
    return tuple(rotary_of(config, k) for k in order), [order.index(k) for k in kinds]


def moe_layers(config: Any) -> list[bool]:
    """Per layer, whether its MLP is a sparse mixture of experts (Qwen-MoE's ``decoder_sparse_step`` and
    ``mlp_only_layers``; every layer of Mixtral)."""
    n = config.num_hidden_layers
    if config.model_type == "mixtral":
        return [True] * n
    if config.model_type not in ("qwen2_moe", "qwen3_moe"):
        return [False] * n
    step, dense = getattr(config, "decoder_sparse_step", 1), set(getattr(config, "mlp_only_layers", []) or [])
    return [i not in dense and config.num_experts > 0 and (i + 1) % step == 0 for i in range(n)]


def moe_routing(config: Any) -> tuple[int, bool]:
    """(experts per token, whether their probabilities are renormalised) of a MoE config."""
    return config.num_experts_per_tok, config.model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))


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
    ropes, layer_ropes = rotaries(config)
    gemma = config.model_type in GEMMA_FAMILIES
    vocab = config.vocab_size
    rows = vocab if tp is None else min(embed.shape[0], vocab - tp.vocab_start)
    if tp is not None:
        n_heads, n_kv = n_heads // tp.size, max(1, n_kv // tp.size)
    pad = getattr(config, "pad_token_id", None)
    return DecoderWeights(
        family=config.model_type,
        embed=embed.detach()[:rows],
        layers=tuple(dataclasses.replace(layer, rope=r) for layer, r in zip(layers, layer_ropes)),
        final_norm=final_norm.detach(),
        head=head.detach()[:rows],
        tied=head.data_ptr() == embed.data_ptr(),
        padding_idx=pad if isinstance(pad, int) and 0 <= pad < vocab else None,
        norm_eps=float(norm_eps),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rotaries=tuple(_on(r, embed.device) for r in ropes),
        max_positions=int(getattr(config, "max_position_embeddings", 1 << 30)),
        tp=tp,
        norm_offset=1.0 if gemma else 0.0,
        activation=ACTIVATIONS[activation_name(config)],
        embed_scale=config.hidden_size**0.5 if gemma else None,
        attn_scale=config.query_pre_attn_scalar**-0.5 if gemma else None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) if gemma else None,
        final_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
    )


def _on(r: Rotary, device: torch.device) -> Rotary:
    long = None if r.long_inv_freq is None else r.long_inv_freq.to(device)
    return dataclasses.replace(r, inv_freq=r.inv_freq.to(device), long_inv_freq=long)


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _weight(module: torch.nn.Module | None) -> torch.Tensor | None:
    return None if module is None else module.weight.detach()


def layer_norms(layer: Any, gemma: bool) -> dict[str, torch.Tensor | None]:
    """A decoder layer's norms as ``LayerWeights`` names them, from a transformers or vLLM layer module (both name
    them alike): Gemma's four (its ``post_attention_layernorm`` is on the attention output, its
    ``pre_feedforward_layernorm`` before the MLP), or the two of the Llama layout; q/k norms where the attention has
    them."""
    attn = layer.self_attn
    return {
        "input_norm": layer.input_layernorm.weight.detach(),
        "q_norm": _weight(getattr(attn, "q_norm", None)),
        "k_norm": _weight(getattr(attn, "k_norm", None)),
        "post_norm": (layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight.detach(),
        "attn_out_norm": layer.post_attention_layernorm.weight.detach() if gemma else None,
        "mlp_out_norm": _weight(getattr(layer, "post_feedforward_layernorm", None)),
    }


def _hf_attention(attn: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """(qkv, qkv bias) of a transformers attention module: Phi-3's fused ``qkv_proj`` or the three projections."""
    projs = (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)
    return tuple(p.weight.detach() for p in projs), tuple(_d(p.bias) for p in projs)


def _hf_dense_mlp(mlp: torch.nn.Module) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(gate_up, down) of a transformers gated MLP: Phi-3's fused ``gate_up_proj`` or gate and up."""
    if hasattr(mlp, "gate_up_proj"):
        return (mlp.gate_up_proj.weight.detach(),), mlp.down_proj.weight.detach()
    return (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()), mlp.down_proj.weight.detach()


def _hf_moe(config: Any, mlp: torch.nn.Module) -> MoEWeights:
    top_k, renormalise = moe_routing(config)
    shared = getattr(mlp, "shared_expert", None)
    shared_gate_up, shared_down = _hf_dense_mlp(shared) if shared is not None else ((), None)
    return MoEWeights(
        router=mlp.gate.weight.detach(),
        gate_up=mlp.experts.gate_up_proj.detach(),
        down=mlp.experts.down_proj.detach(),
        top_k=top_k,
        renormalise=renormalise,
        shared_gate_up=shared_gate_up,
        shared_down=shared_down,
        shared_gate=_weight(getattr(mlp, "shared_expert_gate", None)),
    )


def from_hf_model(model: torch.nn.Module) -> DecoderWeights:
    """View a transformers ``*ForCausalLM`` of a supported family as ``DecoderWeights``."""
    config = model.config
    check_family(config)
    gemma = config.model_type in GEMMA_FAMILIES
    base = model.model
    layers = []
    for layer, window, sparse in zip(base.layers, layer_windows(config), moe_layers(config)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _hf_attention(attn)
        gate_up, down = ((), None) if sparse else _hf_dense_mlp(mlp)
        layers.append(
            LayerWeights(
                qkv=qkv,
                qkv_bias=qkv_bias,
                o_proj=attn.o_proj.weight.detach(),
                gate_up=gate_up,
                down=down,
                window=window,
                moe=_hf_moe(config, mlp) if sparse else None,
                **layer_norms(layer, gemma),
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
