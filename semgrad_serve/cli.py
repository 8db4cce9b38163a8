"""The ``semgrad-serve`` command: score, ask, serve, calibrate, eval.

Each subcommand's module is imported only when it runs (vLLM is slow to import).
A user mistake prints one line on stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import SemgradError

# name → (module with add_arguments(parser) and run(args), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("semgrad_serve.commands.score", "score answers in a JSONL file"),
    "ask": ("semgrad_serve.commands.ask", "answer a question with the model and show the answer's scores"),
    "calibrate": (
        "semgrad_serve.commands.calibrate",
        "SPS scan: find t* and the band for a model, write its profile and heatmap",
    ),
    "eval": (
        "semgrad_serve.commands.eval",
        "evaluate wrong-answer detection against baselines; tables, ROC plot, flag threshold",
    ),
    "serve": ("semgrad_serve.commands.serve", "run vLLM's OpenAI-compatible server with scores on every completion"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semgrad-serve", description="Hallucination flagging with SemGrad scores.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except SemgradError as exc:
        print(f"semgrad-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
