"""dopfkit.solvers: detection is truthful (each solver found solves a tiny problem with a known answer)
and a missing solver's error gives the install command."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dopfkit import solvers

PIP_SOLVERS = ["highs", "scip", "clarabel", "scs", "cvxpy"]   # pip dependencies of the `core` extra


def needs(name: str) -> None:
    """Skip (with the install command) where the solver is missing, e.g. Ipopt without `make solvers`."""
    try:
        solvers.require(name)
    except solvers.SolverNotAvailableError as exc:
        pytest.skip(str(exc))


def test_available_reports_every_known_solver():
    found = solvers.available()
    assert list(found) == list(solvers.KNOWN)
    assert all(isinstance(v, bool) for v in found.values())
    assert all(found[name] for name in PIP_SOLVERS), found


def test_highs_lp_through_pyomo_and_highspy():
    # max 3x + 2y  s.t.  x + y <= 4,  x + 3y <= 6,  0 <= x <= 3,  y >= 0:  optimum 11 at (3, 1)
    needs("highs")
    import highspy
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    m.x = pyo.Var(bounds=(0, 3))
    m.y = pyo.Var(bounds=(0, None))
    m.c1 = pyo.Constraint(expr=m.x + m.y <= 4)
    m.c2 = pyo.Constraint(expr=m.x + 3 * m.y <= 6)
    m.obj = pyo.Objective(expr=3 * m.x + 2 * m.y, sense=pyo.maximize)
    solvers.pyomo_solver("highs").solve(m)
    assert pyo.value(m.obj) == pytest.approx(11.0)
    assert (pyo.value(m.x), pyo.value(m.y)) == pytest.approx((3.0, 1.0))

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    x, y = h.addVariable(lb=0, ub=3), h.addVariable(lb=0)
    h.addConstr(x + y <= 4)
    h.addConstr(x + 3 * y <= 6)
    h.maximize(3 * x + 2 * y)
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    assert h.getInfo().objective_function_value == pytest.approx(11.0)


def test_ipopt_nlp_through_pyomo():
    # min x + y  s.t.  x^2 + y^2 <= 2:  optimum -2 at (-1, -1)
    needs("ipopt")
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    m.x = pyo.Var(initialize=0.5)
    m.y = pyo.Var(initialize=0.5)
    m.disk = pyo.Constraint(expr=m.x**2 + m.y**2 <= 2)
    m.obj = pyo.Objective(expr=m.x + m.y)
    assert solvers.pyomo_plugin("ipopt") in ("ipopt", "cyipopt")
    res = solvers.pyomo_solver("ipopt").solve(m)
    assert str(res.solver.termination_condition) == "optimal"
    assert (pyo.value(m.x), pyo.value(m.y)) == pytest.approx((-1.0, -1.0), abs=1e-6)


@pytest.mark.parametrize("name, tol", [("clarabel", 1e-7), ("scs", 1e-3)])
def test_socp_through_cvxpy(name, tol):
    # the same problem as a second-order cone: min x + y  s.t.  ||(x, y)|| <= sqrt(2)
    needs(name)
    import cvxpy as cp

    z = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum(z)), [cp.norm(z, 2) <= 2**0.5])
    prob.solve(solver=solvers.cvxpy_solver(name))
    assert prob.status == cp.OPTIMAL
    assert prob.value == pytest.approx(-2.0, abs=tol)


def test_scip_mip_through_pyomo():
    # max x + 1.5y  s.t.  2x + 2y <= 7,  x, y in {0..10}: optimum 4.5 at (0, 3) (LP relaxation: 5.25)
    needs("scip")
    import pyomo.environ as pyo

    m = pyo.ConcreteModel()
    m.x = pyo.Var(domain=pyo.Integers, bounds=(0, 10))
    m.y = pyo.Var(domain=pyo.Integers, bounds=(0, 10))
    m.c = pyo.Constraint(expr=2 * m.x + 2 * m.y <= 7)
    m.obj = pyo.Objective(expr=m.x + 1.5 * m.y, sense=pyo.maximize)
    solvers.pyomo_solver("scip").solve(m)
    assert pyo.value(m.obj) == pytest.approx(4.5)
    assert (pyo.value(m.x), pyo.value(m.y)) == pytest.approx((0.0, 3.0))


def test_unknown_and_misrouted_names():
    with pytest.raises(ValueError, match="known solvers: ipopt, highs"):
        solvers.require("nonexistent")
    with pytest.raises(ValueError, match="not a Pyomo solver"):
        solvers.pyomo_solver("clarabel")
    with pytest.raises(ValueError, match="not a CVXPY solver"):
        solvers.cvxpy_solver("ipopt")
    assert solvers.require("HiGHS") == "highs"


@pytest.mark.parametrize("name, command", [
    ("highs", "pip install highspy==1.15.1"),
    ("scs", "pip install scs==3.3.1"),
    ("ipopt", "pip install cyipopt-wheels==1.7.0.dev0"),
    ("ipopt", "conda install -c conda-forge ipopt"),
    ("ipopt", "make solvers"),
])
def test_missing_solver_error_gives_install_command(monkeypatch, name, command):
    solvers.available()
    monkeypatch.setitem(solvers._CACHE, name, False)
    assert solvers.available()[name] is False
    with pytest.raises(solvers.SolverNotAvailableError) as err:
        solvers.require(name)
    assert command in str(err.value)
    assert isinstance(err.value, RuntimeError)
    getter = solvers.pyomo_solver if name in ("highs", "ipopt") else solvers.cvxpy_solver
    with pytest.raises(solvers.SolverNotAvailableError):
        getter(name)


def test_install_pins_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    core = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["core"]
    pins = {m[1].lower(): m[2] for m in (re.match(r"([\w-]+)==([^;\s]+)", d) for d in core) if m}
    for package, version in solvers._PINS.items():
        assert pins[package] == version, package
