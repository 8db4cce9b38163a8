"""Scale-out across machines, on one: two ``semgrad-serve serve`` replicas behind nginx, every answer through it scored.

Each replica is a whole server (API server, engine, scoring service), as it would be on its own machine; here
each gets one of the two cores for generation (``VLLM_CPU_OMP_THREADS_BIND``) and a small KV cache, so that both
fit. nginx (Debian's; ``apt-get install -y nginx``) balances them with ``least_conn`` and streams through
unbuffered. Chat requests, whole and streamed, go through nginx; each answer must carry scores equal to the offline
``Scorer``'s (1e-4, float32), both replicas must have answered (nginx's ``X-Upstream`` header), and each replica's
``/metrics`` must count exactly the answers it served. Writes a Markdown report.

    python benchmarks/replicas_proxy.py          # report in benchmarks/results/replicas_proxy_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]


SCORE_KEYS = ("semgrad", "paragrad", "hybridgrad", "mean_entropy", "score")
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "Name a planet.",
    "What gas do plants take in?",
    "What is 2 + 2?",
    "Which ocean is the largest?",
    "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?",
    "What is the largest mammal?",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Which planet is known as the Red Planet?",
]

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream semgrad {{
        least_conn;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://semgrad;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # stream tokens and the final scored chunk as they come
            proxy_read_timeout 600s;      # an answer waits for its scores
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def scored_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^semgrad_answers_scored_total (\S+)$", text, re.M)[1])


async def ask_all(
    url: str, model: str, questions: list[str], stream: bool
) -> list[tuple[str, list[int], list[int], dict]]:
    """Per question: (replica address, prompt ids, answer ids, the answer's "semgrad" object), through the proxy."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0) as client:

        async def one(question: str) -> tuple[str, list[int], list[int], dict]:
            kwargs = dict(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=24,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            if not stream:
                raw = await client.chat.completions.with_raw_response.create(**kwargs)
                response = raw.parse()
                choice = response.choices[0]
                ids = choice.model_extra["token_ids"]
                return (
                    raw.headers["x-upstream"],
                    response.model_extra["prompt_token_ids"],
                    ids,
                    choice.model_extra["semgrad"],
                )
            raw = await client.chat.completions.with_raw_response.create(**kwargs, stream=True)
            prompt, answer, semgrad = None, [], None
            async for chunk in raw.parse():
                prompt = chunk.model_extra.get("prompt_token_ids") or prompt
                for choice in chunk.choices:
                    answer += choice.model_extra.get("token_ids") or []
                    semgrad = choice.model_extra.get("semgrad") or semgrad
            return raw.headers["x-upstream"], prompt, answer, semgrad

        return await asyncio.gather(*(one(q) for q in questions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="each replica's KV cache (default: 256)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replicas_proxy_cpu.md")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")

    from semgrad_serve.model.loading import resolve_model
    from semgrad_serve.scoring.scorer import Scorer

    model_dir = resolve_model(None).resolve()
    work = Path(tempfile.mkdtemp(prefix="semgrad-replicas-"))
    cores = sorted(os.sched_getaffinity(0))
    replicas = []
    with ExitStack() as stack:
        for i in range(2):
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)]),
            }
            command = serve_command(
                port,
                "--dtype",
                "float32",
                "--max-batch",
                "8",
                "--",
                "--kv-cache-memory-bytes",
                str(args.kv_cache_mib << 20),
                "--max-model-len",
                "4096",
            )
            replicas.append(stack.enter_context(running_server(command, port, work / f"replica{i}.log", env)))
        proxy_port = free_port()
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / name).mkdir()
        servers = "\n".join(f"        server {r.url.removeprefix('http://')};" for r in replicas)
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, servers=servers, port=proxy_port))
        proxy = subprocess.Popen([nginx, "-c", str(work / "nginx.conf"), "-p", str(work), "-g", "daemon off;"])
        stack.callback(proxy.wait, 30)
        stack.callback(proxy.terminate)
        url = f"http://127.0.0.1:{proxy_port}"
        for _ in range(50):
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        before = [scored_total(r.url) for r in replicas]
        start = time.perf_counter()
        answers = asyncio.run(ask_all(url, model_dir.name, QUESTIONS, stream=False))
        answers += asyncio.run(ask_all(url, model_dir.name, QUESTIONS, stream=True))
        wall = time.perf_counter() - start
        after = [scored_total(r.url) for r in replicas]

    scorer = Scorer.from_pretrained(model_dir)
    worst, failures = 0.0, []
    for upstream, prompt, answer, semgrad in answers:
        if not isinstance(semgrad, dict) or "error" in semgrad:
            failures.append(f"{upstream}: {semgrad}")
            continue
        (offline,) = scorer.score([(prompt, answer)])
        expected = scorer.report(offline)
        worst = max(worst, *(abs(semgrad[k] - expected[k]) / abs(expected[k]) for k in SCORE_KEYS))
    served = Counter(upstream for upstream, *_ in answers)
    addresses = [r.url.removeprefix("http://") for r in replicas]
    counted = [a - b for a, b in zip(after, before)]
    checks = {
        "every answer scored": not failures,
        "scores equal offline (rel ≤ 1e-4)": worst <= 1e-4,
        "both replicas answered": all(served[a] > 0 for a in addresses),
        "each replica's /metrics counts the answers it served": counted == [served[a] for a in addresses],
    }
    lines = [
        "# Two semgrad-serve replicas behind nginx (CPU)",
        "",
        f"- {version}; upstream `least_conn`, `proxy_buffering off`; each replica: default model, float32, "
        f"KV cache {args.kv_cache_mib} MiB, generation bound to its own core",
        f"- load: {len(QUESTIONS)} chat requests at once, whole, then {len(QUESTIONS)} streamed; greedy, max_tokens 24",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; wall time {wall:.1f} s",
        "",
        "| replica | answers served (nginx X-Upstream) | answers counted in its /metrics |",
        "|---|---|---|",
        *(f"| {i} ({a}) | {served[a]} | {c:.0f} |" for i, (a, c) in enumerate(zip(addresses, counted))),
        "",
        f"- largest relative difference to the offline scores: {worst:.1e}",
        *(f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in checks.items()),
        *(f"- failure: {f}" for f in failures),
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(json.dumps(checks))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
