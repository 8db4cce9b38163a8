"""Live claims in the worker: the connector copies a running request's prompt keys/values once computed, the step
recorder hands over its rows so far without ending the recording, and the scoring service waits for them and
batches live jobs of several requests with the others."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
import torch
from test_kv_capture import VOCAB, FakeRunner, finished, fresh_recorder_and_store, make_connector, minted, stream_value
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.request import RequestStatus

from semgrad_serve.scoring.given import Given
from semgrad_serve.serving.api_server.scoring_client import ScoringClient
from semgrad_serve.serving.messages import LIVE_PARAM
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.kv_layout import TOKEN_MAJOR
from semgrad_serve.serving.worker.live_scoring import live_given
from semgrad_serve.serving.worker.scoring_service import ScoringService

WAIT_S = 30.0


def live_request(rid: str, key: str, prompt: list[int]) -> SimpleNamespace:
    request = finished(rid, RequestStatus.RUNNING, key, prompt)
    request.kv_transfer_params[LIVE_PARAM] = True
    return request


def advance(runner: FakeRunner, scheduled: list[tuple[str, int, int]], outputs: dict[str, list[int]], d: int) -> None:
    """One engine step, then the runner's state as vLLM's ``_update_states`` leaves it for the next step."""
    runner.step(scheduled, d)
    for rid, computed, n in scheduled:
        state = runner.requests[rid]
        state.num_computed_tokens = computed + n
        state.output_token_ids = outputs[rid][: computed + n - len(state.prompt_token_ids) + 1]


def test_a_running_requests_prompt_is_copied_once_and_its_rows_so_far_are_given(monkeypatch) -> None:
    """Two choices of a live request: nothing is given before its prompt's keys/values are copied (at the start of
    the step after the prompt was computed, from the band's layers); then each answer so far gets its own choice's
    band inputs and logits up to its end, while the recording goes on; an answer not computed yet waits; once the
    choice ends, its capture (the same keys/values, copied once) gives the same; a dropped key gives nothing."""

    recorder, store = fresh_recorder_and_store(monkeypatch)
    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    prompt = [5] * 4
    for rid in ("r1", "r2"):
        scheduler.update_state_after_alloc(live_request(rid, "live", prompt), None, 0)
    scheduler.update_state_after_alloc(finished("r3", RequestStatus.RUNNING, "plain", prompt), None, 0)
    meta = scheduler.build_connector_meta(SimpleNamespace())
    key = minted("live")
    assert meta.live == [("r1", key), ("r2", key)] and meta.watch == ["r1", "r2", "r3"]

    worker = make_connector(KVConnectorRole.WORKER)
    block_size, heads, d, n_layers, first = 8, 2, 4, 4, 2
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(3, heads, block_size, 2 * d) for i in range(n_layers)}
    worker.register_kv_caches(caches)
    worker._layout, worker._layout_known = TOKEN_MAJOR, True
    runner = FakeRunner({rid: prompt for rid in ("r1", "r2", "r3")})
    for rid, block in (("r1", 0), ("r2", 1), ("r3", 2)):
        runner.requests[rid].num_computed_tokens, runner.requests[rid].block_ids = 0, ([block],)
    recorder.install(runner, runner.layer, runner.logits, first, lambda ids: 3)
    outputs = {"r1": [7, 8, 9], "r2": [6, 8, 9], "r3": [7, 8, 9]}
    worker.bind_connector_metadata(meta)
    assert store.get(key) is None and live_given(store, recorder, key, (prompt, [7])) is None
    advance(runner, [("r1", 0, 4), ("r2", 0, 4), ("r3", 0, 4)], outputs, d)  # the prompts: positions 0..3
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    capture = store.get(key)
    assert capture.first_layer == first and capture.kv.shape == (n_layers - first, 2, heads, 3, d)
    assert torch.equal(capture.kv[0, 0], caches[f"model.layers.{first}.self_attn.attn"][0, :, :3, :d])  # r1's block
    assert store.get(minted("plain")) is None  # not live: captured at its end only
    advance(runner, [("r1", 4, 1), ("r2", 4, 1), ("r3", 4, 1)], outputs, d)  # positions 4: the first output tokens
    for rid, answer in (("r1", [7, 8]), ("r2", [6, 8])):
        given = live_given(store, recorder, key, (prompt, answer))
        assert torch.equal(given.prefix_kv, capture.kv)
        assert torch.equal(given.band_inputs, stream_value(rid, torch.arange(3, 5))[:, None].expand(-1, d))
        assert torch.equal(given.logits, stream_value(rid, torch.arange(3, 5))[:, None] + torch.arange(VOCAB) / 10)
    assert live_given(store, recorder, key, (prompt, [7, 8, 9])) is None  # position 5 not computed yet
    assert live_given(store, recorder, key, ([1, *prompt[1:]], [7])) == Given()  # another prompt: recompute
    assert len(recorder) == 3  # peeking ended no recording

    done = finished("r1", RequestStatus.FINISHED_STOPPED, "live", prompt, computed=5, output=(7, 8))
    assert scheduler.request_finished(done, [0]) == (True, None)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    assert store.get(key) is capture and capture.has_choice([7, 8])  # the copy made while it ran, reused
    given = live_given(store, recorder, key, (prompt, [7, 8]))
    assert torch.equal(given.band_inputs[:2], stream_value("r1", torch.arange(3, 5))[:, None].expand(-1, d))
    assert len(recorder) == 2
    store.drop(key)
    assert live_given(store, recorder, key, (prompt, [6, 8])) is None


def test_a_prefix_cache_hit_past_t_star_copies_every_layer_for_a_live_request(monkeypatch) -> None:
    """Band inputs never recorded from t* (vLLM did not run those positions): every layer's prompt keys/values are
    copied, and answers so far are given them alone (the band's inputs recomputed by scoring)."""

    recorder, store = fresh_recorder_and_store(monkeypatch)
    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    prompt = [5] * 6
    scheduler.update_state_after_alloc(live_request("r1", "hit", prompt), None, 0)
    worker = make_connector(KVConnectorRole.WORKER)
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(3, 2, 8, 8) for i in range(4)}
    worker.register_kv_caches(caches)
    worker._layout, worker._layout_known = TOKEN_MAJOR, True
    runner = FakeRunner({"r1": prompt})
    runner.requests["r1"].num_computed_tokens, runner.requests["r1"].block_ids = 4, ([1],)  # a cache hit up to 4
    recorder.install(runner, runner.layer, runner.logits, 2, lambda ids: 3)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    advance(runner, [("r1", 4, 2)], {"r1": [7, 8]}, 4)
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    capture = store.get(minted("hit"))
    assert capture.first_layer == 0 and capture.kv.shape == (4, 2, 2, 3, 4)
    given = live_given(store, recorder, minted("hit"), (prompt, [7]))
    assert torch.equal(given.prefix_kv, capture.kv) and given.band_inputs is None


