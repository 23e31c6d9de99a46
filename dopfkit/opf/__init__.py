"""D-OPF: one problem (:class:`OPFProblem`), several formulations, every result checked against the
exact power flow.

``solve_opf(net, formulation=..., objective=..., ders=...)`` is the entry point the chapters use.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dopfkit.network.math_model import Network, with_injections
from dopfkit.network.primitives import source_primitive
from dopfkit.network.radial import RadialNetwork
from dopfkit.opf.problem import (
    OBJECTIVES,
    FormulationSolution,
    OPFInfeasibleError,
    OPFProblem,
    der_table,
    pv_problem,
    pv_sites,
)

FORMULATIONS = ("lindist3flow", "nlp", "socp", "sdp")


@dataclass
class OPFResult:
    """Set-points, voltages, branch flows (:attr:`flows`) and objective of one formulation, and the
    physics check."""
    problem: OPFProblem
    solution: FormulationSolution
    setpoints: pd.DataFrame        # per DER phase: node, p_kw, q_kvar
    voltages: pd.Series            # |V| (pu) the formulation predicts, by OpenDSS node
    exact: object                  # PowerFlowResult of the set-points pushed through the exact flow
    check: dict                    # max voltage error, limit violations, substation power both ways
    check_time: float

    @property
    def objective(self) -> float:
        return self.solution.objective

    @property
    def flows(self) -> pd.DataFrame:
        """Per branch phase, by the OpenDSS node it feeds: the feeding branch and the power (kW, kvar)
        it delivers there, as the formulation predicts it."""
        r, s = self.problem.radial, self.solution.flows
        fed = np.flatnonzero((r.in_branch >= 0) & (r.net_index >= 0))
        kw = s[fed] * self.problem.network.sbase / 1e3
        return pd.DataFrame({"branch": [r.branches[b].name for b in r.in_branch[fed]],
                             "p_kw": kw.real, "q_kvar": kw.imag},
                            index=self.problem.network.nodes[r.net_index[fed]])

    def summary(self) -> pd.Series:
        s = self.solution
        return pd.Series({"formulation": s.formulation, "solver": s.solver, "status": s.status,
                          "objective": s.objective, "build_s": s.build_time, "solve_s": s.solve_time,
                          **self.check})


def solve_opf(net: Network, formulation: str = "lindist3flow", objective: str = "substation_power",
              ders: pd.DataFrame | None = None, vmin: float = 0.95, vmax: float = 1.05,
              load_scale: float = 1.0, limit_nodes: str = "loads", check: bool = True,
              **options) -> OPFResult:
    """Solve one OPF and push its set-points back through the exact power flow.

    ``formulation``: ``"lindist3flow"`` (LP/QP; ``backend="highs"`` or ``"cvxpy"``), ``"nlp"``
    (exact branch flow, Pyomo + Ipopt), ``"socp"`` and ``"sdp"`` (relaxations, CVXPY). ``ders``: a
    :func:`der_table` (none: the problem has no decisions and reproduces a power flow).
    """
    if ders is None:
        ders = der_table(net, [], 0.0)
    problem = OPFProblem(net, ders, objective=objective, vmin=vmin, vmax=vmax, load_scale=load_scale,
                         limit_nodes=limit_nodes)
    solution = _formulation(formulation)(problem, **options)
    r = problem.radial
    keep = r.net_index >= 0
    voltages = pd.Series(np.sqrt(np.maximum(solution.v[keep], 0)), index=net.nodes[r.net_index[keep]],
                         name=f"vmag_{formulation}")
    setpoints = pd.DataFrame({"name": ders["name"], "node": ders["node_name"],
                              "p_kw": solution.p_der * net.sbase / 1e3,
                              "q_kvar": solution.q_der * net.sbase / 1e3,
                              "s_rated_kva": ders["s_rated"] * net.sbase / 1e3})
    t0 = time.perf_counter()
    exact, report = (check_against_powerflow(problem, solution, voltages) if check else (None, {}))
    return OPFResult(problem, solution, setpoints, voltages, exact, report, time.perf_counter() - t0)


def _formulation(name: str):
    if name == "lindist3flow":
        from dopfkit.opf.lindist3flow import solve_lindist3flow
        return solve_lindist3flow
    if name == "nlp":
        from dopfkit.opf.nlp import solve_nlp
        return solve_nlp
    if name in ("socp", "sdp"):
        from dopfkit.opf import conic
        return getattr(conic, f"solve_{name}")
    raise ValueError(f"unknown formulation {name!r}; choose one of {', '.join(FORMULATIONS)}")


def check_against_powerflow(problem: OPFProblem, solution: FormulationSolution, voltages: pd.Series):
    """Apply the set-points to the exact power flow; compare voltages and check limits there."""
    from dopfkit.powerflow import solve_powerflow
    net, ders = problem.network, problem.ders
    plant = with_injections(net, ders["node_name"], solution.p_der + 1j * solution.q_der,
                            names=ders["name"]) if len(ders) else net
    pf = solve_powerflow(plant, load_scale=problem.load_scale, raise_on_fail=False)
    r = problem.radial
    keep = r.net_index >= 0
    V_model = solution.extra.get("V")
    if V_model is None:                                  # magnitudes only: at the no-load angles
        V_model = np.sqrt(np.maximum(solution.v, 0)) * r.alpha
    V_exact = np.zeros(r.n, complex)
    V_exact[keep] = pf.V[r.net_index[keep]]
    p_sub_exact = source_power(pf)
    limits = problem.voltage_limits()                    # line to line on ungrounded islands
    u = np.sqrt(limits.squared(V_exact))
    return pf, {
        **voltage_errors(r, V_model, V_exact),
        "max_undervoltage_pu": float(np.maximum(np.sqrt(limits.lo) - u, 0).max(initial=0)),
        "max_overvoltage_pu": float(np.maximum(u - np.sqrt(limits.hi), 0).max(initial=0)),
        "substation_kw_model": float(solution.s_root.real.sum() * net.sbase / 1e3),
        "substation_kw_exact": p_sub_exact, "powerflow_converged": bool(pf.converged)}


def voltage_errors(radial: RadialNetwork, V_model: np.ndarray, V_exact: np.ndarray) -> dict:
    """How far a formulation's voltages (radial numbering, complex) are from the exact ones.

    On an ungrounded island (behind a floating delta secondary) the phase-to-ground voltage is set by
    tiny admittances to ground: on IEEE 37 the regulators' 1 ppm anti-float shunts shift it by 8 %.
    The linear and conic models leave that zero sequence out, and what the island's delta loads feel
    is the line-to-line voltage. So ``max_voltage_error_pu`` compares phase-to-ground magnitudes on
    grounded nodes and line-to-line magnitudes (per unit of sqrt(3) x the phase base) between the
    phases of each floating bus; ``max_grounded_nodes_error_pu`` leaves the floating buses out, and
    ``max_ground_error_pu`` is the phase-to-ground error on every node."""
    on = radial.net_index >= 0
    ground = np.where(on, np.abs(np.abs(V_model) - np.abs(V_exact)), 0.0)
    floating = (radial.floating_island() >= 0) & on
    err = np.where(floating, 0.0, ground)
    worst, name = float(err.max()), str(radial.nodes[int(err.argmax())])
    grounded = worst
    k, m = radial.floating_pairs()
    ll = np.abs(np.abs(V_model[k] - V_model[m]) - np.abs(V_exact[k] - V_exact[m])) / np.sqrt(3)
    if ll.size and ll.max() > worst:
        j = int(ll.argmax())
        worst, name = float(ll[j]), str(radial.pair_names([k[j]], [m[j]])[0])
    return {"max_voltage_error_pu": worst, "worst_node": name, "max_grounded_nodes_error_pu": grounded,
            "max_ground_error_pu": float(ground.max()), "floating_nodes": int(floating.sum())}


def source_power(pf) -> float:
    """kW the sources' EMFs deliver in the exact solution, E conj(I) with I = Y_s (E - V): measured
    where every formulation measures ``s_root`` (behind the Thevenin impedance), so the two compare."""
    net = pf.network
    index = {x: i for i, x in enumerate(net.nodes)}
    total = 0.0
    for s in net.feeder.sources:
        nd = np.array([index[f"{s.buses[0]}.{k}"] for k in s.nodes[0] if k])
        y = source_primitive(s.z)[:len(nd), :len(nd)] * np.outer(net.vbase[nd], net.vbase[nd]) / net.sbase
        e = np.linalg.solve(y, net.i_source[nd])          # Norton current = Y_s E
        total += float((e * np.conj(y @ (e - pf.V[nd]))).real.sum())
    return total * net.sbase / 1e3


__all__ = ["FORMULATIONS", "OBJECTIVES", "FormulationSolution", "OPFInfeasibleError", "OPFProblem",
           "OPFResult", "check_against_powerflow", "der_table", "pv_problem", "pv_sites", "solve_opf",
           "voltage_errors"]
