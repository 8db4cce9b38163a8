"""The command line: per-line errors, order, messages instead of tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semgrad_serve.cli import main
from semgrad_serve.errors import ItemError

from conftest import CLAIM_FIELDS, FLOAT32_BATCH_REL
from probe_by_hand import claim_row_features, probe_confidence, row_features


@pytest.mark.slow
def test_score_keeps_order_and_reports_bad_lines(tmp_path, default_scorer, capsys) -> None:
    good = [
        {"question": "What is the capital of France?", "answer": "Paris."},
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}],
            "answer": "Shakespeare",
        },
    ]
    lines = [
        json.dumps(good[0]),
        "not json",
        json.dumps({"question": "Where?"}),
        "",
        json.dumps({"question": "Why?", "answer": "  "}),
        json.dumps({"question": "word " * 9000, "answer": "long"}),
        json.dumps(good[1]),
        json.dumps([1, 2]),
        json.dumps({"messages": "hi", "answer": "x"}),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(["score", "--input", str(src), "--output", str(dst), "--batch-size", "2"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == len(lines)
    errors = {i: o["error"] for i, o in enumerate(out) if "error" in o}
    assert sorted(errors) == [1, 2, 3, 4, 5, 7, 8]
    assert errors[1].startswith("line 2: ") and "not JSON" in errors[1]
    assert "answer" in errors[2] and "empty" in errors[3] and "answer" in errors[4]
    assert "context" in errors[5] and "messages" in errors[8]

    scorer = default_scorer
    for row, src_obj in zip((out[0], out[6]), good):
        messages = src_obj.get("messages") or [{"role": "user", "content": src_obj["question"]}]
        (direct,) = scorer.score([(scorer.prompt_ids(messages), scorer.answer_ids(src_obj["answer"]))])
        assert not isinstance(direct, ItemError)
        for key in ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy"):
            assert row[key] == pytest.approx(getattr(direct, key), rel=FLOAT32_BATCH_REL)
        assert row["t_star_token"] == "<|im_start|>" and row["score"] == row["hybridgrad"]
        assert row["prompt_tokens"] == direct.prompt_tokens and row["answer_tokens"] == direct.answer_tokens
        # the confidence is the profile's probe applied (by hand) to this answer's own scores, length and token stats
        model = scorer.profile.confidence
        expected = probe_confidence(model.calibrator, row_features(row))
        assert row["confidence"] == pytest.approx(expected, rel=1e-9) and 0 < expected < 1
        assert row["min_confidence"] == model.operating_point.min_confidence
        assert row["flagged"] == (row["confidence"] < row["min_confidence"])
    assert "scored 2 of 9 lines" in capsys.readouterr().err


@pytest.mark.slow
def test_score_counts_the_stop_token_unless_turned_off(tmp_path, default_scorer) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "What is the capital of France?", "answer": "Paris."}) + "\n")
    rows = {}
    for name, flags in (("counted", ["--paragrad-tied"]), ("plain", ["--no-stop-token"])):
        assert main(["score", "--input", str(src), "--output", str(tmp_path / name), *flags]) == 0
        (rows[name],) = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    scorer = default_scorer
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    text_ids = scorer.tokenizer("Paris.", add_special_tokens=False).input_ids
    for name, answer in (("counted", text_ids + [2]), ("plain", text_ids)):
        (direct,) = scorer.score([(prompt, answer)])
        assert rows[name]["semgrad"] == pytest.approx(direct.semgrad, rel=FLOAT32_BATCH_REL)
        assert rows[name]["stop_token"] == (name == "counted") and rows[name]["answer_tokens"] == len(answer)
    assert rows["plain"]["paragrad_tied"] is None and rows["counted"]["paragrad_tied"] > rows["counted"]["paragrad"]


@pytest.mark.slow
def test_score_claims(tmp_path, default_scorer) -> None:
    """``--claims``: each sentence's text, tokens, scores and flag, as the scorer gives them; none without it."""
    question, answer = "Tell me about Paris.", "Paris is the capital of France. It is known for the Eiffel Tower."
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": question, "answer": answer}) + "\n")
    for flags, name in (([], "plain"), (["--claims"], "claims")):
        assert main(["score", "--input", str(src), "--output", str(tmp_path / name), *flags]) == 0
    (plain,) = [json.loads(line) for line in (tmp_path / "plain").read_text().splitlines()]
    (row,) = [json.loads(line) for line in (tmp_path / "claims").read_text().splitlines()]
    assert "claims" not in plain and [c["text"] for c in row["claims"]] == [
        "Paris is the capital of France.",
        "It is known for the Eiffel Tower.",
    ]
    pair = (default_scorer.prompt_ids([{"role": "user", "content": question}]), default_scorer.answer_ids(answer))
    (direct,) = default_scorer.score([pair], claims=True)
    for got, want in zip(row["claims"], default_scorer.report(direct)["claims"]):
        assert list(got) == list(CLAIM_FIELDS)
        assert {k: got[k] for k in ("text", "token_start", "token_end")} == {
            k: want[k] for k in ("text", "token_start", "token_end")
        }
        for key in (
            "semgrad",
            "paragrad",
            "hybridgrad",
            "mean_entropy",
            "confidence",
        ):  # float32; the shared scorer may reuse a cached prefix
            assert got[key] == pytest.approx(want[key], rel=FLOAT32_BATCH_REL), key
        # the profile's claims' probe on the claim's own scores, length (the stop token, in the last claim, not
        # counted) and mean entropy
        length = (
            got["token_end"] - got["token_start"] - (got["token_end"] == row["answer_tokens"] and row["stop_token"])
        )
        expected = probe_confidence(default_scorer.profile.confidence.claim_calibrator, claim_row_features(got, length))
        assert got["confidence"] == pytest.approx(expected, rel=1e-9) and 0 < got["confidence"] < 1
        assert got["flagged"] == (got["confidence"] < row["min_confidence"])
    assert row["claims"][-1]["token_end"] == row["answer_tokens"] and row["semgrad"] == pytest.approx(
        plain["semgrad"], rel=1e-6
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["score", "--input", "/nonexistent.jsonl", "--output", "/tmp/x.jsonl"], "cannot read /nonexistent.jsonl"),
        (["score", "--input", "ANSWERS", "--output", "/tmp/x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["ask", "  "], "question is empty"),
        (["ask", "Hi", "--model", "/tmp"], "not a Hugging Face model directory"),
        (
            ["ask", "Hi", "--model", "qwen"],
            "'qwen' is neither a model directory nor a packaged model (smollm2-135m-instruct, qwen2.5",
        ),
        (["ask", "Hi", "--device", "nonsense"], "unknown device 'nonsense'"),
        (["ask", "Hi", "--device", "meta"], "only cpu and cuda"),
        (["score", "--input", "ANSWERS", "--output", "/tmp/x.jsonl", "--kernels", "fast"], "unknown kernels 'fast'"),
        (["calibrate", "--paraphrases", "/nonexistent.jsonl", "--device", "nonsense"], "unknown device"),
        (["eval", "--dataset", "/nonexistent.jsonl", "--device", "nonsense"], "unknown device"),
    ],
)
def test_user_mistakes_print_one_line(argv: list[str], message: str, tmp_path, capsys) -> None:
    answers = tmp_path / "answers.jsonl"  # ANSWERS: a valid input, so that the option is what is refused
    answers.write_text(json.dumps({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}) + "\n")
    assert main([str(answers) if a == "ANSWERS" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_ask_answers_and_scores(capsys, default_scorer) -> None:
    assert main(["ask", "What is the capital of France?", "--max-tokens", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    scores = json.loads(out[out.index("{") :])
    assert scores["semgrad"] > 0 and scores["score"] == scores["hybridgrad"]
    # the printed answer scored again: its confidence is the profile's probe on that answer's numbers (by hand)
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    answer = out[: out.index("{")].strip()
    (direct,) = default_scorer.score([(prompt, default_scorer.answer_ids(answer, stop_token=scores["stop_token"]))])
    row = default_scorer.report(direct)
    assert scores["answer_tokens"] == row["answer_tokens"] and scores["semgrad"] == pytest.approx(
        row["semgrad"], rel=FLOAT32_BATCH_REL
    )
    expected = probe_confidence(default_scorer.profile.confidence.calibrator, row_features(row))
    assert scores["confidence"] == pytest.approx(expected, rel=1e-3)
    assert 0 < scores["confidence"] < 1 and scores["flagged"] == (scores["confidence"] < scores["min_confidence"])


def test_help_imports_no_heavy_module() -> None:
    """``--help`` of the command and of every subcommand builds the parser from light modules only (torch alone
    takes seconds to import)."""
    code = """
import sys
from semgrad_serve.cli import COMMANDS, main
for argv in ([], *([name] for name in COMMANDS)):
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
print("heavy:", *(m for m in ("torch", "triton", "vllm", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: semgrad-serve serve" in out
    assert out.splitlines()[-1] == "heavy:"


def run_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """The installed ``semgrad-serve`` in a new process, with the default model's cache in a folder that does not
    exist yet: a run that got as far as looking for the model creates it (``packaged_model_dir``)."""
    command = Path(sys.executable).with_name("semgrad-serve")
    env = {**os.environ, "SEMGRAD_SERVE_CACHE": str(tmp_path / "model-cache")}
    return subprocess.run([str(command), *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit status 2 and one line on stderr, ``semgrad-serve COMMAND: error: ...``, holding every fragment."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"semgrad-serve {command}: error: ")
    for fragment in fragments:
        assert fragment in line


@pytest.fixture
def answers(tmp_path) -> Path:
    """A valid ``score`` input of one line."""
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}) + "\n")
    return path


def test_ask_refuses_no_answer_tokens_before_loading(tmp_path) -> None:
    proc = run_cli(tmp_path, "ask", "Who wrote Hamlet?", "--max-tokens", "0")
    assert_one_line_error(proc, "ask", "--max-tokens must be at least 1")
    assert not (tmp_path / "model-cache").exists()


@pytest.mark.parametrize(
    "command,files,message",
    [
        (["ask", "Hi"], ["config.json", "model.safetensors"], "has no tokenizer (none of tokenizer.json"),
        (["serve"], ["config.json", "tokenizer.json"], "has no weights (no *.safetensors or pytorch_model*.bin file)"),
    ],
)
def test_incomplete_model_directory(tmp_path, command, files, message) -> None:
    """The files are empty: only their presence is checked, before anything is read from them (offline commands
    and serve share the check)."""
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        (model / name).touch()
    proc = run_cli(tmp_path, *command, "--model", str(model))
    assert_one_line_error(proc, command[0], str(model), message)


@pytest.mark.parametrize(
    "output,message",
    [("missing/scores.jsonl", "the folder missing does not exist"), (".", "--output . is a directory")],
)
def test_score_output_checked_before_scoring(tmp_path, answers, output, message) -> None:
    proc = run_cli(tmp_path, "score", "--input", str(answers), "--output", output)
    assert_one_line_error(proc, "score", message)
    assert not (tmp_path / "model-cache").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "--input", "answers.jsonl", "--output", "scores.jsonl", "--profile", "missing.json"],
        ["ask", "Who wrote Hamlet?", "--profile", "missing.json"],
        ["calibrate", "--paraphrases", "answers.jsonl", "--base-profile", "missing.json"],
    ],
)
def test_missing_profile_before_loading(tmp_path, answers, argv) -> None:
    proc = run_cli(tmp_path, *argv)
    assert_one_line_error(proc, argv[0], "cannot read profile missing.json: No such file or directory")
    assert not (tmp_path / "model-cache").exists() and not (tmp_path / "scores.jsonl").exists()


def test_calibrate_positions_before_loading(tmp_path, data_dir) -> None:
    proc = run_cli(
        tmp_path, "calibrate", "--paraphrases", str(data_dir / "sciq" / "paraphrase.jsonl"), "--positions", "4"
    )
    assert_one_line_error(proc, "calibrate", "scan at least 8 prompt positions (got 4)")
    assert not (tmp_path / "model-cache").exists() and not (tmp_path / "profile.json").exists()


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "in.jsonl is empty"),
        ("\n  \n", "in.jsonl is empty"),
        ("not json\n\n[1, 2]\n", "in.jsonl has no JSON object line (line 1 is not JSON: Expecting value)"),
        ('"a string"\n', "in.jsonl has no JSON object line (line 1 is not a JSON object)"),
    ],
)
def test_score_input_without_answers(tmp_path, text, message) -> None:
    (tmp_path / "in.jsonl").write_text(text)
    proc = run_cli(tmp_path, "score", "--input", "in.jsonl", "--output", "out.jsonl")
    assert_one_line_error(proc, "score", message)
    assert not (tmp_path / "model-cache").exists() and not (tmp_path / "out.jsonl").exists()
