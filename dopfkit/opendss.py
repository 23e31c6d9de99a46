"""OpenDSS as the reference: solve the same snapshot and return its node voltages."""
from __future__ import annotations

import time

import numpy as np
import opendssdirect as dss
import pandas as pd

from dopfkit.network.opendss_import import compile_case, solve_snapshot


def opendss_voltages(master, tolerance: float = 1e-10) -> pd.Series:
    """Complex node voltages (V) of the snapshot, controls frozen after they settle.

    ``.attrs["tolerance"]`` holds the tolerance OpenDSS actually converged to.
    """
    compile_case(master)
    reached = solve_snapshot(master, tolerance)
    v = current_voltages()
    v.attrs["tolerance"] = reached
    return v


def current_voltages() -> pd.Series:
    """Complex node voltages (V) of OpenDSS's present solution, by lower-case node name."""
    v = np.asarray(dss.Circuit.AllBusVolts())
    return pd.Series(v[0::2] + 1j * v[1::2], index=[n.lower() for n in dss.Circuit.AllNodeNames()])


def compare(result, master=None, tolerance: float = 1e-10) -> pd.Series:
    """|V_dopfkit - V_opendss| per node, in pu of each node's base."""
    net = result.network
    ref = opendss_voltages(master or net.feeder.master, tolerance).reindex(net.nodes)
    return (result.voltages - ref / net.vbase).abs().rename("abs_error_pu")


def timed_solve() -> float:
    """Wall time (s) of one OpenDSS ``Solve`` of the compiled case."""
    t = time.perf_counter()
    dss.Text.Command("Solve")
    return time.perf_counter() - t
