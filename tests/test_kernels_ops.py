"""Every implementation of the three scoring ops against its plain-torch reference, plus exact facts.

Triton runs on CPU under its interpreter, with small blocks so that every shape spans several
blocks and ends mid-block; shapes stay moderate because the interpreter is slow (the large
shapes are in test_kernels_native.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import functools
import math
from typing import Callable

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.kernels.band_l1 import band_l1_reference
from semgrad_serve.kernels.head_grad_l1 import head_grad_l1_reference
from semgrad_serve.kernels.token_stats import token_stats_reference

IMPLS = ("triton", "native")
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_TRITON_BLOCKS = {
    "token_stats": dict(block_v=128),
    "head_grad_l1": dict(block_v=32, block_d=64, block_t=16),
    "band_l1": dict(block_d=64),
}


def implementation(op: str, name: str) -> Callable:
    """Kernels ``name``'s ``op`` (an error saying why if not available here); Triton with small blocks."""
    fn = getattr(select_kernels(name), op)
    return functools.partial(fn, **_TRITON_BLOCKS[op]) if name == "triton" else fn


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def assert_within_reference_error(
    got: torch.Tensor, low: torch.Tensor, high: torch.Tensor, factor: float = 8.0
) -> None:
    """A kernel's result against the float64 reference ``high``, within ``factor`` times the largest error of the
    reference computed in the kernel's own precision (``low``) plus one rounding of the largest value: a long
    float32 sum's rounding depends on how it is split over threads, so a fixed tolerance fails by chance over a
    large vocabulary, while this bound scales with the precision's own error (as cut-cross-entropy's tests do)."""
    got, low, high = got.double(), low.double(), high.double()
    finite = torch.isfinite(high)
    assert torch.equal(got[~finite], high[~finite])
    scale = high[finite].abs().max()
    bound = factor * (low - high)[finite].abs().max() + torch.finfo(torch.float32).eps * scale
    error = (got - high)[finite].abs().max()
    assert error <= bound, f"error {float(error):.3g} over the bound {float(bound):.3g}"


def random_logits(n: int, v: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with −inf entries in the first row and ±1e4 entries in the last; targets on finite entries."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    z[0, ::7] = -math.inf
    z[-1, 1::5] = 1e4
    z[-1, 2::5] = -1e4
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = 1  # not a −inf entry
    return z.to(dtype), targets


# ---- operation 1: token stats ----


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(1, 1000), (7, 1000), (3, 2051)])
def test_token_stats_matches_reference(impl: str, dtype: torch.dtype, n: int, v: int) -> None:
    logits, targets = random_logits(n, v, dtype)
    ours = implementation("token_stats", impl)(logits, targets)
    ref = token_stats_reference(logits, targets)
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tolerance(dtype))


