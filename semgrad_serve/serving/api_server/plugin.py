"""The vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``, name ``semgrad``).

vLLM loads it in the API server when ``VLLM_PLUGINS`` names it. It replaces the
completion, responses and ``/invocations`` routes with the scored ones, marks vLLM's other generating routes
as not scored (``unscored_routes.py``), adds the page at ``/semgrad``
(``page_routes.py``) and, at start-up, builds the scorer and
its scoring service in the worker (failing start-up with a clear message when
the model or the parallel layout cannot be scored) and connects to it.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State

from ...errors import SemgradError
from ..capture_keys import SECRET_ENV, fingerprint, secret_from_env
from ..messages import SETUP_REFUSED
from ..settings import (
    API_SERVERS_REFUSED,
    CAPTURE_KV_TRANSFER_CONFIG,
    PAGE_PATH,
    PLUGIN_NAME,
    WORKER_EXTENSION,
    ScoringSettings,
    log,
    server_url,
)
from .chat_routes import router
from .data_parallel import EngineRouter, connect, engines_info, setup_engines
from .invocations_route import api_tokens, router as invocations_router
from .page_routes import page_router
from .recent_answers import RecentAnswers
from .request_guard import RequestGuard
from .responses_route import router as responses_router
from .unscored_routes import note_unscored_routes


class SemgradPlugin:
    """Adds SemGrad scores to every completion choice of vLLM's OpenAI-compatible server."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.add_middleware(RequestGuard)  # every route: no client-set capture key reaches the engine
        app.include_router(router)
        app.include_router(responses_router)
        app.include_router(invocations_router)
        app.include_router(page_router)
        note_unscored_routes(app)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        from vllm import envs

        state.semgrad_api_tokens = api_tokens(getattr(args, "api_key", None), envs.VLLM_API_KEY)  # for /invocations
        if engine_client is None:  # vLLM's render-only server has no engine to score with
            return
        settings = ScoringSettings.from_env()
        if (getattr(args, "api_server_count", None) or 1) > 1:
            raise SemgradError(API_SERVERS_REFUSED)
        api_cores = sorted(os.sched_getaffinity(0))
        claims = (settings.max_claims, settings.claims_per_pass, settings.claim_memory_mib << 20)
        setup_args = (settings.profile, settings.max_batch, api_cores, *claims)
        extension = getattr(args, "worker_extension_cls", None)
        if extension is not None and extension != WORKER_EXTENSION:
            needed = f"--worker-extension-cls {WORKER_EXTENSION}"
            raise SemgradError(f"the SemGrad plugin needs its worker extension: start vLLM with {needed}")
        infos = await setup_engines(engine_client, setup_args, getattr(args, "data_parallel_size", None) or 1)
        refused = next((info[SETUP_REFUSED] for info in infos if SETUP_REFUSED in info), None)
        if refused is not None:
            raise SemgradError(f"SemGrad scoring cannot start: {refused}")
        # per engine, rank 0's, whose scoring service takes the answers (under tensor parallelism, for every rank)
        connector, secret = infos[0]["capture"], secret_from_env()
        for info in infos:
            check = info.pop("capture_secret_check", None)
            if info["capture"] and (secret is None or check is None or fingerprint(secret) != check):
                log.warning(
                    "SemGrad: %s is not set, or not the same here and in vLLM's engine: no prompt keys/values "
                    "are captured and every prompt is recomputed for scoring (semgrad-serve serve sets it)",
                    SECRET_ENV,
                )
                info["capture"] = info["records"] = False
        state.semgrad_engines = EngineRouter(connect(infos, secret))
        state.semgrad_info = info = engines_info(infos)
        state.semgrad_recent = RecentAnswers(settings.recent)
        log.info("SemGrad scoring ready: %s", info)
        url = server_url(getattr(args, "host", None), getattr(args, "port", 8000))
        log.info("SemGrad page (answers, flags, token heat, recent answers): %s%s", url, PAGE_PATH)
        if not connector:
            log.warning(
                "SemGrad: no capture connector (start vLLM with --kv-transfer-config '%s'); every prompt is "
                "recomputed for scoring",
                CAPTURE_KV_TRANSFER_CONFIG,
            )
        elif info["capture"] and not info["records"]:
            log.warning(
                "SemGrad: the model is compiled or speculative decoding is on, so the band's inputs and the logits "
                "are not kept while generating (--enforce-eager keeps them); scoring reruns the layers below the band "
                "and the head's product"
            )
