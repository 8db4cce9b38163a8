"""Data parallelism without a server: the plugin sets up a scoring service per engine, the router sends each scored
request to one engine (through the header vLLM's routes read) and that engine's service scores it, counted per
engine; ``serve`` passes the size to vLLM and binds each engine's CPU worker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.requests import Request
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

from semgrad_serve.errors import SemgradError
from semgrad_serve.serving.api_server import prometheus_metrics
from semgrad_serve.serving.api_server.data_parallel import DP_RANK_HEADER, EngineRouter, connect
from semgrad_serve.serving.capture_keys import SECRET_ENV, fingerprint
from semgrad_serve.serving.messages import SETUP_REFUSED
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.scoring_service import ScoringService

ENGINES = 2


def engine_service(engine: int, seen: list) -> ScoringService:
    """A scoring service whose score names its engine (100 × engine + the first prompt id) and records the pairs'
    capture state (whether each came with a key)."""

    def score(pairs: list, given: list, claims: list, so_far: list) -> list[dict]:
        seen.append((engine, [p[0] for p, _ in pairs]))
        return [{"semgrad": float(100 * engine + p[0])} for p, _ in pairs]

    return ScoringService(score, CaptureStore(), max_batch=8, cores=set())


SECRET = b"capture-secret-of-these-tests"


def setup_info(service: ScoringService) -> dict:
    """What the worker extension's ``semgrad_setup`` returns, less what these tests do not read; its capture
    secret is the one ``started`` sets for the API server."""
    return {
        "capture": True,
        "records": True,
        "scoring_cores": [1],
        "profile": "p",
        "address": service.address,
        "authkey": service.authkey,
        "capture_secret_check": fingerprint(SECRET),
    }


class TwoEngines:
    """vLLM's async engine client with two engines: ``collective_rpc`` answers with engine 0's workers only, the
    per-engine utility call with each engine's."""

    def __init__(self, infos: list[dict]) -> None:
        self.infos = infos
        self.engine_core = SimpleNamespace(call_utility_all_async=self._all)

    async def collective_rpc(self, *args: object, **kwargs: object) -> list:
        return [self.infos[0]]

    async def _all(self, method: str, *args: object) -> list:
        assert method == "collective_rpc" and args[0] == "semgrad_setup"
        return [[info] for info in self.infos]


def raw_request(headers: dict[str, str] | None = None) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> tuple[SimpleNamespace, list]:
    """The plugin started against two engines: its app state, and the (engine, prompts) of each batch scored."""
    from semgrad_serve.serving.api_server.plugin import SemgradPlugin

    monkeypatch.setenv(SECRET_ENV, SECRET.decode())

    seen: list = []
    infos = [setup_info(engine_service(e, seen)) for e in range(ENGINES)]
    infos[1]["scoring_cores"] = [0]
    state = SimpleNamespace()
    asyncio.run(SemgradPlugin().init_state(TwoEngines(infos), state, SimpleNamespace(data_parallel_size=ENGINES)))
    return state, seen


def test_each_engine_gets_a_scoring_service_and_info_shows_each(started) -> None:
    state, _ = started
    assert [c.engine for c in state.semgrad_engines.clients] == [0, 1]
    info = state.semgrad_info
    assert info["data_parallel_size"] == 2 and "address" not in info and "authkey" not in info
    assert info["engines"] == [{"engine": 0, "scoring_cores": [1]}, {"engine": 1, "scoring_cores": [0]}]


def test_requests_alternate_engines_through_vllms_header_and_are_scored_there(started) -> None:
    state, seen = started
    router: EngineRouter = state.semgrad_engines
    before = [prometheus_metrics.ENGINE_ANSWERS.labels(str(e), "scored")._value.get() for e in range(ENGINES)]
    requests = [raw_request({"content-type": "application/json"}) for _ in range(4)]
    for r in requests:
        assert r.headers["content-type"] == "application/json"  # a cached view of the headers, as FastAPI leaves it
    clients = [router.route(r) for r in requests]
    # vLLM's own reading of the header names the engine whose client scores the request
    assert [OpenAIServingChat._get_data_parallel_rank(r) for r in requests] == [0, 1, 0, 1]
    assert [c.engine for c in clients] == [0, 1, 0, 1]
    assert all(r.headers["content-type"] == "application/json" for r in requests)  # other headers kept

    async def score_all() -> list:
        return await asyncio.gather(*(c.score(c.new_key(), [([i], [5])]) for i, c in enumerate(clients)))

    results = asyncio.run(score_all())
    assert [r[0]["semgrad"] for r in results] == [0.0, 101.0, 2.0, 103.0]  # 100 × engine + prompt
    assert sorted(p for e, ps in seen for p in ps if e == 1) == [1, 3]
    for e in range(ENGINES):
        assert prometheus_metrics.ENGINE_ANSWERS.labels(str(e), "scored")._value.get() == before[e] + 2


