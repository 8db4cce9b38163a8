"""The serving pieces that need no server: vLLM's weight layout, the scoring service and its client, settings,
the serve command."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from semgrad_serve.cli import main
from semgrad_serve.errors import ItemError, SemgradError
from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.serving.api_server.scoring_client import SERVICE_GONE, ScoringClient
from semgrad_serve.serving.settings import (
    CAPTURE_KV_TRANSFER_CONFIG,
    MAX_BATCH_ENV,
    PLUGIN_NAME,
    TEST_FAULT_MARKER,
    WORKER_EXTENSION,
    ScoringSettings,
)
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.scoring_service import ScoringService, generation_cores, scoring_cores
from semgrad_serve.serving.worker.vllm_weights import from_vllm_model

from probe_by_hand import probe_confidence, row_features
from tiny_models import FAMILY_PARAMS, random_items, tiny_model

# -- vLLM's module layout ----------------------------------------------------------------------------


def _padded(weight: torch.Tensor, rows: int = 7) -> torch.Tensor:
    """vLLM pads the vocabulary dimension of the embedding and head."""
    return torch.cat([weight, torch.full((rows, weight.shape[1]), float("nan"), dtype=weight.dtype)])


def vllm_layout(model: torch.nn.Module) -> SimpleNamespace:
    """The module tree vLLM builds for a Hugging Face model: fused qkv_proj and gate_up_proj, padded vocabulary."""

    def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(weight=weight, bias=bias)

    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projs])
        layers.append(
            SimpleNamespace(
                self_attn=SimpleNamespace(
                    qkv_proj=linear(torch.cat([p.weight for p in projs]), bias),
                    o_proj=linear(attn.o_proj.weight),
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                ),
                mlp=SimpleNamespace(
                    gate_up_proj=linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down_proj=linear(mlp.down_proj.weight),
                ),
                input_layernorm=layer.input_layernorm,
                post_attention_layernorm=layer.post_attention_layernorm,
            )
        )
    embed = linear(_padded(model.model.embed_tokens.weight))
    head = embed if model.config.tie_word_embeddings else linear(_padded(model.lm_head.weight))
    return SimpleNamespace(
        model=SimpleNamespace(embed_tokens=embed, layers=layers, norm=model.model.norm), lm_head=head
    )


LLAMA_LAYOUTS = (
    "llama-tied",
    "llama3-untied",
    "mistral-window",
    "qwen2-tied",
    "qwen2-window-untied",
    "qwen3-untied",
    "qwen3-tied",
)


@pytest.mark.parametrize("family", [p for p in FAMILY_PARAMS if p.values[0] in LLAMA_LAYOUTS])
def test_vllm_layout_scores_equal_hugging_face_layout(family: str) -> None:
    model = tiny_model(family)
    band = range(3, 5)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(4)]
    kernels = select_kernels("torch")
    expected = score_batch(from_hf_model(model), items, band, kernels)
    got = score_batch(from_vllm_model(vllm_layout(model), model.config), items, band, kernels)
    for ours, theirs in zip(got, expected):
        for key, value in theirs.scores().items():
            assert getattr(ours, key) == pytest.approx(value, rel=1e-12), key


def test_vllm_layout_errors_name_the_problem() -> None:
    model = tiny_model("llama-tied")
    layout = vllm_layout(model)
    layout.model.layers[2].self_attn.o_proj.weight = torch.empty(0)  # what vLLM leaves after repacking on CPU
    with pytest.raises(SemgradError, match="layer 2 o_proj in a packed or quantized form"):
        from_vllm_model(layout, model.config)
    del layout.model.layers[2].mlp
    with pytest.raises(SemgradError, match="module layout"):
        from_vllm_model(layout, model.config)
    with pytest.raises(SemgradError, match="'deepseek_v3' is not supported: multi-head latent attention"):
        from_vllm_model(layout, SimpleNamespace(model_type="deepseek_v3"))


# -- the scoring service and its client ---------------------------------------------------------------


# Bound on waiting for an event of the service: a broken service fails the test instead of hanging it.
WAIT_S = 60


class FakeScore:
    """Scores each pair as its prompt's first id (plus 1000 when its prefix keys/values were given); fails a
    whole batch holding a negative id. With ``hold``, the first batch waits for ``release`` (``holding`` is set
    meanwhile)."""

    def __init__(self, hold: bool = True) -> None:
        self.release, self.holding = threading.Event(), threading.Event()
        self.hold = hold
        self.claims: dict[int, bool] = {}  # first prompt id -> whether its claims were asked for

    def __call__(self, pairs: list, given: list, claims: list, so_far: list) -> list[dict]:
        self.claims.update((p[0], c) for (p, _), c in zip(pairs, claims))
        if self.hold and not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(WAIT_S)
        if any(p[0] < 0 for p, _ in pairs):
            raise RuntimeError("boom")
        return [{"semgrad": float(p[0] + (1000 if g.prefix_kv is not None else 0))} for (p, _), g in zip(pairs, given)]


class SignalledStore(CaptureStore):
    """A capture store that signals each drop: the service handles its messages in order, so when a drop sent
    after some answers has been handled, those answers are queued."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = threading.Event()

    def drop(self, key: str) -> None:
        super().drop(key)
        self.dropped.set()


