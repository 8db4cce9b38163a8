"""The vLLM model runner SemGrad scoring runs on, checked once at start-up in the worker.

The plugin was built and tested on vLLM's V1 model runner (``vllm/v1/worker/gpu_model_runner.py``, which the
CPU runner extends): the step recorder reads its per-step ``input_batch``, ``query_start_loc`` and
``requests``. vLLM 0.32's Model Runner V2 (``vllm/v1/worker/gpu/``), its default on GPUs, keeps none of those
fields, so ``semgrad-serve serve`` selects V1 (``VLLM_USE_V2_MODEL_RUNNER=0`` unless the user set it) and the
worker extension refuses any other runner in one line instead of failing mid-step. The audit behind this is
in docs/gpu.md.
"""

from __future__ import annotations

from typing import Any

from ...errors import SemgradError

V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"  # vLLM's switch; "0" selects the V1 model runner
# What the worker extension and the step recorder read from vLLM's V1 model runner.
RUNNER_FIELDS = ("model", "input_batch", "query_start_loc", "requests")
V2_REFUSED = (
    "SemGrad scoring runs on vLLM's V1 model runner, and this server runs Model Runner V2: start it with "
    f"{V2_RUNNER_ENV}=0 (semgrad-serve serve sets it; HiSparse attention and watermarking force V2 "
    "and cannot be scored)"
)


def check_runner(vllm_config: Any, model_runner: Any) -> None:
    """Raise a one-line ``SemgradError`` unless ``model_runner`` is vLLM's V1 model runner (or one extending it)."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise SemgradError(V2_REFUSED)
    missing = [name for name in RUNNER_FIELDS if not hasattr(model_runner, name)]
    if missing:
        raise SemgradError(
            f"SemGrad scoring runs on vLLM's V1 model runner; this worker's {type(model_runner).__name__} "
            f"has no {', '.join(missing)}"
        )
