"""What sets ADMM's pace on IEEE 8500 (chapter 7): the same ADMM with no decomposition at all.

One subsystem owns every row, so agreement has no hop to cross. Its local step, the projection onto
``{x : A x = b}``, is a sparse KKT solve (one LU factorization) where ``dopfkit.distributed.ADMM`` keeps a
dense projector per subsystem, which one subsystem of 28 000 columns cannot afford. Everything else is
that class's: the clamped global copy, the dual update, the restarted reflected Halpern iteration
(``_Halpern``), the start and the stopping test. Runs, on the OPF of ``benchmarks.admm``:

* every feeder as one block, rho 3: the count no regrouping of the rows can be expected to beat;
* IEEE 8500 without voltage limits (vmin 0, vmax 10) and PV on 2, 10 and 30 % of the load phases;
* IEEE 8500 with the DER columns scaled as ``decompose(..., der_scale=0.3)`` does.

    python -m benchmarks.admm_pace [--out PATH]        # about 15 minutes on one core

Writes data/results/admm_pace.json.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spl  # noqa: E402

from benchmarks import write_results  # noqa: E402
from benchmarks.admm import DER_SCALE, TOL, centralized  # noqa: E402
from benchmarks.powerflow import machine  # noqa: E402
from dopfkit.distributed.admm import _Halpern, paper_start  # noqa: E402
from dopfkit.distributed.decomposition import der_column_scale  # noqa: E402
from dopfkit.distributed.kernels import ElementwiseSteps  # noqa: E402
from dopfkit.opf import pv_problem  # noqa: E402
from dopfkit.opf.lindist3flow import lindist3flow_lp  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "admm_pace.json"
RHO, MAX_ITER = 3.0, 20_000


def projector(A: sp.spmatrix, b: np.ndarray):
    """``y -> argmin ||x - y|| s.t. A x = b`` through the KKT system (a tiny negative regularization
    keeps it nonsingular where A has dependent rows), with two steps of iterative refinement."""
    m, n = A.shape
    K = sp.bmat([[sp.eye(n), A.T], [A, -1e-12 * sp.eye(m)]]).tocsc()
    lu = spl.splu(K)

    def project(y):
        rhs = np.concatenate([y, b])
        sol = lu.solve(rhs)
        for _ in range(2):
            sol += lu.solve(rhs - K @ sol)
        return sol[:n]
    return project


def one_block(lp, reference: float, rho: float = RHO, der_scale: float = 1.0) -> dict:
    """Restarted reflected Halpern ADMM with one subsystem (B = I), on the LP in ``x / d``."""
    d = der_column_scale(lp, der_scale)
    s = lp.scaled(d)
    project = projector(s.A, s.b)
    lo, hi = s.lower, s.upper
    x = paper_start(lp) / d
    lam = np.zeros_like(x)
    halpern = _Halpern(ElementwiseSteps(np), 1.0)
    z_prev = np.clip(x - lam / rho, lo, hi)
    t0 = time.perf_counter()
    it = 0
    while it < MAX_ITER:
        it += 1
        z = np.clip(x - lam / rho, lo, hi)                      # global: one copy per column
        x_new = project(z + (lam - s.c) / rho)                  # local: the projection onto A x = b
        lam_new = lam + rho * (z - x_new)
        r, dual = np.linalg.norm(z - x_new), rho * np.linalg.norm(z - z_prev)
        z_prev = z
        x, lam = halpern.update(x, lam, x_new, lam_new, rho)
        if r <= TOL and dual <= TOL:
            break
    z = d * z
    return {"iterations": it, "converged": bool(r <= TOL and dual <= TOL), "rho": rho, "der_scale": der_scale,
            "ders": lp.columns["p_der"].stop - lp.columns["p_der"].start, "columns": lp.A.shape[1],
            "gap_rel": abs(lp.objective(z) - reference) / abs(reference), "violation": lp.violation(z),
            "total_s": time.perf_counter() - t0}


def case(name: str, **problem) -> tuple:
    lp = lindist3flow_lp(pv_problem(name, **problem))
    return lp, centralized(lp).objective


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    runs = {}

    def record(label, lp, ref, **kw):
        runs[label] = rec = one_block(lp, ref, **kw)
        print(f"{label}: {rec['iterations']} iterations, {rec['ders']} DERs, gap {rec['gap_rel']:.1e}, "
              f"violation {rec['violation']:.1e} ({rec['total_s']:.0f} s)", flush=True)

    for name in ("ieee13", "ieee37", "ieee123", "ieee8500"):
        lp, ref = case(name)
        record(f"{name}, one block", lp, ref)
        if name == "ieee8500":
            record(f"{name}, one block, der_scale {DER_SCALE:g}", lp, ref, der_scale=DER_SCALE)
    for share in (0.02, 0.1, 0.3):
        lp, ref = case("ieee8500", share=share, vmin=0.0, vmax=10.0)
        record(f"ieee8500, one block, no voltage limits, PV share {share:g}", lp, ref)
    results = {"machine": machine(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {"tol": TOL, "rho": RHO, "acceleration": "restarted reflected Halpern",
                            "problem": "benchmarks.admm's OPF unless the label says otherwise"},
               "runs": runs}
    write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
