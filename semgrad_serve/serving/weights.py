"""A ``DecoderWeights`` view of the modules vLLM has loaded, without a second copy of the model.

vLLM's Llama/Mistral/Qwen2/Qwen3 modules hold fused ``qkv_proj`` and
``gate_up_proj`` matrices, which ``LayerWeights`` accepts as they are. On CPU,
vLLM repacks every linear weight for oneDNN and frees the dense matrix;
``keep_dense_cpu_weights`` makes it keep them, since autograd needs them.
Under tensor parallelism each worker views its own shards (its heads, projection
slices and vocabulary rows), which the scoring forward takes as they are.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import SemgradError
from ..model.tensor_parallel import TensorParallel
from ..model.weights import DecoderWeights, LayerWeights, build_decoder_weights, check_family, layer_windows
from .rank_sync import ScoringGroups


def keep_dense_cpu_weights() -> None:
    """Make vLLM's CPU GEMM dispatch keep the dense weights it would free (idempotent).

    Must run before vLLM loads the model: the worker extension module calls it on import.
    """
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "keeps_dense_weights", False):
        return

    @functools.wraps(original)
    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    dispatch.keeps_dense_weights = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch


def _dense(module: Any, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0 or not weight.is_floating_point():
        raise SemgradError(
            f"vLLM holds {name} in a packed or quantized form; SemGrad scoring needs dense "
            "weights (quantized models are not supported)"
        )
    return weight.detach()


def _bias(module: Any, weight: torch.Tensor) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    # vLLM's CPU small-GEMM path converts biases to float32; the scoring forward wants the weight's dtype.
    return None if bias is None else bias.detach().to(weight.dtype)


def _norm(module: Any) -> torch.Tensor | None:
    return None if module is None else module.weight.detach()


def from_vllm_model(model: torch.nn.Module, config: Any, groups: ScoringGroups | None = None) -> DecoderWeights:
    """View vLLM's ``*ForCausalLM`` module (pipeline-parallel size 1) as ``DecoderWeights``. ``groups``: scoring's
    process groups over the tensor-parallel ranks; the view is then of this worker's shards."""
    check_family(config)
    try:
        base, head = model.model, model.lm_head
        layers = []
        for i, (layer, window) in enumerate(zip(base.layers, layer_windows(config))):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _dense(attn.qkv_proj, f"layer {i} qkv_proj")
            layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight.detach(),
                    qkv=(qkv,),
                    qkv_bias=(_bias(attn.qkv_proj, qkv),),
                    q_norm=_norm(getattr(attn, "q_norm", None)),
                    k_norm=_norm(getattr(attn, "k_norm", None)),
                    o_proj=_dense(attn.o_proj, f"layer {i} o_proj"),
                    post_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=(_dense(mlp.gate_up_proj, f"layer {i} gate_up_proj"),),
                    down=_dense(mlp.down_proj, f"layer {i} down_proj"),
                    window=window,
                )
            )
        embed, final_norm = _dense(base.embed_tokens, "embed_tokens"), base.norm.weight
        tp = None
        if groups is not None:
            start = base.embed_tokens.shard_indices.org_vocab_start_index  # the head's rows are the embedding's
            tp = TensorParallel(groups.tensors, groups.rank, groups.size, start, config.vocab_size)
    except AttributeError as exc:
        raise SemgradError(
            f"vLLM's {type(model).__name__} does not have the Llama/Qwen module layout SemGrad reads ({exc})"
        ) from None
    if len(layers) != config.num_hidden_layers:
        raise SemgradError(f"vLLM holds {len(layers)} of {config.num_hidden_layers} layers; pipeline parallelism is not supported")
    return build_decoder_weights(
        config, embed=embed, layers=layers, final_norm=final_norm, head=_dense(head, "lm_head"), norm_eps=config.rms_norm_eps, tp=tp
    )
