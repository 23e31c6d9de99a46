"""OPTDIST-VC benchmark (chapter 7): the primal-dual feedback volt/var controller of the review's use case
A in closed loop on IEEE 123, beside the centralized optimum (CVXPY + Clarabel) of the same problem.
Writes data/results/voltvar.json.

    python -m benchmarks.voltvar [--out PATH] [--exact-steps 50000]

Runs, on ``ieee123_overvoltage_case(seed=0)`` (20 PV inverters, overvoltages above 1.05 pu without
control): the linear plant with clean, dropped (20 %) and delayed messages, and the exact power flow
as the plant. Reported: steps until q stays within 1e-2 and 1e-3 of the inverters' range from the
centralized optimum, the final distance, the voltage violation measured on the plant, and seconds.
The exact-plant runs are too long for the chapter, which reads this record.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks import write_results
from benchmarks.powerflow import machine
from dopfkit.distributed import voltvar as vv

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "voltvar.json"
D = 0.1


def record(hist, opt, q_range: float, seconds: float) -> dict:
    err = np.abs(hist.q.to_numpy() - opt.q.to_numpy()).max(axis=1)
    tail = hist.violation.iloc[int(0.9 * len(hist.violation)):]
    return {"steps": int(hist.q.index[-1]), "seconds": seconds,
            "steps_to_1e-2_of_range": hist.steps_to(opt.q, 1e-2 * q_range),
            "steps_to_1e-3_of_range": hist.steps_to(opt.q, 1e-3 * q_range),
            "final_q_distance_pu": float(err[-1]), "final_q_distance_of_range": float(err[-1] / q_range),
            "final_objective_rel": float(hist.objective.iloc[-1] / opt.objective - 1),
            "final_violation_pu": float(hist.violation.iloc[-1]),
            "max_violation_last_10pct_pu": float(tail.max()),
            "final_vmax_pu": float(hist.v.iloc[-1].max())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--exact-steps", type=int, default=50_000)
    args = ap.parse_args(argv)
    model = vv.ieee123_overvoltage_case(seed=0)
    opt = vv.centralized_optimum(model, d=D)
    q_range = float((model.q_max - model.q_min).max())
    v0 = np.sqrt(model.v_par)
    out = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "case": {"feeder": "ieee123", "agents": int(model.n), "inverters": int(model.controllable.sum()),
                    "vmax_uncontrolled_pu": float(v0.max()), "nodes_above_vmax": int((v0 > model.vmax).sum()),
                    "q_range_pu": q_range, "optimum_objective": float(opt.objective), "d": D,
                    "model_error_vs_lindist3flow": float(model.lindist3flow_error())},
           "runs": {}}
    runs = [("linear, clean", "linear", None, 80_000),
            ("linear, 20% dropped", "linear", vv.Faults(drop=0.2, seed=1), 80_000),
            ("linear, delay 3", "linear", vv.Faults(delay=3, seed=1), 160_000),
            ("linear, delay 0-5 and 20% dropped", "linear",
             vv.Faults(delay=(0, 5), drop=0.2, seed=1), 160_000),
            ("exact power flow, clean", "exact", None, args.exact_steps)]
    for label, plant, faults, steps in runs:
        print(f"{label} ...", flush=True)
        t0 = time.perf_counter()
        controller = vv.OptDistVC(model, d=D, faults=faults)
        hist = vv.run_closed_loop(controller, plant, steps=steps, record_every=10)
        out["runs"][label] = rec = record(hist, opt, q_range, time.perf_counter() - t0)
        print(f"  {rec['steps_to_1e-3_of_range']} steps to 1e-3 of the range; final violation "
              f"{rec['final_violation_pu']:.1e} pu", flush=True)
    write_results(out, args.out)
    return out


if __name__ == "__main__":
    main()
