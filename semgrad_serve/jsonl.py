"""Reading JSON-lines files with errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import SemgradError


def read_jsonl(
    path: str | Path, keep_blank: bool = False, require_object: bool = False
) -> list[tuple[int, dict[str, Any] | str]]:
    """(line number, object) per line, or (line number, error message) for a line that is not a JSON object.
    Blank lines are skipped, or reported as errors with ``keep_blank`` (when output lines must match input lines).
    ``require_object``: a file with no JSON object on any line (empty, or only bad lines) is a ``SemgradError``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SemgradError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SemgradError(f"{path} is not UTF-8 text") from None
    out: list[tuple[int, dict[str, Any] | str]] = []
    first_bad: str | None = None  # the first non-blank line that is not a JSON object
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if keep_blank:
                out.append((number, f"line {number} is empty"))
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                obj = f"line {number} is not a JSON object"
        except json.JSONDecodeError as exc:
            obj = f"line {number} is not JSON: {exc.msg}"
        if isinstance(obj, str):
            first_bad = first_bad or obj
        out.append((number, obj))
    if require_object and not any(isinstance(obj, dict) for _, obj in out):
        raise SemgradError(f"{path} is empty" if first_bad is None else f"{path} has no JSON object line ({first_bad})")
    return out


def read_queries(path: str | Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of the first ``limit`` lines of a question file; a line that is not a JSON object
    or lacks a non-empty ``query`` string is an error naming it, and so is a file with no lines."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, obj in read_jsonl(path):
        if isinstance(obj, str):
            raise SemgradError(f"{path}: {obj}")
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise SemgradError(f"{path}: line {number}: field 'query' is missing or not a non-empty string")
        rows.append((number, obj))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise SemgradError(f"{path} has no lines")
    return rows
