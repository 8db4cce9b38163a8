"""benchmarks/gpu_decode.py at tiny size on the CPU, so the GPU harness cannot rot: its decode loop generates what
transformers' greedy generation does, and its scores over keys/values copied out of its caches equal the scorer's
recompute of the prompt."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.scoring.batch import score_batch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_decode_with_scoring_beside_it() -> None:
    harness = load_harness()
    text, scoring, w = harness.main(["--tiny", "--steps", "24"])
    assert "Decode on/off" in text and "| scoring on |" in text and "TFLOP/s" in text
    done = scoring.done
    assert len(done) == 12  # 4 slots × 24 steps / 8-token answers, every one scored (the backlog after the run too)

    model = harness.hf_model(harness.TINY, torch.float32, "cpu")  # the same seed: the same random weights
    complete = [f for f, _ in done if f.complete]
    assert len(complete) >= 8
    for finished in complete:
        prompt = torch.tensor([finished.item.prompt_ids])
        generated = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert generated[0, prompt.shape[1] :].tolist() == list(finished.item.answer_ids)

    items = [f.item for f, _ in done]
    recomputed = score_batch(w, items, range(2, 4), select_kernels("auto", "cpu"), exgrad=False)
    for (_, served), offline in zip(done, recomputed):
        for name in ("semgrad", "paragrad", "hybridgrad"):
            assert math.isclose(getattr(served, name), getattr(offline, name), rel_tol=1e-4), name
