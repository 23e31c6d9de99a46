"""Check that the solvers the book uses are reachable from this Python environment.

Run by `make solvers` (and usable by hand: `python scripts/check_solvers.py`). It solves a tiny
nonlinear Pyomo model with SolverFactory("cyipopt") -- Ipopt from the cyipopt-wheels package,
driven through PyNumero's ASL library -- and reports on the other solvers without failing on them.

Exit status: 0 when Ipopt solves the model, 1 otherwise (with the fix printed).
"""

from __future__ import annotations

import os
import sys


def check_ipopt() -> bool:
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    m.x = pyo.Var(bounds=(0, None), initialize=1.0)
    m.y = pyo.Var(initialize=1.0)
    m.disk = pyo.Constraint(expr=m.x**2 + m.y**2 <= 1.0)
    m.obj = pyo.Objective(expr=(m.x - 2.0) ** 2 + m.y)
    # The optimum lies on the unit circle where the gradient of the objective is parallel to (x, y).
    try:
        solver = pyo.SolverFactory("cyipopt")
        res = solver.solve(m)
    except Exception as exc:  # missing PyNumero ASL library, missing cyipopt, ...
        print(f"cyipopt: FAILED ({type(exc).__name__}: {exc})")
        print(
            "  fix: `make solvers` (builds PyNumero's ASL library into $PYOMO_CONFIG_DIR), then make sure\n"
            "  PYOMO_CONFIG_DIR points at it (the venv's activate script exports it); or install ipopt from\n"
            "  conda-forge (environment.yml) and use SolverFactory('ipopt')."
        )
        return False
    tc = str(res.solver.termination_condition)
    x, y = pyo.value(m.x), pyo.value(m.y)
    ok = tc == "optimal" and abs(x**2 + y**2 - 1.0) < 1e-6
    status = "ok" if ok else "FAILED"
    obj = pyo.value(m.obj)
    print(f"cyipopt: {status} (termination={tc}, x={x:.6f}, y={y:.6f}, objective={obj:.6f})")
    return ok


def report_others() -> None:
    from importlib.metadata import PackageNotFoundError, version

    checks = {  # label: (module, distribution)
        "HiGHS": ("highspy", "highspy"),
        "SCIP": ("pyscipopt", "PySCIPOpt"),
        "Clarabel": ("clarabel", "clarabel"),
        "SCS": ("scs", "scs"),
        "CVXPY": ("cvxpy", "cvxpy"),
    }
    for label, (mod, dist) in checks.items():
        try:
            __import__(mod)
            try:
                ver = version(dist)
            except PackageNotFoundError:
                ver = "version unknown"
            print(f"{label} ({mod}): ok ({ver})")
        except Exception as exc:  # report only
            print(f"{label}: missing ({type(exc).__name__}: {exc}); install with pip install -e '.[core]'")


def main() -> int:
    print(f"python: {sys.executable}")
    print(f"PYOMO_CONFIG_DIR: {os.environ.get('PYOMO_CONFIG_DIR', '(unset)')}")
    ok = check_ipopt()
    report_others()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
