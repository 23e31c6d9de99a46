"""OpenDSS as the reference: solve the same snapshot and return its node voltages."""
from __future__ import annotations

import time

import numpy as np
import opendssdirect as dss
import pandas as pd
import scipy.sparse as sp

from dopfkit.network.opendss_import import compile_case, node_currents, solve_snapshot


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
    return compare_detail(result, master, tolerance)["abs_error_pu"]


def compare_detail(result, master=None, tolerance: float = 1e-10) -> pd.DataFrame:
    """Per node: ``abs_error_pu``; ``differential_error_pu``, the same with the common-mode (mean)
    error of each bus of two or more nodes removed, which is what phase-to-phase voltages and delta
    loads see; and ``opendss_kcl_a``, how far OpenDSS's own element currents miss Kirchhoff's
    current law there.

    ``.attrs``: ``tolerance`` OpenDSS converged to and ``opendss_repeat_pu``, how far its voltages
    move when the converged snapshot is solved once more. Together they say how sharp the
    reference itself is.
    """
    net = result.network
    ref = opendss_voltages(master or net.feeder.master, tolerance).reindex(net.nodes)
    error = result.voltages - ref / net.vbase
    out = pd.DataFrame({"abs_error_pu": error.abs(),
                        "differential_error_pu": np.abs(without_common_mode(error.to_numpy(), net.nodes)),
                        "opendss_kcl_a": kcl_mismatch().reindex(net.nodes)})
    dss.Text.Command("Solve")
    out.attrs = {"tolerance": ref.attrs["tolerance"],
                 "opendss_repeat_pu": float(np.abs(
                     (current_voltages().reindex(net.nodes) - ref) / net.vbase).max())}
    return out


def without_common_mode(error: np.ndarray, nodes: pd.Index) -> np.ndarray:
    """``error`` (one row per node, a column per scenario if 2-D) less the mean error of each bus of two
    or more nodes: what phase-to-phase voltages and delta loads see. A bus of one node keeps its error.
    """
    codes, _ = pd.factorize(nodes.str.rsplit(".", n=1).str[0])
    n = len(codes)
    bus = sp.csr_matrix((np.ones(n), (codes, np.arange(n))))           # bus x node incidence
    size = np.asarray(bus.sum(axis=1)).ravel()
    shape = (-1,) + (1,) * (np.ndim(error) - 1)
    common = bus.T @ ((bus @ error) / size.reshape(shape))
    return error - np.where((size[codes] > 1).reshape(shape), common, 0)


def kcl_mismatch() -> pd.Series:
    """|sum of the currents every element draws from a node| (A) in OpenDSS's present solution.

    Zero, to rounding, in a consistent solution: an audit of the reference that needs no model of
    ours (IEEE 9500's PV-mode steam generator misses it by 0.76 A: its reported vars are one update
    ahead of the voltages).
    """
    names = [n.lower() for n in dss.Circuit.AllNodeNames()]
    index = {n: k for k, n in enumerate(names)}
    total = np.zeros(len(names), complex)
    for element in dss.Circuit.AllElementNames():
        dss.Circuit.SetActiveElement(element)
        if dss.CktElement.Enabled():
            for node, c in node_currents():
                if node in index:
                    total[index[node]] += c
    return pd.Series(np.abs(total), index=names, name="opendss_kcl_a")


def timed_solve() -> float:
    """Wall time (s) of one OpenDSS ``Solve`` of the compiled case."""
    t = time.perf_counter()
    dss.Text.Command("Solve")
    return time.perf_counter() - t
