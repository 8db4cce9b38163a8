"""A ``DecoderWeights`` view of the modules vLLM has loaded, without a second copy of the model.

vLLM's modules hold fused ``qkv_proj`` and ``gate_up_proj`` matrices, which
``LayerWeights`` accepts as they are. On CPU, vLLM repacks every linear weight
for oneDNN and frees the dense matrix; ``keep_dense_cpu_weights`` makes it keep
them, since autograd needs them. Per family:

- Llama, Mistral, Qwen2, Qwen3, Phi-3 (vLLM runs Phi-3 as a Llama): the same layout;
- Gemma-2/3: four norms per layer (``post_attention_layernorm`` is the attention
  output's, ``pre_feedforward_layernorm`` the MLP input's); the embedding's
  sqrt(d) scale, soft-caps and query scale come from the config;
- Mixtral, Qwen2-MoE, Qwen3-MoE: the router (``gate``) and vLLM's fused experts
  (``w13_weight`` [E, 2I, d], gate rows first; ``w2_weight`` [E, d, I]), read
  where they lie (``expert_layout.py``): dense on GPU (Triton experts), packed in
  16-row blocks by vLLM's CPU experts.

Under tensor parallelism each worker views its own shards (its heads, projection
slices and vocabulary rows), which the scoring forward takes as they are.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ...errors import SemgradError
from ...model.expert_layout import row_blocked
from ...model.tensor_parallel import TensorParallel
from ...model.weights import (
    GEMMA_FAMILIES,
    DecoderWeights,
    LayerWeights,
    MoEWeights,
    build_decoder_weights,
    check_family,
    layer_norms,
    layer_windows,
    moe_layers,
    moe_routing,
)
from .rank_sync import ScoringGroups

CPU_EXPERT_BLOCK = 16  # output rows per block of vLLM's CPU MoE packing ("vec"/"neon"/"vsx" kernels)


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
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or weight.numel() == 0
        or not weight.is_floating_point()
    ):
        raise SemgradError(
            f"vLLM holds {name} in a packed or quantized form; SemGrad scoring needs dense "
            "weights (quantized models are not supported)"
        )
    return weight.detach()


def _bias(module: Any, weight: torch.Tensor) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    # vLLM's CPU small-GEMM path converts biases to float32; the scoring forward wants the weight's dtype.
    return None if bias is None else bias.detach().to(weight.dtype)


def _cpu_packing_block(isa: str, dtype: torch.dtype) -> int | None:
    """The row block of vLLM's CPU MoE packing for kernel ``isa``, found by packing a probe with vLLM's own
    packer; None where it is not row blocks of ``CPU_EXPERT_BLOCK``."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    probe = torch.randn(1, 2 * CPU_EXPERT_BLOCK, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        packed = cpu_prepack_moe_weight(probe, isa)
    except RuntimeError:
        return None
    return CPU_EXPERT_BLOCK if torch.equal(row_blocked(packed, CPU_EXPERT_BLOCK).flatten(1, 2), probe) else None


def _experts(routed: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) of vLLM's fused experts as they lie: dense [E, out, in] tensors, or on CPU views of vLLM's
    row-blocked packing [E, out / b, b, in] (``model/expert_layout.py``); never a copy."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    method = routed.quant_method
    backend = getattr(method, "unquantized_backend", None)
    w13, w2 = routed.w13_weight.detach(), routed.w2_weight.detach()
    if backend in (UnquantizedMoeBackend.TRITON, UnquantizedMoeBackend.BATCHED_TRITON):
        return w13, w2
    if backend == UnquantizedMoeBackend.CPU:
        kernel = method.moe_kernel.fused_experts
        if getattr(kernel, "_use_zentorch", False):
            return w13, w2  # ZenDNN's experts keep the dense layout
        isa = getattr(kernel, "isa", None)
        block = None if isa is None else _cpu_packing_block(isa, w13.dtype)
        if block is not None:
            return row_blocked(w13, block), row_blocked(w2, block)
        raise SemgradError(
            f"vLLM's CPU MoE kernel ({isa}) packs the experts of {name} in a layout SemGrad does not read"
        )
    kind = "quantized experts" if backend is None else f"its {backend.value} MoE kernel's expert layout"
    raise SemgradError(f"SemGrad scoring does not read {kind} ({name}); start vLLM with --moe-backend triton on a GPU")


