"""``calibrate`` and ``eval`` end to end on a handful of items, and bad input files."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from semgrad_serve.cli import main
from semgrad_serve.evaluation import judges
from semgrad_serve.scoring.profiles import ModelProfile
from semgrad_serve.testing.naive import naive_paragrad_tied

from conftest import FLOAT32_BATCH_REL


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def first_lines(path, n):
    with open(path) as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.mark.slow
def test_calibrate_end_to_end(tmp_path, default_scorer, data_dir):
    source = first_lines(data_dir / "sciq" / "paraphrase.jsonl", 3)
    rows = [json.loads(line) for line in source]
    for r in rows:
        r["paraphrases"] = r["paraphrases"][:2]
    para = write_lines(tmp_path / "para.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--paraphrases", str(para), "--positions", "8", "--out", str(out)]) == 0
    profile = ModelProfile.load(out)
    png = tmp_path / "profile.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    cal = profile.calibration["sps"]
    n_states = default_scorer.weights.n_layers + 1
    assert cal["queries"] == 3 and cal["prompts"] == 9 and cal["positions"] == list(range(-8, 0))
    assert np.asarray(cal["sps"]).shape == (n_states, 8)
    first, last = profile.band
    assert 1 <= first <= last <= n_states - 2 and profile.threshold is None
    # t* is a template token, and the rule finds the scanned position in a new prompt
    assert not cal["position_tokens"][cal["positions"].index(cal["t_star_position"])].endswith("*")
    from semgrad_serve.evaluation.prompts import paper_messages
    from semgrad_serve.scoring.scorer import Scorer

    scorer = Scorer(default_scorer.weights, default_scorer.tokenizer, profile)
    prompt = scorer.prompt_ids(paper_messages("Which gas do plants absorb?"))
    assert scorer.prepare(prompt, scorer.answer_ids("Carbon dioxide")).t_star == len(prompt) + cal["t_star_position"]


@pytest.mark.slow
def test_eval_end_to_end_with_hf_generator(tmp_path, default_scorer, data_dir):
    data = write_lines(
        tmp_path / "qa.jsonl",
        first_lines(data_dir / "sciq" / "test.jsonl", 3) + first_lines(data_dir / "truthfulqa" / "test.jsonl", 1),
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "eval",
        "--dataset",
        str(data),
        "--generator",
        "hf",
        "--samples",
        "2",
        "--max-tokens",
        "12",
        "--judge",
        "containment",
        "--flag-target",
        "recall:0.5",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    assert main(args + ["--paragrad-tied"]) == 0
    assert main(args + ["--no-stop-token", "--prefix", "old"]) == 0  # the old convention, on the cached answers
    assert main(args + ["--cheap-baselines", "--prefix", "cheap"]) == 0  # NLL and entropy from the gradient pass
    report = json.loads((out / "eval.json").read_text())
    ds = report["datasets"]["qa"]
    assert ds["questions"] == 4 and report["judge"]["name"] == "containment"
    md = (out / "eval.md").read_text()
    for label in (
        "SemGrad",
        "ParaGrad",
        "HybridGrad",
        "Mean token NLL",
        "Max token NLL",
        "Mean token entropy",
        "ExGrad",
        "P(True)",
        "Lexical similarity",
        "Semantic entropy",
        "Judge: **containment**",
    ):
        assert label in md
    assert (out / "eval_roc.png").read_bytes()[:4] == b"\x89PNG"
    items = [json.loads(line) for line in gzip.open(out / "eval_items.jsonl.gz", "rt")]
    old = [json.loads(line) for line in gzip.open(out / "old_items.jsonl.gz", "rt")]
    assert len(items) == 4 and all(set(i["correct"]) == set(judges.JUDGES) for i in items)
    assert "Stop token: counted" in md and "Stop token: not counted" in (out / "old.md").read_text()
    cheap = [json.loads(line) for line in gzip.open(out / "cheap_items.jsonl.gz", "rt")]
    for full, fast in zip(items, cheap):  # the gradient pass's statistics = a separate forward's
        for key in ("mean_nll", "max_nll", "mean_entropy"):
            assert fast["scores"][key] == pytest.approx(full["scores"][key], rel=1e-4, abs=1e-6), key
        assert "p_true" not in fast["scores"] or fast["scores"]["p_true"] is None
    assert "P(True) not run" in (out / "cheap.md").read_text()

    # independent checks: the forward-pass NLL = the generator's own (incremental) log-probs of the same tokens;
    # the gradient scores = the scorer on the same token ids
    (cached,) = cache.glob("generations_qa_*.json.gz")
    gens = json.loads(gzip.decompress(cached.read_bytes()))
    from semgrad_serve.evaluation.prompts import paper_messages

    queries = [json.loads(line)["query"] for line in data.read_text().splitlines()]
    for item, answer, q in zip(items, gens["answers"], queries):
        assert len(gens["samples"][item["index"]]) == 2
        if not answer["token_ids"]:
            assert "excluded" in item
            continue
        ids = answer["token_ids"]  # as generated: through the EOS token when generation ended on it
        assert item["ended_on_eos"] == (ids[-1] == 2) == (len(ids) < 12 or ids[-1] == 2)
        assert item["answer_tokens"] == len(ids) - item["ended_on_eos"] == old[item["index"]]["answer_tokens"]
        assert item["scores"]["mean_nll"] == pytest.approx(-np.mean(answer["logprobs"]), rel=1e-3, abs=1e-4)
        prompt = default_scorer.prompt_ids(paper_messages(q))
        expected, without = default_scorer.score([(prompt, ids), (prompt, default_scorer.without_stop_token(ids))])
        for scored, result in ((item, expected), (old[item["index"]], without)):
            assert scored["scores"]["semgrad"] == pytest.approx(result.semgrad, rel=FLOAT32_BATCH_REL)
            assert scored["scores"]["hybridgrad"] == pytest.approx(result.hybridgrad, rel=FLOAT32_BATCH_REL)
        with torch.enable_grad():
            assert item["scores"]["paragrad_tied"] == pytest.approx(
                naive_paragrad_tied(default_scorer.model, prompt, ids), rel=1e-4
            )
    assert any(i["ended_on_eos"] for i in items)

    # the threshold meets its target on these answers and lands in the profile the server reads
    t = report["threshold"]
    profile = ModelProfile.load(out / "eval_profile.json")
    assert profile.threshold == pytest.approx(t["threshold"]) and profile.score == "hybridgrad"
    wrong = np.array([not i["correct"]["containment"] for i in items if "excluded" not in i])
    flagged = np.array([i["scores"]["hybridgrad"] > t["threshold"] for i in items if "excluded" not in i])
    if wrong.any():
        assert flagged[wrong].mean() >= 0.5 and t["recall"] == pytest.approx(flagged[wrong].mean())
    assert profile.calibration["flag_threshold"]["target"] == "recall"


@pytest.mark.parametrize(
    "lines,message",
    [
        (
            ['{"query": "a", "paraphrases": ["b"]}', "{not json", '{"query": "c", "paraphrases": ["d"]}'],
            "line 2 is not JSON",
        ),
        (
            ['{"query": "a", "paraphrases": ["b"]}', '{"query": "c", "paraphrases": []}'],
            "line 2: the 'paraphrases' list is empty",
        ),
        (['{"query": "a", "paraphrases": ["b"]}', '{"query": "c"}'], "line 2: field 'paraphrases' is missing"),
        (['{"paraphrases": ["b"]}', '{"query": "c", "paraphrases": ["d"]}'], "line 1: field 'query' is missing"),
        (
            ['{"query": "a", "paraphrases": ["b", 3]}', '{"query": "c", "paraphrases": ["d"]}'],
            "line 1: every paraphrase must be a non-empty string",
        ),
        (['["a list"]'], "line 1 is not a JSON object"),
    ],
)
def test_calibrate_bad_paraphrase_files(tmp_path, capsys, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    assert main(["calibrate", "--paraphrases", str(path), "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"query": "a", "truthful answer": ["b"]}', '{"query": "c"}'], "line 2: field 'truthful answer' is missing"),
        (
            ['{"query": "a", "truthful answer": []}'],
            "line 1: field 'truthful answer' is missing or not a list of strings",
        ),
        (
            ['{"query": "a", "truthful answer": ["b"]}', '{"query": "a", "truthful answer": ["", " "]}'],
            "line 2: field 'truthful answer'",
        ),
        (['{"query": "a", "truthful answer": ["b"]}', "", "nope"], "line 3 is not JSON"),
        (['{"truthful answer": ["b"]}'], "line 1: field 'query' is missing"),
    ],
)
def test_eval_bad_dataset_files(tmp_path, capsys, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    assert main(["eval", "--dataset", str(path), "--generator", "hf", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "options,message",
    [
        (["--samples", "1"], "--samples must be 0 (no sampling baselines) or at least 2"),
        (
            ["--flag-target", "f1:0.5"],
            "flag target 'f1:0.5': write precision:VALUE or recall:VALUE with 0 < VALUE ≤ 1",
        ),
    ],
)
def test_eval_bad_options(tmp_path, capsys, options, message):
    """A valid dataset, so that the option is what is refused (calibrate's --positions: test_cli.py)."""
    data = write_lines(tmp_path / "qa.jsonl", ['{"query": "a", "truthful answer": ["b"]}'])
    assert main(["eval", "--dataset", str(data), "--out", str(tmp_path / "out"), *options]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"semgrad-serve eval: error: {message}"


@pytest.mark.slow
def test_vllm_generator_matches_hf_greedy(default_scorer):
    """The vLLM path (one engine start): same greedy tokens as Hugging Face, K samples per prompt."""
    pytest.importorskip("vllm")
    from semgrad_serve.evaluation.generation import HFGenerator, VLLMGenerator
    from semgrad_serve.evaluation.prompts import paper_messages
    from semgrad_serve.model.loading import resolve_model

    prompts = [
        default_scorer.prompt_ids(paper_messages(q))
        for q in (
            "Who proposed the theory of evolution by natural selection?",
            "What is the boiling point of water in Celsius?",
        )
    ]
    hf = HFGenerator(default_scorer.model, default_scorer.tokenizer).greedy(prompts, max_tokens=10)
    generator = VLLMGenerator(resolve_model(None), default_scorer.tokenizer)
    try:
        greedy = generator.greedy(prompts, max_tokens=10)
        samples = generator.sample(prompts, 3, max_tokens=6)
    finally:
        generator.close()
    for a, b in zip(greedy, hf):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert np.allclose(a.logprobs, b.logprobs, atol=2e-3)
    assert [len(s) for s in samples] == [3, 3] and all(
        len(g.logprobs) == len(g.token_ids) <= 6 for s in samples for g in s
    )
    assert all(math.isfinite(g.mean_logprob) for s in samples for g in s)
