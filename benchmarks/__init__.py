"""Benchmarks: each ``python -m benchmarks.<name>`` writes one ``data/results/<name>.json``."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, out: Path) -> None:
    """The results as indented JSON (numpy scalars as floats), creating the folder if needed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float) + "\n")
