"""The runs behind chapter 7's remarks on what did and did not speed the ADMM up beyond admm.json's:
scaling the DER columns component-wise, the choice of that scale for zones of 70 buses, single
precision, and residual balancing on top of the Halpern iteration. Writes data/results/admm_ablation.json.

    python -m benchmarks.admm_ablation [--out PATH]        # 7 minutes on one core (the record's machine)

On the OPF of ``benchmarks.admm``, the restarted reflected Halpern iteration at that benchmark's
tolerance, numpy on one thread, each run against HiGHS on the centralized LP:

* IEEE 8500 component-wise, the DER columns scaled by ``DER_SCALE`` (admm.json: unscaled), for rho in
  ``HALPERN_RHOS``;
* IEEE 8500 in zones of 70 buses at rho 5 with the scales in ``ZONE_SCALES`` (admm.json: 0.3 and 1);
* IEEE 8500 component-wise in float32 at rho 30 (admm.json's float64 run), with its final residuals;
* every feeder component-wise with residual balancing (``adaptive=True``) from admm.json's best rho
  for the plain Halpern iteration (``benchmarks.admm.HALPERN_RHO``).
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
from benchmarks.admm import DER_SCALE, HALPERN_RHO, HALPERN_RHOS, MAX_ITER, TOL, centralized, run  # noqa: E402
from benchmarks.powerflow import machine  # noqa: E402
from dopfkit.distributed import ADMM, decompose  # noqa: E402
from dopfkit.opf import pv_problem  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "admm_ablation.json"
BIG, ZONE_BUSES, ZONE_RHO, ZONE_SCALES, FLOAT32_RHO = "ieee8500", 70, 5.0, [0.1, 0.2, 0.5], 30.0
# IEEE 8500's cap for every run (the small feeders converge in under 1000 iterations)
HALPERN = {"tol": TOL, "halpern": True, "reflect": 1.0, "max_iter": MAX_ITER[BIG]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    runs = {}
    results = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {**HALPERN, "threads": 1}, "runs": runs}

    def record(label, admm, reference, **settings):
        runs[label] = r = run(admm, reference, **HALPERN, **settings)
        print(f"{label}: {r['iterations']} iterations, converged {r['converged']}, gap {r['gap_rel']:.1e}, "
              f"violation {r['violation']:.1e}", flush=True)
        write_results(results, args.out)                  # keep what is done if the run is cut off

    for name, rho in HALPERN_RHO.items():
        problem = pv_problem(name)
        dec = decompose(problem)
        lp = dec.lp
        reference = centralized(lp).objective
        record(f"{name}, components, residual balancing from rho {rho:g}", ADMM(dec), reference, rho=rho,
               adaptive=True)
        if name != BIG:
            continue
        scaled = ADMM(decompose(problem, lp, der_scale=DER_SCALE))
        for r in HALPERN_RHOS:
            record(f"{name}, components, der_scale {DER_SCALE:g}, rho {r:g}", scaled, reference, rho=r)
        for d in ZONE_SCALES:
            zoned = ADMM(decompose(problem, lp, zone_buses=ZONE_BUSES, der_scale=d))
            record(f"{name}, zones of {ZONE_BUSES}, der_scale {d:g}, rho {ZONE_RHO:g}", zoned, reference,
                   rho=ZONE_RHO)
        record(f"{name}, components, float32, rho {FLOAT32_RHO:g}", ADMM(dec, dtype=np.float32), reference,
               rho=FLOAT32_RHO)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