def test_token_stats_triton_default_blocks_full_vocab() -> None:
    logits, targets = random_logits(2, 151936, torch.float32)
    ours = select_kernels("triton").token_stats(logits, targets)
    refs = zip(token_stats_reference(logits, targets), token_stats_reference(logits.double(), targets))
    for got, (low, high) in zip(ours, refs):
        assert_within_reference_error(got, low, high)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_stats_extreme_rows(impl: str) -> None:
    v = 300
    logits = torch.zeros(3, v)
    logits[0, :] = -math.inf
    logits[0, :2] = 1e4  # two equal maxima: entropy log 2
    logits[0, 2] = -1e4
    logits[1, 5] = -math.inf  # target on a −inf entry: log-prob −inf
    targets = torch.tensor([0, 5, 7])
    logp, entropy, grad = implementation("token_stats", impl)(logits, targets)
    assert logp[0].item() == pytest.approx(-math.log(2), rel=1e-6)
    assert entropy[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert logp[1].item() == -math.inf and grad[1, 5].item() == -1.0
    assert entropy[2].item() == pytest.approx(math.log(v), rel=1e-6)  # uniform row
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    for got, want in zip((logp, entropy, grad), token_stats_reference(logits, targets)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_nll_grad_l1_is_twice_one_minus_p(impl: str) -> None:
    """‖softmax − onehot‖₁ = 2(1 − p(y)), so ‖g_t‖₁ = 2(w_t/T)(1 − p(y_t))."""
    logits, targets = random_logits(5, 999, torch.float32, seed=3)
    logp, _, grad = implementation("token_stats", impl)(logits, targets)
    torch.testing.assert_close(grad.abs().sum(1), 2 * (1 - logp.exp()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ("torch", *IMPLS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_token_stats_rejects_nan_and_inf(impl: str, bad: float) -> None:
    logits, targets = random_logits(3, 500, torch.float32)
    logits[1, 250] = bad
    with pytest.raises(ValueError, match=r"NaN or \+inf"):
        implementation("token_stats", impl)(logits, targets)


@pytest.mark.parametrize("impl", ("torch", *IMPLS))
def test_token_stats_unchecked_marks_nan_and_inf_rows_with_nan_entropy(impl: str) -> None:
    """check=False never raises (no device read-back): a NaN/+inf row gets NaN entropy and log-prob, the
    others are exact. Scoring checks the entropies once per batch."""
    logits, targets = random_logits(4, 700, torch.float32)
    logits[1, 350] = math.nan
    logits[2, 3] = math.inf
    logp, entropy, grad = implementation("token_stats", impl)(logits, targets, check=False)
    assert torch.isnan(entropy[1:3]).all() and torch.isnan(logp[1:3]).all()
    ok = [0, 3]
    want = token_stats_reference(logits[ok], targets[ok])
    for got, w in zip((logp[ok], entropy[ok], grad[ok]), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ("torch", *IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_stats_overwrite_gives_the_same_stats(impl: str, dtype: torch.dtype) -> None:
    """overwrite=True may put the gradient in the logits' memory: same results as a fresh buffer."""
    logits, targets = random_logits(5, 1500, dtype, seed=4)
    want = token_stats_reference(logits.clone(), targets)
    got = implementation("token_stats", impl)(logits, targets, overwrite=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance(dtype))


@pytest.mark.parametrize("impl", ("torch", *IMPLS))
def test_token_stats_rejects_target_outside_vocabulary(impl: str) -> None:
    logits, _ = random_logits(2, 50, torch.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        implementation("token_stats", impl)(logits, torch.tensor([3, 50]))


# ---- operation 2: head-gradient ℓ1 ----


def head_inputs(
    lengths: list[int], v: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """nll_grad and w_t/T as the scorer makes them (from random logits), hidden in ``dtype``, offsets."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    _, entropy, nll_grad = token_stats_reference(logits.to(dtype), torch.randint(0, v, (n,), generator=g))
    lens = torch.tensor(lengths)
    row_scale = entropy / torch.repeat_interleave(lens, lens).clamp(min=1).to(entropy.dtype)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return nll_grad, hidden, row_scale, offsets


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=rel, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lengths,v,d",
    [([1], 300, 64), ([1, 0, 7, 12], 300, 100), ([37], 150, 64), ([20], 33, 4096)],
    ids=["T1", "ragged", "T37", "d4096"],
)
def test_head_grad_l1_matches_reference(impl: str, dtype: torch.dtype, lengths: list[int], v: int, d: int) -> None:
    args = head_inputs(lengths, v, d, dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert_rel(implementation("head_grad_l1", impl)(*args), head_grad_l1_reference(*args), rel)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_grad_l1_two_scales_in_one_call(impl: str, dtype: torch.dtype) -> None:
    """ParaGrad's and ExGrad's scales stacked [2, N] give [2, B]: each row as its own reference call."""
    nll_grad, hidden, row_scale, offsets = head_inputs([3, 0, 17], 300, 100, dtype, seed=5)
    inv_len = torch.rand(row_scale.shape, generator=torch.Generator().manual_seed(1), dtype=row_scale.dtype)
    got = implementation("head_grad_l1", impl)(nll_grad, hidden, torch.stack([row_scale, inv_len]), offsets)
    want = torch.stack([head_grad_l1_reference(nll_grad, hidden, c, offsets) for c in (row_scale, inv_len)])
    assert_rel(got, want, 1e-12 if dtype == torch.float64 else 1e-5)


def test_head_grad_l1_triton_default_blocks() -> None:
    args = head_inputs([5, 40], 200, 130, torch.float32)
    assert_rel(select_kernels("triton").head_grad_l1(*args), head_grad_l1_reference(*args), 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_grad_l1_single_token_is_product_of_l1_norms(impl: str) -> None:
    """For T=1 the gradient is the outer product c·g hᵀ, so its ℓ1 is ‖c·g‖₁·‖h‖₁."""
    nll_grad, hidden, row_scale, offsets = head_inputs([1], 300, 64, torch.float32)
    v, d = nll_grad.shape[1], hidden.shape[1]
    expect = (row_scale.double() * nll_grad.double()).abs().sum() * hidden.double().abs().sum() / (v * d)
    got = implementation("head_grad_l1", impl)(nll_grad, hidden, row_scale, offsets)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_grad_l1_within_frobenius_bounds(impl: str) -> None:
    """‖G‖_F ≤ ‖G‖₁ ≤ √(Vd)·‖G‖_F, with ‖G‖_F from its Gram form √⟨ggᵀ, hhᵀ⟩
    (no V×d matrix)."""
    nll_grad, hidden, row_scale, offsets = head_inputs([9], 300, 64, torch.float32)
    v, d = nll_grad.shape[1], hidden.shape[1]
    g = row_scale.double()[:, None] * nll_grad.double()
    h = hidden.double()
    frob = ((g @ g.T) * (h @ h.T)).sum().sqrt().item()
    l1 = implementation("head_grad_l1", impl)(nll_grad, hidden, row_scale, offsets).item() * v * d
    assert frob * (1 - 1e-6) <= l1 <= math.sqrt(v * d) * frob


# ---- operation 3: band ℓ1 ----


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (5, 3, 77), (16, 2, 1000)])
def test_band_l1_matches_reference(impl: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    grads = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    assert_rel(implementation("band_l1", impl)(grads), band_l1_reference(grads), rel)


@pytest.mark.parametrize("impl", IMPLS)
def test_band_l1_of_strided_view(impl: str) -> None:
    grads = torch.randn(4, 6, 40).transpose(0, 1)[:, ::2]  # [6, 2, 40], not contiguous
    assert_rel(implementation("band_l1", impl)(grads), band_l1_reference(grads), 1e-6)
