"""The runs behind chapter 7's remarks on IEEE 8500 that admm.json does not hold: what scaling the DER
columns does component-wise, how the scale was chosen for zones of 70 buses, and single precision.
Writes data/results/admm_ablation.json.

    python -m benchmarks.admm_ablation [--out PATH]        # about 10 minutes on one core

On the OPF of ``benchmarks.admm`` (IEEE 8500), the restarted reflected Halpern iteration at that
benchmark's tolerance, numpy on one thread, each run against HiGHS:

* component-wise, the DER columns scaled by ``DER_SCALE`` (admm.json: unscaled), for rho in
  ``HALPERN_RHOS``;
* zones of 70 buses at rho 5 with the scales in ``ZONE_SCALES`` (admm.json: 0.3 and unscaled);
* component-wise in float32 at rho 30 (admm.json's float64 run), with its final residuals.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import write_results  # noqa: E402
from benchmarks.admm import DER_SCALE, HALPERN_RHOS, MAX_ITER, TOL, run  # noqa: E402
from benchmarks.powerflow import machine  # noqa: E402
from dopfkit.distributed import ADMM, decompose  # noqa: E402
from dopfkit.opf import pv_problem  # noqa: E402
from dopfkit.opf.standard_form import solve_highs  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "admm_ablation.json"
FEEDER, ZONE_BUSES, ZONE_RHO = "ieee8500", 70, 5.0
ZONE_SCALES = [0.1, 0.2, 0.5]
FLOAT32_RHO = 30.0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    problem = pv_problem(FEEDER)
    dec = decompose(problem)
    lp = dec.lp
    reference = solve_highs(lp, solver="ipm").objective
    halpern = {"tol": TOL, "halpern": True, "reflect": 1.0, "max_iter": MAX_ITER[FEEDER]}
    runs = {}
    results = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "feeder": FEEDER, "settings": {**halpern, "threads": 1}, "highs_objective": reference,
               "runs": runs}

    def record(label, admm, **settings):
        runs[label] = r = run(admm, reference, **{**halpern, **settings})
        print(f"{label}: {r['iterations']} iterations, converged {r['converged']}, gap {r['gap_rel']:.1e}, "
              f"violation {r['violation']:.1e}", flush=True)
        write_results(results, args.out)                  # keep what is done if the run is cut off

    scaled = ADMM(decompose(problem, lp, der_scale=DER_SCALE))
    for rho in HALPERN_RHOS:
        record(f"components, der_scale {DER_SCALE:g}, rho {rho:g}", scaled, rho=rho)
    for d in ZONE_SCALES:
        zoned = ADMM(decompose(problem, lp, zone_buses=ZONE_BUSES, der_scale=d))
        record(f"zones of {ZONE_BUSES}, der_scale {d:g}, rho {ZONE_RHO:g}", zoned, rho=ZONE_RHO)
    record(f"components, float32, rho {FLOAT32_RHO:g}", ADMM(dec, dtype=np.float32), rho=FLOAT32_RHO)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
