"""One live job's scoring time: an answer so far scored whole with its newest claim, against its claim alone.

A live job (``"semgrad": {"claims": "live"}``) scores the newest settled claim of a running answer from what vLLM
computed (the band layers' prompt keys/values, the band's inputs, the logits). Scored whole, the head works on
every row and the backward carries the whole answer's seed beside the claim's; scored for its claim alone
(``whole_answer=False``, what the server does), the band still runs over every row but the head works on the claim's
rows and the backward carries the claim's seed only. This times both on answers so far of 20, 64 and 128 tokens
(the claim: their last 20), alone and four at once (the default model, float32, one thread, as the server's scoring
thread runs), and checks the claim's scores agree. Ratios are measured side by side in one run.

    python benchmarks/live_job_cost.py
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.claims import Claim
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.scoring.shared_prefix import shared_prefix
from semgrad_serve.testing.timing import timed

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What happens if you eat watermelon seeds? Explain your answer in a short paragraph."
CLAIM_TOKENS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "live_job_cost_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scorer = Scorer.from_pretrained()
    w, band = scorer.weights, scorer.band
    prompt = scorer.prompt_ids([{"role": "user", "content": QUESTION}])
    t_star = scorer.locate_t_star(prompt)[0]
    answer = torch.randint(100, 20000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        kvs = shared_prefix(w, prompt[:t_star]).keys_values
    prefix_kv = torch.stack([torch.stack((k[0], v[0])) for k, v in kvs])[band.start :]
    rows = []
    for n in (20, 64, 128):
        so_far = answer[:n]
        with torch.no_grad():  # the band's inputs and the logits, as the server records them while generating
            out = scorer.model(torch.tensor([prompt + so_far[:-1]]), output_hidden_states=True)
        given = Given(prefix_kv, out.hidden_states[band.start][0, t_star:], out.logits[0, len(prompt) - 1 :])
        claim = Claim("", n - CLAIM_TOKENS, n)
        whole = PreparedItem(tuple(prompt), tuple(so_far), t_star, claims=(claim,))
        alone = replace(whole, whole_answer=False)
        with torch.enable_grad():
            (a,), (b,) = (score_batch(w, [it], band, scorer.kernels, given=[given]) for it in (whole, alone))
            gap = max(abs(a.claims[0].scores()[k] / b.claims[0].scores()[k] - 1) for k in ("semgrad", "paragrad"))
            times = {
                (name, batch): timed(
                    partial(score_batch, w, [it] * batch, band, scorer.kernels, given=[given] * batch), args.repeats
                )
                for name, it in (("whole", whole), ("alone", alone))
                for batch in (1, 4)
            }
        rows.append(
            f"| {n} | {times['whole', 1] * 1000:.0f} | {times['alone', 1] * 1000:.0f} | "
            f"**{times['whole', 1] / times['alone', 1]:.2f}x** | {times['whole', 4] * 1000:.0f} | "
            f"{times['alone', 4] * 1000:.0f} | **{times['whole', 4] / times['alone', 4]:.2f}x** | {gap:.1e} |"
        )
        print(rows[-1])
    text = "\n".join(
        [
            "# One live job's scoring time: the answer so far whole with its claim, against the claim alone (CPU)",
            "",
            f"`python benchmarks/live_job_cost.py`: default model, float32, 1 torch thread; median of {args.repeats} "
            f"runs after a warm-up; {time.strftime('%Y-%m-%d %H:%M')}. Each job is given what vLLM computed (band "
            f"layers' prompt keys/values before t*, band inputs, logits); the claim is the answer's last "
            f"{CLAIM_TOKENS} tokens.",
            "",
            "| answer so far (tokens) | whole + claim, 1 job (ms) | claim alone (ms) | whole / alone | 4 jobs whole "
            "(ms) | 4 jobs alone (ms) | whole / alone | claim scores, largest relative gap |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