def service_and_client(score, store: CaptureStore | None = None, max_batch: int = 8):
    """The service over ``score``, a client, and the first prompt id of each pair of every batch scored, in order."""
    batches: list[list[int]] = []

    def recorded(pairs: list, given: list, claims: list, so_far: list) -> list[dict]:
        batches.append([p[0] for p, _ in pairs])
        return score(pairs, given, claims, so_far)

    service = ScoringService(recorded, store if store is not None else CaptureStore(), max_batch, cores=set())
    return service, ScoringClient(service.address, service.authkey, secret=b"test-secret"), batches


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S)


async def send_all(client: ScoringClient, store: SignalledStore, jobs: list[tuple[str | None, list[int]]]) -> list:
    """Tasks scoring ``jobs`` (key, first prompt ids), returned once the service has queued all of them."""
    tasks = [asyncio.create_task(client.score(key, [([p], [1]) for p in prompts])) for key, prompts in jobs]
    await asyncio.sleep(0)  # each task sends its answers before it first waits
    store.dropped.clear()
    client.drop("queued")
    await until(store.dropped)
    return tasks


def score_behind_a_held_batch(client: ScoringClient, fake: FakeScore, store: SignalledStore, jobs: list) -> list:
    """Results of ``jobs``, all of which reach the service while its first batch (prompt 100) is held."""

    async def go() -> list:
        first = asyncio.create_task(client.score(None, [([100], [1])]))
        await until(fake.holding)
        tasks = await send_all(client, store, jobs)
        fake.release.set()
        assert await first == [{"semgrad": 100.0}]
        return await asyncio.gather(*tasks)

    return asyncio.run(go())


def score_concurrently(client: ScoringClient, jobs: list[tuple[str | None, list[int]]]) -> list[list[dict]]:
    async def go() -> list[list[dict]]:
        return await asyncio.gather(*(client.score(key, [([p], [1]) for p in prompts]) for key, prompts in jobs))

    return asyncio.run(go())


def test_service_batches_what_arrives_while_it_scores_and_keeps_each_answer_its_result() -> None:
    fake, store = FakeScore(), SignalledStore()
    _, client, batches = service_and_client(fake, store, max_batch=8)
    jobs = [(None, [i]) for i in range(12)] + [(None, [20, 21, 22])]
    results = score_behind_a_held_batch(client, fake, store, jobs)
    assert [[r["semgrad"] for r in rs] for rs in results] == [[i] for i in range(12)] + [[20, 21, 22]]
    # oldest first, at most 8 answers: a request that does not fit waits for the next batch, later ones fill this one
    assert batches == [[100], list(range(8)), [8, 9, 10, 11, 20, 21, 22]]


def test_claims_are_asked_for_per_request() -> None:
    score = FakeScore(hold=False)
    _, client, _ = service_and_client(score)

    async def go() -> list[list[dict]]:
        return await asyncio.gather(
            client.score(None, [([1], [1]), ([2], [1])], claims=True), client.score(None, [([3], [1])])
        )

    asyncio.run(go())
    assert {k: w is not None for k, w in score.claims.items()} == {1: True, 2: True, 3: False}


