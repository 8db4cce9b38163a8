"""A vLLM KV connector that hands scored requests' prompt keys/values to SemGrad scoring.

Enabled by ``semgrad-serve serve`` (``--kv-transfer-config`` with this module as
``kv_connector_module_path``, role ``kv_both``). Only requests whose
``kv_transfer_params`` carry a capture key the API server minted (it sets one when it
will score the answer; ``capture_keys.py``) are touched: any other value counts as
no key, so neither a client nor another front end can make the worker record or hold anything.

- scheduler side: when such a request is given blocks (first scheduled, or resumed), the worker is told to
  record its band inputs and logits (``step_recorder.py``); when it finishes normally, ``request_finished``
  keeps its blocks (returns True) and passes its block table to the worker in
  the next step's metadata (aborted ones too: a stop string ends a request by aborting it); unscored and
  failed requests are freed as usual;
- worker side: before that step's forward, the blocks holding the prompt up to
  t* (of the band's layers only, where its inputs were recorded from t* on) are
  copied into the worker process's ``CaptureStore`` (unpacked later, on
  the scoring thread), and the request is
  reported finished in the same step, so vLLM frees its blocks one step after
  the request ended, whatever happens to scoring later.

A cache whose layout is not known, or that holds quantized keys/values (an FP8
cache: they would move the scores), is never read: those answers are scored by
recomputing the prompt, and a warning says so once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.v1.request import RequestStatus

from ..capture_keys import secret_from_env, verify
from ..messages import KV_PARAM, LIVE_PARAM
from ..settings import log
from .captures import STORE
from .kv_layout import copy_blocks, layout_for, quantized_cache, unpack
from .live_scoring import LivePrompts
from .step_recorder import RECORDER, Recorded

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Aborted included: vLLM's API server ends a request on a stop string by aborting it in the engine.
CAPTURED_ENDINGS = (
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED,
    RequestStatus.FINISHED_REPETITION,
    RequestStatus.FINISHED_ABORTED,
)


def capture_key(kv_transfer_params: Any, secret: bytes | None) -> str | None:
    """The request's capture key where the API server minted it under ``secret``, else None."""
    key = kv_transfer_params.get(KV_PARAM) if isinstance(kv_transfer_params, dict) else None
    return key if verify(secret, key) else None


@dataclass(frozen=True)
class CaptureOrder:
    request_id: str
    key: str
    prompt_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    computed: int  # positions whose keys/values the blocks hold
    output_ids: tuple[int, ...] = ()


@dataclass
class CaptureMetadata(KVConnectorMetadata):
    orders: list[CaptureOrder] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)  # scored requests to record the band inputs of
    forget: list[str] = field(default_factory=list)  # scored requests that ended without a capture
    live: list[tuple[str, str]] = field(default_factory=list)  # (request, capture key) whose claims are scored live


