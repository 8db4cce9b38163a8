"""Live claims benchmark: one ``semgrad-serve serve``, the chat load streamed with live claims, with claims at the
end and with scoring off.

Each request (a TruthfulQA question, "Explain your answer in a short paragraph.", 128-token answers of several
sentences) streams with ``return_token_ids`` so that the arrival time of each answer token is known. With live
claims, a claim's latency is the time from the chunk holding its last token to the chunk holding its scores; the
reference is the time the server then took to stream the next sentence's first 5 tokens (from the claim's last
token to the 5th token after it), measured in the same requests. Claims scored at the end are timed from the
answer's last token but one to the final chunk (which holds the last token and waits for the scores). Output
tokens/s of each mode: answer tokens over the phase's wall time.
Rounds alternate the modes' order so that drift in the machine's load hits all alike; each prompt is sent once
(a prompt sent again would hit vLLM's prefix cache).

    python benchmarks/live_claims.py                    # CPU defaults, report in benchmarks/results/live_claims_cpu.md
    python benchmarks/live_claims.py --requests 8 --concurrency 4 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]

MODEL = "smollm2-135m-instruct"
TEMPLATE = "{query} Explain your answer in a short paragraph."
MAX_TOKENS = 128
MODES = {"off": False, "end": {"claims": True}, "live": {"claims": "live"}}
NEXT_TOKENS = 5  # the reference: the next sentence's first tokens


@dataclass
class Phase:
    tokens: int = 0
    wall_s: float = 0.0
    live_latency_s: list[float] = field(default_factory=list)  # claim's last token -> its scores
    next_tokens_s: list[float] = field(default_factory=list)  # claim's last token -> the 5th token after it
    end_latency_s: list[float] = field(default_factory=list)  # answer's last token but one -> final chunk (scores)
    live_claims: int = 0
    claims: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


async def one(client: openai.AsyncOpenAI, prompt: str, mode: str, phase: Phase) -> None:
    extra = {"return_token_ids": True, "semgrad": MODES[mode]}
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body=extra,
    )
    token_at: list[float] = []  # arrival time of each answer token
    live: list[tuple[float, dict]] = []
    final_at, final = 0.0, None
    async for chunk in stream:
        now = time.perf_counter()
        for c in chunk.choices:
            token_at += [now] * len((c.model_extra or {}).get("token_ids") or [])
            semgrad = (c.model_extra or {}).get("semgrad")
            if c.finish_reason is not None:
                final_at, final = now, semgrad
            elif semgrad:
                live += [(now, claim) for claim in semgrad["claims"]]
    phase.tokens += len(token_at)
    if final and "claims" in final and token_at:
        phase.claims += len(final["claims"])
        if mode == "end" and len(token_at) > 1:  # the final chunk holds the last token and waits for the scores
            phase.end_latency_s.append(final_at - token_at[-2])
    for arrived, claim in live:
        last = claim["token_end"] - 1
        phase.live_claims += 1
        phase.live_latency_s.append(arrived - token_at[last])
        if last + NEXT_TOKENS < len(token_at):
            phase.next_tokens_s.append(token_at[last + NEXT_TOKENS] - token_at[last])


async def run(url: str, prompts: list[str], mode: str, concurrency: int, phase: Phase) -> None:
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0) as client:

        async def bounded(prompt: str) -> None:
            async with limit:
                await one(client, prompt, mode, phase)

        start = time.perf_counter()
        await asyncio.gather(*(bounded(p) for p in prompts))
        phase.wall_s += time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(phases: dict[str, Phase], args: argparse.Namespace) -> str:
    live, end, off = phases["live"], phases["end"], phases["off"]
    p50, p99 = quantile(live.live_latency_s, 0.5), quantile(live.live_latency_s, 0.99)
    ref = statistics.median(live.next_tokens_s) if live.next_tokens_s else float("nan")
    ratio = live.tokens_per_s / end.tokens_per_s if end.tokens_per_s else float("nan")
    lines = [
        "# Live claims: latency to a sentence's scores and output tokens/s (CPU)",
        "",
        f"`python benchmarks/live_claims.py --requests {args.requests} --concurrency {args.concurrency} --rounds "
        f"{args.rounds}` "
        f"on {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores; the "
        "default model in "
        f"float32, chat load ({MAX_TOKENS}-token answers, temperature 0), {args.concurrency} requests in flight; "
        "modes alternate per round.",
        "",
        "| mode | output tok/s | claims | scored live |",
        "|---|---|---|---|",
        *(f"| {name} | {p.tokens_per_s:.1f} | {p.claims} | {p.live_claims} |" for name, p in phases.items()),
        "",
        f"- live claims, last token → scores: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
        f"({len(live.live_latency_s)} claims)",
        f"- the next sentence's first {NEXT_TOKENS} tokens (same requests): median {ref * 1000:.0f} ms; "
        f"p50 latency / that = {p50 / ref:.2f}x (goal ≤ 2x)",
        "- claims at the end, the answer's last token but one → final chunk (its last token and scores): p50 "
        f"{quantile(end.end_latency_s, 0.5) * 1000:.0f} ms, "
        f"p99 {quantile(end.end_latency_s, 0.99) * 1000:.0f} ms",
        f"- output tokens/s, live / at the end: {ratio:.2f}x (goal ≥ 0.8x); live / scoring off: "
        f"{live.tokens_per_s / off.tokens_per_s:.2f}x; at the end / off: {end.tokens_per_s / off.tokens_per_s:.2f}x",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per mode per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "live_claims_cpu.md")
    parser.add_argument("--serve-args", default="", help="more semgrad-serve serve options")
    args = parser.parse_args()
    queries = [
        json.loads(line)["query"] for line in (ROOT / "data" / "truthfulqa" / "test.jsonl").read_text().splitlines()
    ]
    prompts = iter(TEMPLATE.format(query=q) for q in queries)
    log = Path(tempfile.mkdtemp()) / "semgrad.log"
    port = free_port()
    serve_args = ["--dtype", "float32", *args.serve_args.split(), "--", "--kv-cache-memory-bytes", str(1 << 30)]
    phases = {mode: Phase() for mode in MODES}
    with running_server(serve_command(port, *serve_args), port, log) as server:
        for mode in MODES:  # warm-up: one-off costs of each kind of request
            asyncio.run(
                run(server.url, [next(prompts) for _ in range(args.concurrency)], mode, args.concurrency, Phase())
            )
        for round_ in range(args.rounds):
            for mode in list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]:
                asyncio.run(
                    run(server.url, [next(prompts) for _ in range(args.requests)], mode, args.concurrency, phases[mode])
                )
                print(f"round {round_ + 1} {mode}: {phases[mode].tokens_per_s:.1f} tok/s so far", file=sys.stderr)
    text = report(phases, args)
    print(f"server log: {log}", file=sys.stderr)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