def windowed(score: FakeScore):
    """``score`` whose reports list, as their claims, the claim indices of each answer's window."""

    def with_claims(pairs: list, given: list, windows: list, so_far: list) -> list[dict]:
        reports = score(pairs, given, windows, so_far)
        return [{**r, "claims": list(w)} if w is not None else r for r, w in zip(reports, windows)]

    return with_claims


def three_windows_from_50(pair, claims: bool) -> list:
    """A plan: answers whose prompt starts at 50 or more have claims 0..5 in three passes of two."""
    if not claims:
        return [None]
    return [range(0, 2), range(2, 4), range(4, 6)] if pair[0][0] >= 50 else [range(0, 1)]


def recording_service(score, store: CaptureStore, lanes: int = 2):
    """A service over ``score`` with the plan ``three_windows_from_50``, a client, and the first prompt id of each
    piece of every batch scored, in order."""
    service = ScoringService(score, store, 8, cores=set(), plan=three_windows_from_50, lanes=lanes)
    batches: list = []
    original = service._score_pieces
    service._score_pieces = lambda pieces, given: (
        batches.append([p.pairs[0][0][0] for p in pieces]) or original(pieces, given)
    )
    return service, ScoringClient(service.address, service.authkey, secret=b"test-secret"), batches


def test_short_jobs_are_scored_while_a_long_claims_job_is() -> None:
    """Two lanes: while a claims job's first pass is held, short jobs are scored and answered; then the long job's
    passes come back as one report with all its claims, in order."""
    fake, store = FakeScore(), SignalledStore()
    _, client, batches = recording_service(windowed(fake), store)

    async def go() -> list:
        long = asyncio.create_task(client.score(None, [([60], [1])], claims=True))
        await until(fake.holding)
        shorts = await asyncio.gather(client.score(None, [([1], [1])]), client.score(None, [([2], [1])]))
        assert not long.done()
        fake.release.set()
        return [await long, *shorts]

    long, *shorts = asyncio.run(go())
    assert long == [{"semgrad": 60.0, "claims": [0, 1, 2, 3, 4, 5]}]
    assert [r[0]["semgrad"] for r in shorts] == [1, 2]
    assert batches[0] == [60] and batches.count([60]) == 3


def test_one_lane_alternates_short_batches_and_long_passes() -> None:
    """One lane (as under tensor parallelism): a long job delays the short jobs queued with it by one pass at a
    time."""
    fake, store = FakeScore(), SignalledStore()
    _, client, batches = recording_service(windowed(fake), store, lanes=1)

    async def go() -> list:
        first = asyncio.create_task(client.score(None, [([100], [1])]))
        await until(fake.holding)
        long = asyncio.create_task(client.score(None, [([60], [1])], claims=True))
        await asyncio.sleep(0)
        shorts = await send_all(client, store, [(None, [1]), (None, [2])])
        late = await send_all(client, store, [(None, [3])])
        fake.release.set()
        return [await first, await long, *await asyncio.gather(*shorts, *late)]

    first, long, *shorts = asyncio.run(go())
    assert long == [{"semgrad": 60.0, "claims": [0, 1, 2, 3, 4, 5]}]
    assert [r[0]["semgrad"] for r in shorts] == [1, 2, 3]
    # the held batch, then the long job's first pass, the short ones (together), its second and third passes
    assert batches == [[100], [60], [1, 2, 3], [60], [60]]


def test_a_cancelled_job_is_not_scored() -> None:
    """A request whose client has gone (its task cancelled) while its long job waits: none of its passes run."""
    fake, store = FakeScore(), SignalledStore()
    service, client, scored = recording_service(windowed(fake), store, lanes=1)

    async def go() -> list:
        first = asyncio.create_task(client.score(None, [([100], [1])]))
        await until(fake.holding)
        long = asyncio.create_task(client.score(None, [([70], [1])], claims=True))
        await asyncio.sleep(0)
        long.cancel()
        (short,) = await send_all(client, store, [(None, [5])])  # the cancel went before these
        assert service.queued() == 2  # the held batch's job and the short one: the cancelled job is gone
        fake.release.set()
        return [await first, await short]

    assert asyncio.run(go())[1] == [{"semgrad": 5.0}]
    assert scored == [[100], [5]]


