"""Mixture-of-experts weights as vLLM holds them, multiplied without a dense copy.

An expert's matrix is stored in one of two ways:

- dense: ``[out, in]``, a slice of a stacked ``[E, out, in]`` tensor (transformers, and vLLM's Triton experts);
- row-blocked: ``[out / b, b, in]``, a slice of ``row_blocked(packed, b)``. vLLM's CPU experts repack
  ``w13_weight``/``w2_weight`` in place into blocks of ``b`` output rows, each stored input-major (``[in, b]``),
  so no ``[E, out, in]`` view of them exists; this 4-d view reads them where they lie.

``expert_linear`` computes ``x @ W.T`` for either; the row-blocked product is a batched matmul over the blocks,
which reads the packed storage with unit stride, so autograd never copies the weights.
"""

from __future__ import annotations

import torch


def row_blocked(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The view [E, out / block, block, in] of a stacked expert tensor [E, out, in] whose storage holds, per
    expert and block of ``block`` output rows, the block as [in, block] (vLLM's CPU MoE packing)."""
    experts, rows, cols = packed.shape
    if rows % block or not packed.is_contiguous():
        raise ValueError(f"a packed expert tensor {tuple(packed.shape)} does not split into blocks of {block} rows")
    return packed.view(experts, rows // block, cols, block).transpose(2, 3)


def expert_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for tokens ``x`` [T, in] and one expert's ``weight``: dense [out, in] or row-blocked
    [out / b, b, in] (a slice of ``row_blocked``); returns [T, out]."""
    if weight.dim() == 2:
        return x @ weight.T
    blocks = torch.matmul(x, weight.transpose(1, 2))  # [out / b, T, b]; weight.transpose(1, 2) is [in, b] per block
    return blocks.transpose(0, 1).flatten(1)
