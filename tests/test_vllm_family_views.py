"""``from_vllm_model`` on the modules vLLM actually loads, for every new family: a random Gemma-3, Phi-3, Qwen3-MoE
and Mixtral checkpoint is loaded by vLLM's CPU engine (in a child process of its own, as vLLM wants its engine
under ``__main__``), viewed as ``DecoderWeights`` and scored; the scores equal the offline scorer's over
transformers' model of the same checkpoint (float32). The MoE experts are read from vLLM's CPU packing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semgrad_serve.testing.family_checkpoints import FAMILIES, save_family_checkpoint

pytestmark = pytest.mark.slow  # a vLLM engine per family

CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from semgrad_serve.serving.worker.vllm_weights import keep_dense_cpu_weights, from_vllm_model
keep_dense_cpu_weights()
from vllm import LLM
from semgrad_serve.scoring.scorer import Scorer

if __name__ == "__main__":
    model_dir = sys.argv[1]
    offline = Scorer.from_pretrained(model_dir)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=1024)
    model = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
    weights = from_vllm_model(model, llm.llm_engine.model_config.hf_config)
    served = Scorer(weights, offline.tokenizer, offline.profile, exgrad=False)
    pairs = [(offline.prompt_ids([{"role": "user", "content": "word " * n + "?"}]),
              [(n * 37 + k) % 49152 for k in range(7)])
             for n in (5, 40, 70)]
    out = {"packed": any(l.moe.gate_up.dim() == 4 for l in weights.layers if l.moe is not None),
           "served": [served.report(r) for r in served.score(pairs)],
           "offline": [offline.report(r) for r in offline.score(pairs)]}
    print("RESULT " + json.dumps(out, default=str))
"""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_modules_score_as_transformers(family: str, tmp_path: Path) -> None:
    model_dir = save_family_checkpoint(family, tmp_path / family)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    script = tmp_path / "view.py"
    script.write_text(CHILD)
    run = subprocess.run(
        [sys.executable, str(script), str(model_dir)], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["packed"] == (family in ("qwen3_moe", "mixtral"))  # vLLM's CPU experts repack
    for served, offline in zip(result["served"], result["offline"], strict=True):
        for key in ("semgrad", "paragrad", "hybridgrad", "mean_entropy"):
            assert served[key] == pytest.approx(offline[key], rel=1e-4), key