def test_messages_pickle_and_are_told_apart_by_type() -> None:
    """Every message survives pickling equal (the socket pickles them); a message of no known type is logged and
    ignored by the service, which goes on answering."""
    import pickle

    from semgrad_serve.serving import messages

    sent = [
        messages.ScoreJob(3, "key", [([1, 2], [3])], claims=True),
        messages.CancelJob(3),
        messages.DropCapture("key"),
        messages.StatsRequest(4),
        messages.JobResult(3, [{"semgrad": 1.0}], batch_size=2),
        messages.StatsReply(4, messages.StoreStats(1, 64, 128, 0)),
    ]
    assert [pickle.loads(pickle.dumps(m)) for m in sent] == sent
    _, client, batches = service_and_client(FakeScore(hold=False))
    assert client._send(("score", 9, None, [([5], [1])], False))  # the old positional tuple: not a message
    assert asyncio.run(client.score(None, [([6], [1])])) == [{"semgrad": 6.0}]
    assert batches == [[6]]


def test_a_failing_request_does_not_sink_its_batch() -> None:
    """Two failing requests (one by the test seam the server tests use) in a batch of five: the batch is
    retried one request at a time and the others are scored."""
    from semgrad_serve.serving.worker.extension import with_test_faults

    marked = SimpleNamespace(decode=lambda ids: TEST_FAULT_MARKER if 4 in ids else "a prompt")
    fake, store = FakeScore(), SignalledStore()
    _, client, batches = service_and_client(with_test_faults(fake, marked), store)
    results = score_behind_a_held_batch(
        client, fake, store, [(None, [0]), (None, [1]), (None, [-1]), (None, [3]), (None, [4])]
    )
    assert batches == [[100], [0, 1, -1, 3, 4], [0], [1], [-1], [3], [4]]
    assert [r[0].get("semgrad") for r in results] == [0, 1, None, 3, None]
    assert "scoring failed: boom" in results[2][0]["error"] and "injected" in results[4][0]["error"]


def test_answers_use_their_requests_capture_and_recompute_without_one(monkeypatch) -> None:
    """An answer waits for its request's capture (it arrives one engine step after the request ends) and
    runs over it; one whose capture never comes is recomputed once the wait is over; a capture of another
    prompt or one without keys/values means recompute; a dropped capture is gone."""
    from semgrad_serve.serving.worker import scoring_service

    monkeypatch.setattr(scoring_service, "CAPTURE_WAIT_S", math.inf)
    store = SignalledStore()
    store.prefix_length = lambda ids: 1
    _, client, batches = service_and_client(FakeScore(hold=False), store)
    store.add("other-prompt", (9,), lambda n, first: torch.zeros(1))
    store.add("no-kv", (4,), None)

    async def go() -> list[list[dict]]:
        late, never = await send_all(client, store, [("late", [5, 5]), ("never", [6])])
        assert batches == [] and not late.done()  # queued, waiting for their captures
        store.add("late", (5,), lambda n, first: torch.zeros(1))  # the capture lands after the answers arrived
        await late
        assert batches == [[5, 5]] and not never.done()
        monkeypatch.setattr(scoring_service, "CAPTURE_WAIT_S", 0.0)  # the wait for a capture is over
        return [
            late.result(),
            await never,
            await client.score("other-prompt", [([7], [1])]),
            await client.score("no-kv", [([4], [1])]),
        ]

    late, never, other, no_kv = asyncio.run(go())
    assert [r["semgrad"] for r in late] == [1005, 1005] and never[0]["semgrad"] == 6
    assert other[0]["semgrad"] == 7 and no_kv[0]["semgrad"] == 4
    store.dropped.clear()
    client.drop("late")
    assert store.dropped.wait(WAIT_S)
    assert store.get("late") is None and store.get("other-prompt") is not None


