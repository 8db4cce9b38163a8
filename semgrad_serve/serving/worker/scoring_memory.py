"""GPU memory a scoring batch needs beside vLLM, so that ``serve`` can keep it outside vLLM's budget.

vLLM sizes its KV cache to fill ``gpu_memory_utilization`` of the device; scoring runs in the same
process afterwards and allocates its own activations, so on a GPU that memory must be left out of
vLLM's share up front. The estimate is an upper bound per scored token (checked against measured
peaks in ``benchmarks/scoring_gpu.py``): every token of a batch through the band with its autograd
graph, plus one head chunk of logits/gradient and its cast.
"""

from __future__ import annotations

from typing import Any

import torch

from ...scoring.batch import HEAD_CHUNK_ELEMENTS

# Activations the band's graph keeps per token and layer, in hidden-size units: the layer input, two
# norms, q, the attention output and o-projection, the residual sum, and slack for the kernels' workspaces.
_PER_TOKEN_HIDDEN = 12
# ... and in intermediate-size units: gate, up, their activation and product.
_PER_TOKEN_INTERMEDIATE = 4


def scoring_reserve_bytes(config: Any, dtype: torch.dtype, batch_tokens: int) -> int:
    """Bytes to keep free for one scoring batch of ``batch_tokens`` tokens of a model with HF ``config``."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = 2 * config.num_key_value_heads * head_dim
    size = torch.finfo(dtype).bits // 8
    band = layers - layers // 2
    per_token = band * (_PER_TOKEN_HIDDEN * d + kv + _PER_TOKEN_INTERMEDIATE * inter) * size
    head = HEAD_CHUNK_ELEMENTS * (4 + size)  # float32 logits/gradient buffer and its cast to the model dtype
    return batch_tokens * per_token + head
