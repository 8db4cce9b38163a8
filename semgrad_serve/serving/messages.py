"""What crosses the process line between the API server and the worker (torch-free, so the API server can import it)."""

from __future__ import annotations

from dataclasses import dataclass

KV_PARAM = "semgrad_capture"  # the capture key's name in a request's kv_transfer_params
LIVE_PARAM = "semgrad_live"  # true in a scored request's kv_transfer_params: its claims are scored while it runs


@dataclass(frozen=True)
class StoreStats:
    """What a worker's capture store holds (sent to the API server for ``/v1/semgrad/info``)."""

    captures: int  # entries, with keys/values or without
    bytes: int  # of keys/values, band inputs and logits held
    budget_bytes: int
    done_keys: int  # dropped keys remembered, whose late captures are refused