def test_a_choice_waits_for_its_own_capture_not_another_choices(monkeypatch) -> None:
    """n > 1: the choices of a request share a capture key but end in different engine steps. An answer whose
    choice is not captured yet waits, even though another choice's capture is there; a stop string's shorter
    answer is its choice's too."""
    from semgrad_serve.serving.worker import scoring_service

    monkeypatch.setattr(scoring_service, "CAPTURE_WAIT_S", math.inf)
    store = SignalledStore()
    store.prefix_length = lambda ids: 1
    _, client, batches = service_and_client(FakeScore(hold=False), store)
    store.add("k", (5,), read_one, output_ids=(7, 8, 2))  # the first choice ended

    async def go() -> list[dict]:
        second = asyncio.create_task(client.score("k", [([5], [9, 3])]))
        cut = asyncio.create_task(client.score("k", [([5], [7, 4])]))  # the first choice, cut by a stop string
        await asyncio.sleep(0)
        store.dropped.clear()
        client.drop("queued")
        await until(store.dropped)
        assert await cut == [{"semgrad": 1005.0}] and batches == [[5]] and not second.done()
        store.add("k", (5,), read_one, output_ids=(9, 3))  # the second choice ends one step later
        return await second

    assert asyncio.run(go()) == [{"semgrad": 1005.0}] and batches == [[5], [5]]


def read_one(n: int, first_layer: int) -> torch.Tensor:
    return torch.zeros(1)


def test_answers_get_an_error_when_the_service_is_gone() -> None:
    """Answers sent after the service's end of the connection closed, whether or not the client has seen it
    close yet, get the error and are never left waiting."""
    service, client, _ = service_and_client(FakeScore(hold=False))
    assert score_concurrently(client, [(None, [2])]) == [[{"semgrad": 2.0}]]
    with socket.socket(fileno=os.dup(service._conn.fileno())) as worker_end:
        worker_end.shutdown(socket.SHUT_RDWR)  # the worker's end of the connection goes away
    assert score_concurrently(client, [(None, [3]), (None, [4, 5])]) == [
        [{"error": SERVICE_GONE}],
        [{"error": SERVICE_GONE}] * 2,
    ]


# -- settings, reports, the serve command -------------------------------------------------------------


def test_scoring_runs_beside_the_cores_vllm_binds_generation_to(monkeypatch) -> None:
    # vLLM's three spellings of a worker's OpenMP cores (gnu, Intel, and plain OpenMP places)
    assert generation_cores({"OMP_PLACES": "{0,1}"}) == {0, 1}
    assert generation_cores({"GOMP_CPU_AFFINITY": "2 3 5"}) == {2, 3, 5}
    assert generation_cores({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,6]"}) == {4, 6}
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {7})
    assert generation_cores({"OMP_PLACES": "cores"}) == {7} == generation_cores({})  # none vLLM wrote: this thread's
    assert scoring_cores({0, 1}, {0}) == {1}
    assert scoring_cores({0, 1, 2, 3}, {0, 1}) == {2, 3}
    assert scoring_cores({0, 1}, {0, 1}) == {0, 1}  # generation everywhere: share the API server's cores


def test_settings_from_environment() -> None:
    settings = ScoringSettings(profile="/p.json", max_batch=4)
    assert ScoringSettings.from_env(settings.to_env()) == settings
    assert ScoringSettings.from_env({}) == ScoringSettings()
    with pytest.raises(SemgradError, match="must be a whole number"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "many"})
    with pytest.raises(SemgradError, match="at least 1"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "0"})


def test_answer_report_turns_nan_and_item_errors_into_errors(default_scorer) -> None:
    from semgrad_serve.scoring.semgrad_object import SERVED_FIELDS
    from semgrad_serve.serving.worker.extension import answer_report

    scorer = default_scorer
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    (result,) = scorer.score([(prompt, scorer.answer_ids("Paris."))])
    report = answer_report(scorer, result)
    assert tuple(report) == SERVED_FIELDS and report["score"] == report["hybridgrad"] > 0
    # the served confidence: the profile's probe (by hand) on this answer's own scores, length (no stop token) and
    # token statistics
    model = scorer.profile.confidence
    expected = probe_confidence(model.calibrator, row_features(scorer.report(result)))
    assert report["confidence"] == pytest.approx(expected, rel=1e-9) and 0 < expected < 1
    assert report["min_confidence"] == model.operating_point.min_confidence
    assert report["flagged"] is (report["confidence"] < report["min_confidence"])
    broken = type(result)(**{**result.to_dict(), "semgrad": math.nan})
    assert answer_report(scorer, broken) == {"error": "scoring produced a non-finite value (NaN or inf)"}
    assert answer_report(scorer, ItemError("the answer is empty")) == {"error": "the answer is empty"}


