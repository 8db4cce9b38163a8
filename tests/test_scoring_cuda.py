"""Scoring on a CUDA device: exact against the naive CPU computation, and no device read-back but one.

Skipped without CUDA (CI has none); ``benchmarks/gpu.sh`` runs it on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.testing.naive import naive_scores

from test_claims import assert_claims_match_naive, claimed_items
from tiny_models import FAMILIES, random_items, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SCORES = ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy")


def deeper_half(n_layers: int) -> range:
    return range(n_layers - n_layers // 2, n_layers)


@pytest.mark.parametrize("choice", ["torch", "triton", "native"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_on_cuda_matches_naive(family: str, choice: str) -> None:
    """Against the naive computation on the same device: the models' rotary angles are float32 (as in
    transformers), and float32 cos/sin differ between CPU and GPU libraries by an ulp."""
    model = tiny_model(family).cuda()
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    triples = random_items(5, seed=2)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    for (prompt, answer, t_star), ours in zip(
        triples, score_batch(weights, items, band, select_kernels(choice, "cuda"))
    ):
        naive = naive_scores(model, prompt, answer, t_star, band)
        for key in SCORES:
            assert ours.scores()[key] == pytest.approx(naive[key], rel=1e-9, abs=0), key


@pytest.mark.parametrize("choice", ["torch", "triton", "native"])
def test_claims_on_cuda_match_naive(choice: str) -> None:
    model = tiny_model("qwen2-window-untied").cuda()
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = claimed_items(seed=2)
    assert_claims_match_naive(
        model, items, score_batch(weights, items, band, select_kernels(choice, "cuda")), band, rel=1e-9
    )


@pytest.mark.parametrize("choice", ["auto", "triton", "native"])
def test_float32_on_cuda_matches_cpu(choice: str) -> None:
    """float32 within the SPEC's 1e-4 of the CPU reference kernels (TF32 products in the head's ℓ1 included)."""
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(6, seed=3)]
    cpu = from_hf_model(tiny_model("llama3-untied", torch.float32))
    band = deeper_half(cpu.n_layers)
    want = score_batch(cpu, items, band, select_kernels("torch"))
    gpu = from_hf_model(tiny_model("llama3-untied", torch.float32).cuda())
    for ours, ref in zip(score_batch(gpu, items, band, select_kernels(choice, "cuda")), want):
        for key, value in ref.scores().items():
            assert ours.scores()[key] == pytest.approx(value, rel=1e-4, abs=0), key


@pytest.mark.parametrize("claims", [False, True])
@pytest.mark.parametrize("choice", ["auto", "triton", "native"])  # the materializing reference is not the hot path
def test_one_device_read_back_per_batch(choice: str, claims: bool) -> None:
    """After a warm-up (Triton compiles and autotunes there), a batch synchronizes with the device once:
    the read-back of its scores, claims or not. torch's sync debug mode reports every synchronizing call."""
    weights = from_hf_model(tiny_model("llama3-untied", torch.float32).cuda())
    band = deeper_half(weights.n_layers)
    items = (
        claimed_items(seed=5, n=4)
        if claims
        else [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(4, seed=5)]
    )
    kernels = select_kernels(choice, "cuda")
    score_batch(weights, items, band, kernels)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            score_batch(weights, items, band, kernels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