def test_a_requested_engine_is_kept_and_one_out_of_range_is_a_user_mistake(started) -> None:
    router: EngineRouter = started[0].semgrad_engines
    pinned = raw_request({"X-data-parallel-rank": "1"})
    assert [router.route(pinned).engine for _ in range(3)] == [1, 1, 1]
    assert OpenAIServingChat._get_data_parallel_rank(pinned) == 1
    with pytest.raises(SemgradError, match="X-data-parallel-rank 2 is out of range: this server runs 2 engines"):
        router.route(raw_request({"X-data-parallel-rank": "2"}))
    junk = raw_request({"X-data-parallel-rank": "any"})  # vLLM ignores it; the router replaces it
    engine = router.route(junk).engine
    assert OpenAIServingChat._get_data_parallel_rank(junk) == engine
    assert junk.scope["headers"].count((DP_RANK_HEADER.encode(), str(engine).encode())) == 1


def test_a_request_vllm_routes_itself_is_scored_without_a_capture(started) -> None:
    """vLLM's Responses route ignores the header: its answers are recomputed on the next engine in turn."""
    router: EngineRouter = started[0].semgrad_engines
    request = raw_request()
    client = router.route(request, routable=False)
    assert client.new_key() is None and client.capture is False and router.clients[client.engine].capture is True
    assert OpenAIServingChat._get_data_parallel_rank(request) is None
    (result,) = asyncio.run(client.score(None, [([7], [5])]))
    assert result["semgrad"] == 100 * client.engine + 7  # over the engine's own connection


def test_one_engine_needs_no_header() -> None:
    seen: list = []
    router = EngineRouter(connect([setup_info(engine_service(0, seen))], SECRET))
    request = raw_request()
    assert router.route(request).engine == 0 and router.route(request, routable=False).capture is True
    assert OpenAIServingChat._get_data_parallel_rank(request) is None


def test_an_engine_on_another_machine_and_several_api_servers_are_refused(tmp_path: Path) -> None:
    from semgrad_serve.serving.api_server.plugin import SemgradPlugin

    with pytest.raises(
        SemgradError, match="cannot reach the scoring service of engine 0 .*must run on the API server's machine"
    ):
        connect([{"capture": True, "address": str(tmp_path / "nothing"), "authkey": "00"}], SECRET)

    class NoRpc:
        async def collective_rpc(self, *args: object, **kwargs: object) -> list:
            pytest.fail("no worker is asked to set up")

    with pytest.raises(SemgradError, match="needs one API server"):
        asyncio.run(SemgradPlugin().init_state(NoRpc(), SimpleNamespace(), SimpleNamespace(api_server_count=2)))


def test_start_up_refusals_are_one_line_and_other_failures_keep_their_type() -> None:
    """A worker's refusal (its answer names why) and a server without the worker extension fail start-up with one
    line; any other failure is raised as it was, so its traceback shows."""
    from semgrad_serve.serving.api_server.plugin import SemgradPlugin
    from semgrad_serve.serving.settings import WORKER_EXTENSION

    class Engine:
        def __init__(self, answer: object) -> None:
            self.answer = answer

        async def collective_rpc(self, method: str, args: tuple = ()) -> list:
            if isinstance(self.answer, Exception):
                raise self.answer
            return [{"capture": False}, self.answer]  # rank 0 set up, rank 1 refused

    def start(answer: object, **args: object) -> None:
        asyncio.run(SemgradPlugin().init_state(Engine(answer), SimpleNamespace(), SimpleNamespace(**args)))

    with pytest.raises(SemgradError, match="^SemGrad scoring cannot start: pipeline parallelism is refused$"):
        start({SETUP_REFUSED: "pipeline parallelism is refused"})
    with pytest.raises(SemgradError, match="needs its worker extension: start vLLM with --worker-extension-cls"):
        start({}, worker_extension_cls="")
    with pytest.raises(ZeroDivisionError, match="a bug"):
        start(ZeroDivisionError("a bug"), worker_extension_cls=WORKER_EXTENSION)


def test_serve_passes_the_size_to_vllm_and_binds_every_engines_worker(monkeypatch) -> None:
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import data_parallel_size, server_command

    args = build_parser().parse_args(["serve", "--data-parallel-size", "2"])
    command = server_command(args, Path("/m/tiny"), on_cpu=True)
    assert command[command.index("--data-parallel-size") + 1] == "2" and data_parallel_size(args) == 2
    assert data_parallel_size(build_parser().parse_args(["serve", "-dp", "2", "--", "-dp=3"])) == 3  # vLLM's wins
    assert data_parallel_size(build_parser().parse_args(["serve", "--", "--api-server-count", "1"])) == 1