def test_serve_command_line_and_environment(monkeypatch) -> None:
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import server_command, server_env

    args = build_parser().parse_args(["serve", "--port", "9000", "--", "--gpu-memory-utilization", "0.5"])
    command = server_command(args, Path("/m/tiny"), on_cpu=True)
    assert command[command.index("--worker-extension-cls") + 1] == WORKER_EXTENSION
    assert command[command.index("--kv-transfer-config") + 1] == CAPTURE_KV_TRANSFER_CONFIG
    assert command[command.index("--dtype") + 1] == "float32" and "--enforce-eager" in command
    assert command[-2:] == ["--gpu-memory-utilization", "0.5"]  # the user's vLLM options come last and win
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    env = server_env(ScoringSettings(max_batch=3))
    assert env["VLLM_PLUGINS"] == f"other,{PLUGIN_NAME}" and env[MAX_BATCH_ENV] == "3"


def test_serve_with_tensor_parallelism_binds_each_cpu_worker(monkeypatch) -> None:
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import cpu_thread_binding, server_command, server_env, tensor_parallel_size

    args = build_parser().parse_args(["serve", "-tp", "2", "--", "--pipeline-parallel-size", "1"])
    command = server_command(args, Path("/m/tiny"), on_cpu=True)
    assert command[command.index("--tensor-parallel-size") + 1] == "2" and command[-2:] == [
        "--pipeline-parallel-size",
        "1",
    ]
    assert tensor_parallel_size(args) == 2
    assert (
        tensor_parallel_size(build_parser().parse_args(["serve", "--", "--tensor-parallel-size=3"])) == 3
    )  # vLLM's wins
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    with pytest.raises(SemgradError, match="needs a core per worker; this machine gives 1"):
        cpu_thread_binding(2, [5])
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert server_env(ScoringSettings(), cpu_workers=2)["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server_env(ScoringSettings(), cpu_workers=1)
    # vLLM's reserve without a KV connector (one core per worker), not the extra one it takes with one
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert server_env(ScoringSettings(), cpu_workers=1)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert server_env(ScoringSettings(), cpu_workers=2)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in server_env(ScoringSettings(), cpu_workers=0)  # a GPU
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # the user's own reserve wins
    assert server_env(ScoringSettings(), cpu_workers=1)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")  # the user's own binding wins
    assert server_env(ScoringSettings(), cpu_workers=2)["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"


def test_serve_on_a_gpu_keeps_the_scoring_reserve_outside_vllm() -> None:
    """SmolLM2-135M in float32: 15 band layers × (12·576 + 2·3·64 + 4·1536) values × 4 bytes per token,
    × 4096 batch tokens, plus one 2^26-element head chunk (float32 + its float32 cast): 3.58 GiB of 80."""
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import server_command
    from semgrad_serve.model.loading import resolve_model

    args = build_parser().parse_args(["serve", "--dtype", "float32"])
    command = server_command(args, resolve_model(None), on_cpu=False, gpu_bytes=80 * 2**30)
    reserve = 15 * (12 * 576 + 2 * 3 * 64 + 4 * 1536) * 4 * 4096 + 2**26 * 8
    share = float(command[command.index("--gpu-memory-utilization") + 1])
    assert share == pytest.approx(0.9 - reserve / (80 * 2**30), abs=5e-4) and "--enforce-eager" not in command
    with pytest.raises(SemgradError, match="more than this GPU's 4 GiB allows"):
        server_command(args, resolve_model(None), on_cpu=False, gpu_bytes=4 * 2**30)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "--model", "/tmp"], "not a Hugging Face model directory"),
        (["serve", "--profile", "/nonexistent.json"], "cannot read profile"),
        (["serve", "--max-batch", "0"], "at least 1"),
        (["serve", "--", "--kv-transfer-config", "{}"], "runs its own KV connector"),
        (["serve", "--", "--pipeline-parallel-size", "2"], "does not support pipeline parallelism"),
        (["serve", "--", "-pp=2"], "does not support pipeline parallelism"),
        (["serve", "--", "--api-server-count", "2"], "needs one API server"),
        (["serve", "--data-parallel-size", "0"], "--data-parallel-size must be at least 1"),
        (
            ["serve", "--", "--tensor-parallel-size", "2"],
            "9 attention heads do not split over 2 ranks",
        ),  # vLLM's spelling
        (["serve", "--", "-tp=x"], "-tp needs a whole number, got 'x'"),
        (["serve", "--tensor-parallel-size", "0"], "at least 1"),
        (["serve", "--tensor-parallel-size", "2"], "9 attention heads do not split over 2 ranks"),  # SmolLM2
    ],
)
def test_serve_mistakes_print_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_foreign_kv_connector_is_refused_and_none_means_recompute() -> None:
    from semgrad_serve.serving.settings import CAPTURE_CONNECTOR_MODULE
    from semgrad_serve.serving.worker.extension import capture_state

    assert capture_state(None) is False
    assert capture_state(SimpleNamespace(kv_connector=None, kv_connector_module_path=None)) is False
    assert capture_state(
        SimpleNamespace(kv_connector="SemgradCaptureConnector", kv_connector_module_path=CAPTURE_CONNECTOR_MODULE)
    )
    with pytest.raises(SemgradError, match="drop --kv-transfer-config"):
        capture_state(SimpleNamespace(kv_connector="LMCacheConnectorV1", kv_connector_module_path=None))