class Batches:
    """A score function that records each batch's (first prompt id, window) pairs; the first batch waits for
    ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, range | None, bool]]] = []
        self.release, self.holding = threading.Event(), threading.Event()

    def __call__(self, pairs: list, given: list, windows: list, so_far: list) -> list[dict]:
        if not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(WAIT_S)
        self.batches.append([(p[0], w, s) for (p, _), w, s in zip(pairs, windows, so_far)])
        return [
            {"semgrad": float(p[0]), "claims": [] if w is None else [{"index": i} for i in w]}
            for (p, _), w in zip(pairs, windows)
        ]


def test_live_jobs_wait_for_their_rows_share_a_batch_and_go_before_whole_answers() -> None:
    """A live job is scored once what it is given is computed, in one batch with the other requests' live jobs
    that are ready (one backward), with its own window of claims, before whole answers (a finished choice's last
    claims, plain answers) that are ready too; a cancelled one is never scored."""
    ready: dict[str, Given | None] = {"a": Given(), "b": None, "c": Given(), "d": Given()}
    score = Batches()
    service = ScoringService(score, CaptureStore(), 8, cores=set(), live_given=lambda key, pair: ready[key])
    client = ScoringClient(service.address, service.authkey, secret=b"test-secret")

    async def go() -> list:
        first = asyncio.create_task(client.score(None, [([100], [1])]))
        assert await asyncio.to_thread(score.holding.wait, WAIT_S)
        plain = asyncio.create_task(client.score(None, [([4], [1])]))
        final = asyncio.create_task(client.score("d", [([5], [1, 2])], windows=[range(1, 2)]))
        a = asyncio.create_task(client.score("a", [([1], [1, 2])], windows=[range(0, 2)], so_far=True))
        b = asyncio.create_task(client.score("b", [([2], [1, 2, 3])], windows=[range(2, 3)], so_far=True))
        c = asyncio.create_task(client.score("c", [([3], [1])], windows=[range(0, 1)], so_far=True))
        d = asyncio.create_task(client.score("d", [([6], [1])], windows=[range(0, 1)], so_far=True))
        await asyncio.sleep(0.3)
        c.cancel()
        await asyncio.sleep(0.3)
        score.release.set()
        await first
        assert (await a)[0]["claims"] == [{"index": 0}, {"index": 1}] and (await d)[0]["claims"] == [{"index": 0}]
        assert (await plain)[0]["semgrad"] == 4.0 and (await final)[0]["claims"] == [{"index": 1}]
        ready["b"] = Given()
        return await b

    assert asyncio.run(go())[0]["claims"] == [{"index": 2}]
    # the live jobs' answers are still running (only their windows' claims are scored), and go first
    assert score.batches == [
        [(100, None, False)],
        [(1, range(0, 2), True), (6, range(0, 1), True)],
        [(4, None, False), (5, range(1, 2), False)],
        [(2, range(2, 3), True)],
    ]


def test_the_live_option_is_validated_like_the_others() -> None:
    from semgrad_serve.errors import SemgradError
    from semgrad_serve.serving.api_server.chat_routes import ScoringOptions, scoring_options

    def options(value: object) -> ScoringOptions | None:
        return scoring_options(SimpleNamespace(model_extra={"semgrad": value}, vllm_xargs=None))

    assert options({"claims": "live"}).live and options({"claims": "live"}).claims
    assert not options({"claims": True}).live and not options(True).live
    for bad in ({"claims": "later"}, {"tokens": "live"}, {"claims": 1}):
        with pytest.raises(SemgradError, match='each option must be true or false \\("claims" also "live"\\)'):
            options(bad)


class FakeClient:
    """Scores each live job as the claims of its window (texts and tokens only); the first job waits for ``release``."""

    def __init__(self, tokenizer, wrong: bool = False) -> None:
        self.tokenizer, self.wrong = tokenizer, wrong
        self.jobs: list[tuple[int, range]] = []  # (prefix length, window)
        self.release = asyncio.Event()

    async def score(self, key, pairs, claims=False, windows=None, so_far=False) -> list[dict]:
        from semgrad_serve.scoring.claims import answer_claims

        self.jobs += [(len(a), w) for (_, a), w in zip(pairs, windows)]
        if len(self.jobs) == 1:
            await self.release.wait()
        out = []
        for (_, answer), window in zip(pairs, windows):
            claims = answer_claims(self.tokenizer, answer, [2])[window.start : window.stop]
            shift = 1 if self.wrong else 0
            out.append(
                {
                    "semgrad": 1.0,
                    "claims": [
                        {"text": c.text, "token_start": c.token_start + shift, "token_end": c.token_end} for c in claims
                    ],
                }
            )
        return out


def test_live_claims_settle_in_order_one_job_in_flight_and_the_end_scores_the_rest(default_scorer) -> None:
    """As tokens stream: a claim is sent once the next one has begun in the received text; while a job is in flight
    the claims settled meanwhile wait and go as one job (one window) when it returns; chunks come in order; the end
    scores the claims not sent; a job whose claims disagree stops the live claims of its choice (the end scores all)."""
    from semgrad_serve.model.tokens import token_texts
    from semgrad_serve.serving.api_server.live_claims import LiveClaims

    tokenizer = default_scorer.tokenizer
    ids = tokenizer("Paris is big. It is old. Rome is older. The end", add_special_tokens=False).input_ids
    texts = token_texts(tokenizer, ids)

    async def stream(wrong: bool) -> tuple[FakeClient, list[dict], list[dict]]:
        client = FakeClient(tokenizer, wrong)
        live = LiveClaims(client, "key", tokenizer, [2], 64, lambda index: [1, 2, 3])
        live.frame = {"id": "x", "object": "chat.completion.chunk"}
        chunks = []
        for i in range(len(ids)):
            live.advance(0, texts[i], ids[: i + 1], len("".join(texts[: i + 1])))
            await asyncio.sleep(0)
            if i == len(ids) - 2:
                client.release.set()
                await asyncio.wait(live.running())
            chunks += live.ready_chunks()
            await asyncio.sleep(0)
        chunks += await live.settle(0)
        final = await live.final([0], [([1, 2, 3], [*ids, 2])])
        return client, [json.loads(c[len("data: ") :]) for c in chunks], final

    client, chunks, final = asyncio.run(stream(wrong=False))
    paris = texts.index(" It")
    assert client.jobs[0] == (paris, range(0, 1))  # sent when " It" arrived; " Rome" settled "It is old." meanwhile
    assert client.jobs[1][1] == range(1, 3) and client.jobs[2] == (len(ids) + 1, range(3, 4))  # then the end
    sent = [c["text"] for chunk in chunks for c in chunk["choices"][0]["semgrad"]["claims"]]
    assert sent == ["Paris is big.", "It is old.", "Rome is older."] and all(
        ch["choices"][0]["delta"] == {} for ch in chunks
    )
    assert [c["text"] for c in final[0]["claims"]] == [*sent, "The end"]
    client, chunks, final = asyncio.run(stream(wrong=True))
    assert chunks == [] and len(client.jobs) == 2 and client.jobs[-1][1] == range(0, 4)  # the end scores every claim
