"""The vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``, name ``semgrad``).

vLLM loads it in the API server when ``VLLM_PLUGINS`` names it. It replaces the
completion routes with the scored ones and, at start-up, builds the scorer in
the worker (failing start-up with a clear message when the model cannot be
scored) and the batcher that feeds it.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State

from ..errors import SemgradError
from .batcher import Pair, ScoringBatcher
from .config import PLUGIN_NAME, TEST_FAULTS_ENV, WORKER_EXTENSION, ScoringSettings, log
from .routes import router


class SemgradPlugin:
    """Adds SemGrad scores to every completion choice of vLLM's OpenAI-compatible server."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:  # vLLM's render-only server has no engine to score with
            return
        settings = ScoringSettings.from_env()
        try:
            infos = await engine_client.collective_rpc("semgrad_setup", args=(settings.profile,))
        except Exception as exc:
            if "semgrad_setup" in str(exc) and "attribute" in str(exc):
                raise SemgradError(
                    f"the SemGrad plugin needs its worker extension: start vLLM with --worker-extension-cls {WORKER_EXTENSION}"
                ) from None
            raise SemgradError(f"SemGrad scoring cannot start: {exc}") from None
        if len(infos) != 1:
            raise SemgradError("SemGrad scoring runs in one vLLM worker: tensor-, pipeline- and data-parallel sizes must be 1")
        log.info("SemGrad scoring ready: %s", infos[0])
        if settings.test_faults:
            log.warning("%s=1: the scoring fault test hook is on; do not use this server in production", TEST_FAULTS_ENV)

        async def rpc(pairs: list[Pair], fault: bool) -> list[dict[str, Any]]:
            (results,) = await engine_client.collective_rpc("semgrad_score", args=(pairs, fault))
            return results

        state.semgrad_batcher = ScoringBatcher(rpc, settings.max_batch, settings.max_wait_ms)
        state.semgrad_test_faults = settings.test_faults
