"""Every implementation of the three scoring ops on a CUDA device against the float64 CPU reference.

Skipped without CUDA (CI has none); ``benchmarks/gpu.sh`` runs it on a GPU. The inputs are made
on the CPU (same generators as test_kernels_ops.py), moved to the device, and the device results
compared with the reference computed in float64 on the CPU: an independent computation.
"""

from __future__ import annotations

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.kernels.band_l1 import band_l1_reference
from semgrad_serve.kernels.head_grad_l1 import head_grad_l1_reference
from semgrad_serve.kernels.token_stats import token_stats_reference

from test_kernels_ops import head_inputs, random_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IMPLS = ("torch", "triton", "native")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def kernels_on_cuda(name: str):
    return select_kernels(name, "cuda")


def tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-11, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 1000), (7, 4099), (33, 151936)])
def test_token_stats_cuda(impl: str, dtype: torch.dtype, n: int, v: int) -> None:
    logits, targets = random_logits(n, v, dtype)
    want = token_stats_reference(logits.double(), targets)
    got = kernels_on_cuda(impl).token_stats(logits.cuda(), targets.cuda())
    for g, w in zip(got, want):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu().double(), w, **tol(dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_token_stats_cuda_rejects_nan(impl: str) -> None:
    logits, targets = random_logits(3, 500, torch.float32)
    logits[1, 250] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        kernels_on_cuda(impl).token_stats(logits.cuda(), targets.cuda())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lengths,v,d",
    [([1, 0, 7, 12], 300, 100), ([37], 5003, 576), ([64, 3], 49152, 576)],
    ids=["ragged", "T37", "smollm2"],
)
def test_head_grad_l1_cuda(impl: str, dtype: torch.dtype, lengths: list[int], v: int, d: int) -> None:
    args = head_inputs(lengths, v, d, dtype)
    want = head_grad_l1_reference(*(a.double() if a.is_floating_point() else a for a in args))
    got = kernels_on_cuda(impl).head_grad_l1(*(a.cuda() for a in args))
    assert got.dtype == torch.float64 and got.is_cuda
    rel = 1e-11 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu(), want, rtol=rel, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (16, 5, 2048), (14, 64, 576)])
def test_band_l1_cuda(impl: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    grads = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    want = band_l1_reference(grads.double())
    got = kernels_on_cuda(impl).band_l1(grads.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-11 if dtype == torch.float64 else 1e-6, atol=0)