def test_passes_merge_into_one_report_per_answer() -> None:
    """An answer's first pass gives its report and later passes add their claims; a failed pass makes its answer's
    report that error, and the answer's later passes do not undo it."""
    from semgrad_serve.serving.worker.scoring_service import Job, Piece, merge, split_job

    job = Job(1, None, [([1], [2]), ([3], [4])], claims=True)
    split_job(job, lambda pair, claims: [range(0, 1), range(1, 2)] if pair[0] == [1] else [range(0, 1), range(1, 3)])
    assert [(p.answers, p.windows) for p in job.pieces] == [
        ([0], [range(0, 1)]),
        ([0], [range(1, 2)]),
        ([1], [range(0, 1)]),
        ([1], [range(1, 3)]),
    ]
    reports = [
        {"semgrad": 1.0, "claims": ["a"]},
        {"semgrad": 9.0, "claims": ["b"]},
        {"error": "boom"},
        {"semgrad": 3.0, "claims": ["c"]},
    ]
    for piece, report in zip(list(job.pieces), reports):
        merge(job, piece, [report])
    assert job.reports == [{"semgrad": 1.0, "claims": ["a", "b"]}, {"error": "boom"}] and job.left == 0
    one = Job(2, None, [([1], [2]), ([3], [4])])
    split_job(one, lambda pair, claims: [None])
    assert len(one.pieces) == 1 and one.pieces[0].answers == [0, 1] and not one.long
    assert isinstance(one.pieces[0], Piece)


def test_tensor_parallelism_is_refused_for_families_without_a_sharded_check() -> None:
    from semgrad_serve.serving.settings import check_tensor_parallel

    check_tensor_parallel("gemma3_text", 1)
    check_tensor_parallel("qwen3", 2)
    with pytest.raises(SemgradError, match="qwen3_moe models does not support tensor parallelism yet"):
        check_tensor_parallel("qwen3_moe", 2)


def test_long_rope_reuse_only_where_vllm_rotated_as_transformers() -> None:
    """vLLM 0.32 takes LongRoPE's long frequencies for every sequence when its context is longer than the original
    (4096 here), transformers for a sequence longer than 4096 tokens: reuse only where both chose the same."""
    from semgrad_serve.serving.worker.extension import rope_agrees

    long_rope = SimpleNamespace(long_rope_after=4096)
    assert rope_agrees(long_rope, 4096, 4096) and not rope_agrees(long_rope, 4096, 4097)  # vLLM short throughout
    assert not rope_agrees(long_rope, 8192, 4096) and rope_agrees(long_rope, 8192, 4097)  # vLLM long throughout
    assert rope_agrees(SimpleNamespace(long_rope_after=None), 8192, 100)
