"""The command line: per-line errors, order, messages instead of tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semgrad_serve.cli import main
from semgrad_serve.errors import ItemError

from conftest import FLOAT32_BATCH_REL


def test_score_keeps_order_and_reports_bad_lines(tmp_path, default_scorer, capsys) -> None:
    good = [
        {"question": "What is the capital of France?", "answer": "Paris."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}], "answer": "Shakespeare"},
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
    assert "scored 2 of 9 lines" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["score", "--input", "/nonexistent.jsonl", "--output", "/tmp/x.jsonl"], "cannot read /nonexistent.jsonl"),
        (["score", "--input", "/dev/null", "--output", "/tmp/x.jsonl", "--batch-size", "0"], "--batch-size"),
        (["ask", "  "], "question is empty"),
        (["ask", "Hi", "--model", "/tmp"], "not a Hugging Face model directory"),
        (["ask", "Hi", "--device", "nonsense"], "unknown device 'nonsense'"),
        (["ask", "Hi", "--device", "meta"], "only cpu and cuda"),
        (["score", "--input", "/dev/null", "--output", "/tmp/x.jsonl", "--kernels", "fast"], "unknown kernels 'fast'"),
        (["calibrate", "--paraphrases", "/nonexistent.jsonl", "--device", "nonsense"], "unknown device"),
        (["eval", "--dataset", "/nonexistent.jsonl", "--device", "nonsense"], "unknown device"),
    ],
)
def test_user_mistakes_print_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ask_answers_and_scores(capsys) -> None:
    assert main(["ask", "What is the capital of France?", "--max-tokens", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    scores = json.loads(out[out.index("{") :])
    assert scores["semgrad"] > 0 and scores["score"] == scores["hybridgrad"]


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
