"""Write dopfkit/feeders_manifest.json: the files each downloadable IEEE feeder needs and their sha256.

Usage: python scripts/make_feeder_manifest.py [FEEDERS_DIR]   (default: $DOPFKIT_FEEDERS_DIR)

FEEDERS_DIR mirrors electricdss-tst's Version8/Distrib/IEEETestCases at the commit named in its SOURCE.txt,
with the repository's License.txt saved as LICENSE.txt. A feeder needs every file of its folder plus
whatever its master reaches, transitively, through Redirect/Compile/BusCoords/LatLongCoords and
``file=`` references (for example 13Bus/IEEELineCodes.DSS redirects ../IEEELineCodes.DSS). The output is
sorted, so rerunning on the same folder gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dopfkit.feeders import FEEDERS  # noqa: E402

UPSTREAM_FOLDER = "Version8/Distrib/IEEETestCases"
UPSTREAM_PATHS = {"LICENSE.txt": "License.txt"}  # files outside the folder, by their path in the repository
COMMENTS = re.compile(r"/\*.*?\*/|(?://|!).*?$", re.S | re.M)
REFERENCE = re.compile(
    r"^\s*(?:redirect|compile|buscoords|latlongcoords)\s+\"?([^\"\s]+)|\bfile\s*=\s*\"?([^\"\s)]+)",
    re.I | re.M,
)


def references(path: Path) -> set[Path]:
    """Files one OpenDSS script refers to, resolved against its own folder."""
    text = COMMENTS.sub("", path.read_text(errors="replace"))
    return {(path.parent / (a or b)).resolve() for a, b in REFERENCE.findall(text)}


def closure(master: Path) -> set[Path]:
    """The master and every file it reaches; fails on a reference that does not exist."""
    seen: set[Path] = set()
    todo = [master.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        if not path.is_file():
            raise SystemExit(f"{master}: reference {path} does not exist")
        seen.add(path)
        if path.suffix.lower() == ".dss":
            todo.extend(references(path))
    return seen


def main(src: Path) -> None:
    commit = re.search(r"^commit:\s*([0-9a-f]{40})\s*$", (src / "SOURCE.txt").read_text(), re.M)
    if commit is None:
        raise SystemExit(f"{src / 'SOURCE.txt'} names no commit")
    feeders = {}
    for name, spec in FEEDERS.items():
        if not (src / spec.folder / spec.master).is_file():
            print(f"{name}: {spec.folder}/{spec.master} not in {src}, not downloadable")
            continue
        files = {p.resolve() for p in (src / spec.folder).rglob("*") if p.is_file()}
        files |= closure(src / spec.folder / spec.master) | {(src / "LICENSE.txt").resolve()}
        feeders[name] = sorted(p.relative_to(src.resolve()).as_posix() for p in files)
    all_files = sorted({rel for rels in feeders.values() for rel in rels})
    manifest = {
        "repository": "dss-extensions/electricdss-tst",
        "commit": commit.group(1),
        "folder": UPSTREAM_FOLDER,
        "upstream_paths": UPSTREAM_PATHS,
        "feeders": feeders,
        "sha256": {rel: hashlib.sha256((src / rel).read_bytes()).hexdigest() for rel in all_files},
    }
    out = REPO / "dopfkit" / "feeders_manifest.json"
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {len(feeders)} feeders, {len(all_files)} files")


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DOPFKIT_FEEDERS_DIR")
    if not arg:
        raise SystemExit(__doc__)
    main(Path(arg))
