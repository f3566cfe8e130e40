"""Shared helpers for the benchmark scripts: aligned text tables and JSON results with machine info.

    from _table import print_table, write_json
    print_table("derivation time (s)", ["N", "units", "median"], [[256, 4096, 0.41]])
    write_json("out/bench.json", {"derivation": [...]})

Numbers are right-aligned, text left-aligned; floats get a compact general format
(`fmt_value`). Pass pre-formatted strings for full control over a column.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt_value(value: object, digits: int = 3) -> str:
    """A cell as text: floats to `digits` significant figures, None as '-', the rest via str()."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 10 ** (digits + 2) or abs(value) < 10 ** -(digits)):
            return f"{value:.{max(digits - 1, 0)}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                 *, digits: int = 3) -> str:
    """The table as text: a title line, a header, a rule, then one line per row."""
    cells = [[fmt_value(v, digits) for v in row] for row in rows]
    for index, row in enumerate(cells):
        if len(row) != len(columns):
            raise ValueError(f"row {index} has {len(row)} cells for {len(columns)} columns")
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(_is_number(r[i]) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [title, line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                *, digits: int = 3) -> None:
    """Print `format_table(...)` followed by a blank line, flushed (benchmarks run for minutes)."""
    print(format_table(title, columns, rows, digits=digits) + "\n", flush=True)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: python, torch, CPU count, platform, date (UTC)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_affinity"] = None
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - every bench has numpy
        info["numpy"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        info["torch"] = None
    return info


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays, tuples, paths and non-finite floats into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy array or scalar
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` plus a `machine` entry (machine_info) as indented JSON; creates parents."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"machine": machine_info(), **_jsonable(payload)}
    target.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return target
