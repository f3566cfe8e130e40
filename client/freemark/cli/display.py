"""Output for people and machines: aligned key/value tables, and one JSON object for `--json`.

`out` defaults to the sys.stdout of the moment of the call, not of import, so a redirected
stdout (contextlib.redirect_stdout, pytest's capsys) is honoured.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO


def format_value(value: Any) -> str:
    """Readable form of a field: p-values in scientific notation, bytes in hex."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0.0 or (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def print_fields(title: str, fields: Mapping[str, Any], out: TextIO | None = None) -> None:
    """A two-column table with a title line."""
    out = sys.stdout if out is None else out
    width = max(len(k) for k in fields)
    print(title, file=out)
    print("-" * max(len(title), width + 20), file=out)
    for key, value in fields.items():
        print(f"  {key.ljust(width)}  {format_value(value)}", file=out)


def print_rows(columns: list[str], rows: list[list[Any]], out: TextIO | None = None) -> None:
    """A plain aligned table with a header row."""
    out = sys.stdout if out is None else out
    text = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def print_json(payload: Mapping[str, Any], out: TextIO | None = None) -> None:
    """Exactly one JSON object on one line (bytes as hex)."""
    out = sys.stdout if out is None else out
    print(json.dumps(_jsonable(payload), sort_keys=True), file=out)