class SemgradCaptureConnector(KVConnectorBase_V1):
    """Keeps a finished scored request's blocks for one step and copies its prompt keys/values out."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._orders: list[CaptureOrder] = []  # scheduler side: finished requests not yet sent to the worker
        self._watch: list[str] = []  # scheduler side: scored requests given blocks since the last step
        self._forget: list[str] = []
        self._live: list[tuple[str, str]] = []  # scheduler side: live-claims requests given blocks since the last step
        self._live_prompts = LivePrompts()  # worker side: live-claims requests whose prompt is not copied yet
        self._release: set[str] = set()  # worker side: copied requests whose blocks vLLM may free
        self._caches: list[torch.Tensor] = []  # worker side: per-layer caches, in layer order
        self._layout: str | None = None
        self._layout_known = False
        self._unreadable: str | None = None  # why the caches are not read (quantized), found at registration
        self._secret = secret_from_env()  # scheduler side: the secret capture keys are minted under
        if role == KVConnectorRole.SCHEDULER and self._secret is None:
            log.warning("SemGrad: no capture secret in the environment; no prompt keys/values are captured")

    # -- scheduler side ----------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # loads nothing

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        key = capture_key(request.kv_transfer_params, self._secret)
        if key is not None:
            self._watch.append(request.request_id)
            if request.kv_transfer_params.get(LIVE_PARAM) is True:
                self._live.append((request.request_id, key))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        key = capture_key(request.kv_transfer_params, self._secret)
        if key is None:
            return False, None
        if request.status not in CAPTURED_ENDINGS or request.prompt_token_ids is None:
            self._forget.append(request.request_id)
            return False, None
        order = CaptureOrder(
            request.request_id,
            key,
            tuple(request.prompt_token_ids),
            tuple(block_ids),
            request.num_computed_tokens,
            tuple(request.output_token_ids),
        )
        self._orders.append(order)
        return True, None

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = CaptureMetadata(self._orders, self._watch, self._forget, self._live)
        self._orders, self._watch, self._forget, self._live = [], [], [], []
        return meta

    # -- worker side -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        self._caches = [kv_caches[name] for name in sorted(kv_caches, key=extract_layer_index)]
        self._unreadable = quantized_cache(self._caches)
        if self._unreadable is not None:
            log.warning(
                "SemGrad: %s, which would change the scores; answers are scored by recomputing the prompt "
                "(scores unchanged)",
                self._unreadable,
            )

    def _cache_layout(self) -> str | None:
        """The layout of the registered caches, found once from the attention layers."""
        if not self._layout_known:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention import Attention

            layers = list(get_layers_from_vllm_config(self._vllm_config, Attention).values())
            backend = layers[0].attn_backend.get_name() if layers else ""
            self._layout = layout_for(backend, getattr(layers[0], "isa", None) if layers else None)
            self._layout_known = True
            if self._layout is None:
                log.warning(
                    "SemGrad: the KV cache layout of %s is not known; answers are scored by recomputing the prompt",
                    backend,
                )
        return self._layout

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Copy out the prompts of this step's finished requests, and of live-claims requests whose prompt is
        computed, before the forward runs; start or stop recording the band inputs of scored requests."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, CaptureMetadata)
        for request_id in connector_metadata.watch:
            RECORDER.watch(request_id)
        for request_id, key in connector_metadata.live:
            RECORDER.watch(request_id, key)
            self._live_prompts.follow(request_id, key)
        for request_id in connector_metadata.forget:
            RECORDER.forget(request_id)
            self._live_prompts.forget(request_id)
        for order in connector_metadata.orders:
            layout = self._cache_layout() if self._caches and self._unreadable is None else None
            read = None if layout is None else (lambda n, first, o=order: self._copy(o, n, first))
            if read is None:  # what was recorded for it cannot be used without the prompt's keys/values
                RECORDER.forget(order.request_id)
            kept = STORE.add(
                order.key,
                order.prompt_ids,
                read,
                lambda raw, n, lay=layout: unpack(raw, lay, n),
                lambda n, o=order: self._band_inputs(o, n),
                order.output_ids,
            )
            if not kept:  # its request is done with scoring already: nothing of it is kept
                RECORDER.forget(order.request_id)
            self._live_prompts.forget(order.request_id)
            self._release.add(order.request_id)
        if len(self._live_prompts):
            layout = self._cache_layout() if self._caches and self._unreadable is None else None
            read = None if layout is None else (lambda blocks, n, first: copy_blocks(self._caches[first:], blocks, n))
            self._live_prompts.copy_computed(RECORDER, STORE, read, lambda raw, n, lay=layout: unpack(raw, lay, n))

    @staticmethod
    def _band_inputs(order: CaptureOrder, t_star: int) -> tuple[int, Recorded] | None:
        """The band's first layer and what was recorded from t* on, where every band input was."""
        recorded = RECORDER.take(order.request_id, t_star, order.computed)
        return None if recorded is None or RECORDER.first_layer is None else (RECORDER.first_layer, recorded)

    def _copy(self, order: CaptureOrder, n: int, first_layer: int) -> list[torch.Tensor]:
        if n > order.computed:
            raise ValueError(f"the request ended after computing {order.computed} of the {n} positions before t*")
        return copy_blocks(self._caches[first_layer:], order.block_ids, n)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        released, self._release = self._release, set()
        return released or None, None
