"""The kernels wired into the scorer: same scores with every choice, and how the choice is made."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import pytest
import torch

import semgrad_serve.kernels as kernels
from semgrad_serve.errors import SemgradError
from semgrad_serve.kernels import ENV_VAR, kernel_choices, select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem

from tiny_models import random_items, tiny_model


@pytest.fixture(autouse=True)
def no_kernels_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests name the kernels they mean: a ``SEMGRAD_KERNELS`` set where they run must not choose for them."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_every_choice_gives_the_same_scores(dtype: torch.dtype, rel: float) -> None:
    weights = from_hf_model(tiny_model("llama3-untied", dtype))
    band = range(weights.n_layers - weights.n_layers // 2, weights.n_layers)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(5, seed=4)]
    torch_results = score_batch(weights, items, band, select_kernels("torch"))
    for choice in ("triton", "native"):
        for ours, ref in zip(score_batch(weights, items, band, select_kernels(choice)), torch_results):
            for key, value in ref.scores().items():
                assert ours.scores()[key] == pytest.approx(value, rel=rel, abs=0), (choice, key)
            assert ours.token_logprobs == pytest.approx(ref.token_logprobs, rel=rel, abs=1e-7)
            assert ours.token_entropies == pytest.approx(ref.token_entropies, rel=rel, abs=1e-7)


@pytest.mark.parametrize("choice", ["torch", "triton", "native"])
def test_nan_logits_fail_the_batch_with_the_clear_error(choice: str) -> None:
    """The scorer runs token_stats unchecked and checks the batch's entropies once, at its one read-back."""
    weights = from_hf_model(tiny_model("llama3-untied", torch.float32))
    weights.head[7, 3] = float("nan")  # every answer row's logit for token 7 becomes NaN
    band = range(weights.n_layers - weights.n_layers // 2, weights.n_layers)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(2, seed=6)]
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf"):
        score_batch(weights, items, band, select_kernels(choice))


def test_choices_and_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_choices() == ("auto", "torch", "triton", "native")
    monkeypatch.setattr(kernels, "native_loaded", lambda: True)  # what a build gives, whether or not this one has it
    monkeypatch.setattr(kernels, "native_available", lambda device_type: True)
    assert select_kernels().name == "native"  # auto on CPU: the dispatch table's first choice for every op
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_kernels().name == "torch"
    assert select_kernels("triton").name == "triton"  # an explicit choice wins over the variable
    with pytest.raises(SemgradError, match="unknown kernels 'cuda'"):
        select_kernels("cuda")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_follows_the_dispatch_table_per_op(monkeypatch: pytest.MonkeyPatch, device_type: str) -> None:
    """Per op, the first available implementation of AUTO's list; each one missing in turn moves every
    op that preferred it to its next choice, down to the torch reference."""
    available = {"triton": True, "native": True}
    monkeypatch.setattr(kernels, "triton_available", lambda device_type: available["triton"])
    monkeypatch.setattr(kernels, "native_available", lambda device_type: available["native"])
    monkeypatch.setattr(kernels, "native_loaded", lambda: available["native"])
    for missing in ([], ["native"], ["triton"], ["triton", "native"]):
        for name in available:
            available[name] = name not in missing
        chosen = select_kernels("auto", device_type)
        for op in kernels.OPS:
            order = [n for n in kernels.AUTO[device_type][op][0] if available.get(n, True)]
            want = getattr(select_kernels(order[0], device_type), op)
            assert getattr(chosen, op) is want, (missing, op)
    assert select_kernels("auto", "cuda").name == "torch"  # every op falls back to the reference


def test_unavailable_choices_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda device_type: False)
    with pytest.raises(SemgradError, match="TRITON_INTERPRET=1"):
        select_kernels("triton")
    monkeypatch.setattr(kernels, "native_loaded", lambda: False)
    with pytest.raises(SemgradError, match="not built"):
        select_kernels("native")
    assert select_kernels("auto").name == "torch"
    monkeypatch.setattr(kernels, "native_loaded", lambda: True)
    with pytest.raises(SemgradError, match="without cuda support"):
        select_kernels("native", "cuda")
