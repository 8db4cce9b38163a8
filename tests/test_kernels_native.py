"""The native ops (csrc/) on CPU: opcheck, vocabulary-sized shapes, determinism, argument errors.

The large shapes (V up to 152k, d up to 4096) run here only: the native op is fast, and the
reference is evaluated over vocabulary chunks so that it never holds the V×d matrix either.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import math

import pytest
import torch
from torch.library import opcheck

from semgrad_serve.kernels import Kernels, select_kernels
from semgrad_serve.kernels.band_l1 import band_l1_reference
from semgrad_serve.kernels.head_grad_l1 import head_grad_l1_reference
from semgrad_serve.kernels.token_stats import token_stats_reference

from test_kernels_ops import assert_within_reference_error

V_BIG = 151936


@pytest.fixture(scope="module")
def native() -> Kernels:
    return select_kernels("native")  # raises, saying how to build, if this install has no native ops


def scorer_inputs(
    lengths: list[int], v: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits, targets, hidden [N, d] in ``dtype``, and offsets for sequences of ``lengths`` rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    logits[0, ::11] = -math.inf
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = 1
    hidden = torch.randn(n, d, generator=g).to(dtype)
    return logits, targets, hidden, torch.tensor([0, *lengths]).cumsum(0)


def chunked_reference(
    nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """head_grad_l1_reference over vocabulary chunks, recombined: bounded memory, same definition."""
    v = nll_grad.shape[1]
    parts = [
        head_grad_l1_reference(nll_grad[:, s : s + chunk], hidden, row_scale, offsets) * min(chunk, v - s)
        for s in range(0, v, chunk)
    ]
    return torch.stack(parts).sum(0) / v


def test_opcheck(native: Kernels) -> None:
    logits, targets, hidden, offsets = scorer_inputs([1, 0, 6], 50, 20, torch.float32)
    _, _, nll_grad = token_stats_reference(logits, targets)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        opcheck(torch.ops.semgrad.token_stats.default, (logits.to(dtype), targets))
        opcheck(torch.ops.semgrad.band_l1.default, (torch.randn(3, 2, 20).to(dtype),))
    row_scale = torch.rand(len(targets))
    opcheck(torch.ops.semgrad.head_grad_l1.default, (nll_grad, hidden, row_scale, offsets))
    opcheck(torch.ops.semgrad.head_grad_l1.default, (nll_grad, hidden.bfloat16(), row_scale, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_full_vocab(native: Kernels, dtype: torch.dtype) -> None:
    logits, targets, _, _ = scorer_inputs([33], V_BIG, 1, dtype)
    refs = zip(token_stats_reference(logits, targets), token_stats_reference(logits.double(), targets))
    for got, (low, high) in zip(native.token_stats(logits, targets), refs):
        assert_within_reference_error(got, low, high)


@pytest.mark.slow
@pytest.mark.parametrize("d", [576, 4096])
def test_head_grad_l1_full_vocab(native: Kernels, d: int) -> None:
    """T=1 and T=32 at V=152k against the chunked reference (the exact facts, T=1 as a product of ℓ1 norms and
    the Frobenius bounds, are checked for every implementation in test_kernels_ops.py)."""
    logits, targets, hidden, offsets = scorer_inputs([1, 32], V_BIG, d, torch.bfloat16)
    _, entropy, nll_grad = native.token_stats(logits, targets)
    row_scale = entropy / offsets.diff().repeat_interleave(offsets.diff()).float()
    got = native.head_grad_l1(nll_grad, hidden, row_scale, offsets)
    torch.testing.assert_close(got, chunked_reference(nll_grad, hidden, row_scale, offsets), rtol=1e-5, atol=0)


def test_band_l1_wide(native: Kernels) -> None:
    grads = torch.randn(16, 8, 4096)
    for x in (grads, grads.bfloat16()):
        torch.testing.assert_close(native.band_l1(x), band_l1_reference(x), rtol=1e-6, atol=0)


def test_results_do_not_depend_on_thread_count(native: Kernels) -> None:
    logits, targets, hidden, offsets = scorer_inputs([3, 17, 1], 20000, 256, torch.float32)
    grads = torch.randn(8, 3, 256)

    def run() -> list[torch.Tensor]:
        logp, entropy, nll_grad = native.token_stats(logits, targets)
        return [logp, entropy, nll_grad, native.head_grad_l1(nll_grad, hidden, entropy, offsets), native.band_l1(grads)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, run()):
        assert torch.equal(a, b)


def test_argument_errors(native: Kernels) -> None:
    nll_grad, hidden, scale = torch.randn(4, 10), torch.randn(4, 3), torch.ones(4)
    with pytest.raises(ValueError, match="non-decreasing"):
        native.head_grad_l1(nll_grad, hidden, scale, torch.tensor([0, 3, 2, 4]))
    with pytest.raises(ValueError, match=r"in \[0, N\]"):
        native.head_grad_l1(nll_grad, hidden, scale, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="expected nll_grad"):
        native.head_grad_l1(nll_grad, hidden[:3], scale, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="expected grads"):
        native.band_l1(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected logits"):
        native.token_stats(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
