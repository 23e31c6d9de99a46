"""Remove run-specific metadata that papermill and Jupyter add to executed notebooks.

`make notebooks` and `make book` run this after papermill, so that re-executing a chapter changes only
its outputs (and execution counts) in version control, not hundreds of timestamps.

Removed: the notebook-level ``papermill`` block, and in every cell ``metadata.papermill``,
``metadata.execution`` and an empty ``metadata.tags`` list. Outputs, tags in use (``parameters``,
``hide-input``, ...) and everything else are kept.

Usage: python scripts/clean_nb_metadata.py NOTEBOOK [NOTEBOOK ...]
"""

from __future__ import annotations

import sys

import nbformat


def clean(path: str) -> bool:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    changed = nb.metadata.pop("papermill", None) is not None
    for cell in nb.cells:
        md = cell.get("metadata", {})
        for key in ("papermill", "execution"):
            if md.pop(key, None) is not None:
                changed = True
        if "tags" in md and not md["tags"]:
            del md["tags"]
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def main(paths: list[str]) -> int:
    for path in paths:
        if clean(path):
            print(f"clean_nb_metadata: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
