"""Experts in vLLM's CPU row-blocked packing: ``row_blocked`` reads vLLM's own packing of a stacked expert tensor,
and ``expert_linear`` on it equals the dense product and its gradient."""

from __future__ import annotations

import pytest
import torch

from semgrad_serve.model.expert_layout import expert_linear, row_blocked

E, OUT, IN = 3, 64, 48


def test_row_blocked_reads_vllms_cpu_packing() -> None:
    """vLLM's CPU MoE packer (the 'vec' kernels' layout, blocks of 16 rows) seen through ``row_blocked``
    gives back every weight where the dense tensor has it."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    for dtype in (torch.float32, torch.bfloat16):
        dense = torch.randn(E, OUT, IN).to(dtype)
        packed = cpu_prepack_moe_weight(dense, "vec")
        assert not torch.equal(packed, dense)  # it does move the weights
        view = row_blocked(packed, 16)
        assert view.data_ptr() == packed.data_ptr() and view.shape == (E, OUT // 16, 16, IN)
        assert torch.equal(view.flatten(1, 2), dense)


def test_expert_linear_equals_the_dense_product_and_gradient() -> None:
    """float64, packed by hand as vLLM packs (per block of 16 rows, the block input-major): the product and
    autograd's gradient with respect to the tokens equal the dense ones."""
    torch.manual_seed(0)
    dense = torch.randn(E, OUT, IN, dtype=torch.float64)
    packed = dense.view(E, OUT // 16, 16, IN).transpose(2, 3).contiguous().view(E, OUT, IN)
    blocked = row_blocked(packed, 16)
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, OUT, dtype=torch.float64)
    for e in range(E):
        (grad_blocked,) = torch.autograd.grad(expert_linear(x, blocked[e]), x, upstream)
        y = expert_linear(x, blocked[e])
        assert torch.allclose(y, x @ dense[e].T, rtol=0, atol=1e-12)
        (grad_dense,) = torch.autograd.grad(x @ dense[e].T, x, upstream)
        assert torch.allclose(grad_blocked, grad_dense, rtol=0, atol=1e-12)
        assert torch.equal(expert_linear(x, dense[e]), x @ dense[e].T)


def test_row_blocked_refuses_a_shape_that_does_not_split() -> None:
    with pytest.raises(ValueError, match="blocks of 16 rows"):
        row_blocked(torch.zeros(2, 40, 8), 16)