def _moe(config: Any, block: Any, name: str) -> MoEWeights:
    """A sparse MoE block (Mixtral's ``block_sparse_moe``, Qwen-MoE's ``mlp``): the router, the fused experts and
    Qwen2-MoE's shared expert, checked against the routing SemGrad computes."""
    runner = block.experts
    routed = runner.routed_experts
    top_k, renormalise = moe_routing(config)
    if (routed.top_k, bool(routed.renormalize), routed.scoring_func) != (top_k, renormalise, "softmax") or (
        routed.use_grouped_topk or routed.e_score_correction_bias is not None or routed.routed_scaling_factor != 1.0
    ):
        raise SemgradError(
            f"vLLM routes {name} differently from the model's config (top-k, renormalisation or scoring)"
        )
    if routed.local_num_experts != routed.global_num_experts:
        raise SemgradError("SemGrad scoring does not support expert parallelism: every worker needs every expert")
    gate_up, down = _experts(routed, name)
    shared = getattr(block, "shared_expert", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    return MoEWeights(
        router=_dense(block.gate, f"{name} router"),
        gate_up=gate_up,
        down=down,
        top_k=top_k,
        renormalise=renormalise,
        shared_gate_up=() if shared is None else (_dense(shared.gate_up_proj, f"{name} shared expert gate_up_proj"),),
        shared_down=None if shared is None else _dense(shared.down_proj, f"{name} shared expert down_proj"),
        shared_gate=None
        if shared is None or shared_gate is None
        else _dense(shared_gate, f"{name} shared expert gate"),
    )


def _layer(config: Any, layer: Any, i: int, window: int | None, sparse: bool) -> LayerWeights:
    attn = layer.self_attn
    gemma = config.model_type in GEMMA_FAMILIES
    qkv = _dense(attn.qkv_proj, f"layer {i} qkv_proj")
    if sparse:
        block = layer.block_sparse_moe if config.model_type == "mixtral" else layer.mlp
        gate_up, down, moe = (), None, _moe(config, block, f"layer {i}'s experts")
    else:
        mlp = layer.mlp
        gate_up, down, moe = (
            (_dense(mlp.gate_up_proj, f"layer {i} gate_up_proj"),),
            _dense(mlp.down_proj, f"layer {i} down_proj"),
            None,
        )
    return LayerWeights(
        qkv=(qkv,),
        qkv_bias=(_bias(attn.qkv_proj, qkv),),
        o_proj=_dense(attn.o_proj, f"layer {i} o_proj"),
        gate_up=gate_up,
        down=down,
        window=window,
        moe=moe,
        **layer_norms(layer, gemma),
    )


def from_vllm_model(model: torch.nn.Module, config: Any, groups: ScoringGroups | None = None) -> DecoderWeights:
    """View vLLM's ``*ForCausalLM`` module (pipeline-parallel size 1) as ``DecoderWeights``. ``groups``: scoring's
    process groups over the tensor-parallel ranks; the view is then of this worker's shards."""
    check_family(config)
    try:
        base = model.model
        head = getattr(model, "lm_head", None) or base.embed_tokens  # Gemma-2's logits use the embedding itself
        layers = [
            _layer(config, layer, i, window, sparse)
            for i, (layer, window, sparse) in enumerate(zip(base.layers, layer_windows(config), moe_layers(config)))
        ]
        embed, final_norm = _dense(base.embed_tokens, "embed_tokens"), base.norm.weight
        tp = None
        if groups is not None:
            start = base.embed_tokens.shard_indices.org_vocab_start_index  # the head's rows are the embedding's
            tp = TensorParallel(groups.tensors, groups.rank, groups.size, start, config.vocab_size)
    except AttributeError as exc:
        raise SemgradError(
            f"vLLM's {type(model).__name__} does not have the module layout SemGrad reads for {config.model_type} "
            f"({exc})"
        ) from None
    if len(layers) != config.num_hidden_layers:
        raise SemgradError(
            f"vLLM holds {len(layers)} of {config.num_hidden_layers} layers; pipeline parallelism is not supported"
        )
    return build_decoder_weights(
        config,
        embed=embed,
        layers=layers,
        final_norm=final_norm,
        head=_dense(head, "lm_head"),
        norm_eps=config.rms_norm_eps,
        tp=tp,
    )
