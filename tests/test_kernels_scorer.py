"""The kernels wired into the scorer: same scores with every choice, and how the choice is made."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

import semgrad_serve.kernels as kernels  # noqa: E402
from semgrad_serve.scoring.items import PreparedItem  # noqa: E402
from semgrad_serve.errors import SemgradError  # noqa: E402
from semgrad_serve.kernels import ENV_VAR, kernel_choices, select_kernels  # noqa: E402
from semgrad_serve.scoring.batch import score_batch  # noqa: E402
from semgrad_serve.model.weights import from_hf_model  # noqa: E402

from tiny_models import random_items, tiny_model  # noqa: E402


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


def test_choices_and_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_choices() == ("auto", "torch", "triton", "native")
    assert select_kernels().name == "native"  # auto on CPU, when built
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_kernels().name == "torch"
    assert select_kernels("triton").name == "triton"  # an explicit choice wins over the variable
    with pytest.raises(SemgradError, match="unknown kernels 'cuda'"):
        select_kernels("cuda")


def test_auto_on_cuda_prefers_triton_then_native(monkeypatch: pytest.MonkeyPatch) -> None:
    available = {"triton": True, "native": True}
    monkeypatch.setattr(kernels, "triton_available", lambda device_type: available["triton"])
    monkeypatch.setattr(kernels, "native_available", lambda device_type: available["native"])
    assert select_kernels("auto", "cuda").name == "triton"
    available["triton"] = False
    assert select_kernels("auto", "cuda").name == "native"
    available["native"] = False
    assert select_kernels("auto", "cuda").name == "torch"


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
