"""Only capture keys the API server minted make the worker hold anything: the keys, the connector's check, the
store's refusal of keys already dropped, and the API server's refusal of client-set keys on every route."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from types import SimpleNamespace

import pytest
import torch
from test_kv_capture import SECRET, finished, make_connector, minted
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.request import RequestStatus

from semgrad_serve.serving import capture_keys
from semgrad_serve.serving.api_server.request_guard import RequestGuard, refusal
from semgrad_serve.serving.messages import KV_PARAM, StoreStats
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.kv_layout import TOKEN_MAJOR


def test_a_key_verifies_only_under_the_secret_it_was_minted_with() -> None:
    key = capture_keys.mint(SECRET)
    nonce, tag = key[:32], key[32:]
    assert tag == hmac.new(SECRET, nonce.encode(), hashlib.sha256).hexdigest()[:32]  # HMAC-SHA256 of the nonce
    assert capture_keys.verify(SECRET, key) and capture_keys.mint(SECRET) != key
    flipped = key[:-1] + ("0" if key[-1] != "0" else "1")
    for forged in (flipped, key[:-2], key + "00", capture_keys.mint(b"another secret"), "foreign-1", None, 7, ["x"]):
        assert not capture_keys.verify(SECRET, forged), forged
    assert not capture_keys.verify(None, key)  # no secret: nothing is trusted
    assert capture_keys.fingerprint(SECRET) == capture_keys.fingerprint(SECRET) != capture_keys.fingerprint(b"other")
    assert capture_keys.secret_from_env({capture_keys.SECRET_ENV: "abc"}) == b"abc"
    assert (
        capture_keys.secret_from_env({capture_keys.SECRET_ENV: ""}) is None and capture_keys.secret_from_env({}) is None
    )


def test_serve_gives_vllm_a_fresh_secret_or_keeps_the_users(monkeypatch) -> None:
    from semgrad_serve.commands.serve import server_env
    from semgrad_serve.serving.settings import ScoringSettings

    monkeypatch.delenv(capture_keys.SECRET_ENV, raising=False)
    first, second = (server_env(ScoringSettings())[capture_keys.SECRET_ENV] for _ in range(2))
    assert len(first) == 64 and first != second
    monkeypatch.setenv(capture_keys.SECRET_ENV, "shared-by-two-front-ends")
    assert server_env(ScoringSettings())[capture_keys.SECRET_ENV] == "shared-by-two-front-ends"


def forged_request(rid: str, status: RequestStatus, params: object) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=rid,
        status=status,
        kv_transfer_params=params,
        prompt_token_ids=[1, 2, 3],
        num_computed_tokens=3,
        output_token_ids=[4],
    )


def test_the_connector_watches_and_holds_nothing_for_a_key_it_did_not_mint() -> None:
    """Scheduler side: requests whose key is not one minted under the engine's secret (written by hand, minted
    under another secret, tampered with, not a string, or params that are not an object) are neither recorded
    nor held; the minted one is. Without a secret not even a minted key is trusted."""
    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    key = minted("scored")
    forged = [
        {KV_PARAM: "foreign-1"},
        {KV_PARAM: capture_keys.mint(b"another secret")},
        {KV_PARAM: key[:-1] + ("0" if key[-1] != "0" else "1")},
        {KV_PARAM: ["x"]},
        "semgrad_capture",  # what vllm_xargs could put in kv_transfer_params's place
        [KV_PARAM],
    ]
    for i, params in enumerate(forged):
        scheduler.update_state_after_alloc(forged_request(f"f{i}", RequestStatus.RUNNING, params), None, 0)
        assert scheduler.request_finished(forged_request(f"f{i}", RequestStatus.FINISHED_STOPPED, params), [0]) == (
            False,
            None,
        )
    scheduler.update_state_after_alloc(finished("s", RequestStatus.RUNNING, "scored", [1, 2, 3]), None, 0)
    assert scheduler.request_finished(finished("s", RequestStatus.FINISHED_STOPPED, "scored", [1, 2, 3]), [0]) == (
        True,
        None,
    )
    meta = scheduler.build_connector_meta(SimpleNamespace())
    assert meta.watch == ["s"] and [o.request_id for o in meta.orders] == ["s"] and meta.orders[0].key == key

    no_secret = make_connector(KVConnectorRole.SCHEDULER, secret=None)
    no_secret.update_state_after_alloc(finished("s", RequestStatus.RUNNING, "scored", [1, 2, 3]), None, 0)
    assert no_secret.request_finished(finished("s", RequestStatus.FINISHED_STOPPED, "scored", [1, 2, 3]), [0]) == (
        False,
        None,
    )
    assert no_secret.build_connector_meta(SimpleNamespace()) == type(meta)()


def test_a_capture_whose_key_was_dropped_first_is_not_taken(monkeypatch) -> None:
    """The API server dropped the key (its client left) before the request's last step: the connector copies
    nothing, forgets what was recorded and still releases the blocks; the store stays empty, its figures say
    so, and a key dropped long ago is forgotten (bounded in age)."""
    from semgrad_serve.serving.worker import capture_connector, step_recorder

    store = CaptureStore(ttl_s=60)
    store.prefix_length = lambda ids: 2
    recorder = step_recorder.StepRecorder()
    recorder.first_layer = 0  # as installed
    monkeypatch.setattr(capture_connector, "STORE", store)
    monkeypatch.setattr(capture_connector, "RECORDER", recorder)
    scheduler, worker = make_connector(KVConnectorRole.SCHEDULER), make_connector(KVConnectorRole.WORKER)
    worker.register_kv_caches({f"model.layers.{i}.self_attn.attn": torch.randn(2, 1, 4, 4) for i in range(2)})
    worker._layout, worker._layout_known = TOKEN_MAJOR, True
    for rid in ("gone", "kept"):
        scheduler.update_state_after_alloc(finished(rid, RequestStatus.RUNNING, rid, [1, 2, 3]), None, 0)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    assert len(recorder) == 2
    store.drop(minted("gone"))  # the client of "gone" left; its route is done with the key
    for rid, status in (("gone", RequestStatus.FINISHED_ABORTED), ("kept", RequestStatus.FINISHED_STOPPED)):
        assert scheduler.request_finished(finished(rid, status, rid, [1, 2, 3], computed=3), [1]) == (True, None)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    assert worker.get_finished(set()) == ({"gone", "kept"}, None)
    assert store.get(minted("gone")) is None and store.get(minted("kept")).kv.shape == (2, 2, 1, 2, 2)
    assert len(recorder) == 0  # "kept" taken, "gone" forgotten
    kept_bytes = store.get(minted("kept")).nbytes
    assert store.stats() == StoreStats(captures=1, bytes=kept_bytes, budget_bytes=store.budget_bytes, done_keys=1)
    store.drop(minted("kept"))
    assert store.stats() == StoreStats(0, 0, store.budget_bytes, 2)
    assert not store.add(minted("kept"), (1, 2, 3), lambda n, first: pytest.fail("a dropped key's capture is read"))
    store.ttl_s = 0.0
    assert store.stats().done_keys == 0  # remembered no longer than a capture would be kept


@pytest.mark.parametrize(
    "body,field",
    [
        ({"kv_transfer_params": {KV_PARAM: "foreign-1"}}, "kv_transfer_params.semgrad_capture"),
        ({"kv_transfer_params": {"other": 1, KV_PARAM: None}}, "kv_transfer_params.semgrad_capture"),
        (
            {"sampling_params": {"extra_args": {"kv_transfer_params": {KV_PARAM: "k"}}}},
            "sampling_params.extra_args.kv_transfer_params.semgrad_capture",
        ),
        ({"vllm_xargs": {"kv_transfer_params": "semgrad_capture"}}, "vllm_xargs.kv_transfer_params"),
        ({"vllm_xargs": {"ec_transfer_params": [1]}}, "vllm_xargs.ec_transfer_params"),
        ({"requests": [{"kv_transfer_params": {KV_PARAM: "k"}}]}, "requests[0].kv_transfer_params.semgrad_capture"),
    ],
)
def test_bodies_that_set_what_only_the_server_sets_are_refused(body: dict, field: str) -> None:
    found = refusal(body)
    assert found is not None and found[0] == field and field in found[1]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": 'kv_transfer_params {"semgrad_capture": "x"}'}]},
        {"kv_transfer_params": {"do_remote_prefill": False}, "vllm_xargs": {"semgrad": "off", "session_id": "s"}},
        {
            "kv_transfer_params": None,
            "tools": [{"function": {"parameters": {"properties": {"kv_transfer_params": True}}}}],
        },
        [1, 2],
        "text",
        None,
    ],
)
def test_other_bodies_pass(body) -> None:
    assert refusal(body) is None


async def echo_app(scope, receive, send) -> None:
    """A route that answers with the body it received and the next message from its client (its disconnect)."""
    body, message = b"", {"more_body": True}
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    after = await receive()
    content = json.dumps({"body": body.decode(), "next": after["type"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": content})


def call(chunks: list[bytes], content_type: bytes | None = b"application/json") -> tuple[int, dict]:
    """The guard over ``echo_app``, given a POST body in ``chunks`` and then the client's disconnect."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages.append({"type": "http.disconnect"})
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", content_type)] if content_type is not None else []
    scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": headers}
    asyncio.run(RequestGuard(echo_app)(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_the_guard_refuses_with_vllms_400_and_hands_other_bodies_on_unchanged() -> None:
    forged = json.dumps({"model": "m", "kv_transfer_params": {KV_PARAM: "foreign-1"}}).encode()
    escaped = b'{"kv_transfer_params": {"semgrad\\u005fcapture": "k"}}'  # the same key, JSON-escaped
    for status, body in (
        call([forged[:10], forged[10:]]),
        call([escaped], b"application/json; charset=utf-8"),
        call([forged], None),
    ):
        assert status == 400
        error = body["error"]
        assert error["param"] == "kv_transfer_params.semgrad_capture" and "set by the server" in error["message"]
        assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert call([b'{"messages": [],', b' "n": 1}']) == (
        200,
        {"body": '{"messages": [], "n": 1}', "next": "http.disconnect"},
    )
    assert call([forged], b"text/plain") == (
        200,
        {"body": forged.decode(), "next": "http.disconnect"},
    )  # not read as JSON
    assert call([b"{broken"]) == (200, {"body": "{broken", "next": "http.disconnect"})  # the route says what is wrong


def test_the_api_server_reads_the_workers_store_figures_over_the_scoring_socket() -> None:
    from semgrad_serve.serving.api_server.scoring_client import ScoringClient
    from semgrad_serve.serving.worker.scoring_service import ScoringService

    store = CaptureStore()
    store.prefix_length = lambda ids: 2
    store.add("k", (1, 2, 3), lambda n, first: torch.ones(1, 2, 1, n, 4))  # 64 bytes
    store.drop("gone")
    service = ScoringService(lambda pairs, given, claims, so_far: [], store, 8, cores=set())
    client = ScoringClient(service.address, service.authkey, secret=SECRET)
    assert capture_keys.verify(SECRET, client.new_key())
    assert asyncio.run(client.store_stats(10.0)) == StoreStats(
        captures=1, bytes=64, budget_bytes=store.budget_bytes, done_keys=1
    )
