"""Linear (and convex quadratic) programs in standard form, solved directly with HiGHS.

``min c^T x + 1/2 x^T Q x + offset  s.t.  A x = b,  lower <= x <= upper``

This is the form the GPU chapter decomposes; naming the column and row blocks lets a result (and an
infeasibility) be read back by physical meaning. highspy takes the sparse matrices in one call, with
no modelling layer in between, which is what makes large LPs fast.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp


@dataclass
class StandardFormLP:
    c: np.ndarray
    A: sp.csr_matrix
    b: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    columns: dict[str, slice]          # named blocks of x ("v", "P", ...)
    rows: dict[str, slice]             # named blocks of A ("power balance P", ...)
    Q: sp.csr_matrix | None = None     # Hessian of a convex quadratic objective (None: LP)
    offset: float = 0.0
    names: dict[str, np.ndarray] = field(default_factory=dict)   # optional labels per block

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape

    def block(self, x: np.ndarray, name: str) -> np.ndarray:
        return x[self.columns[name]]

    def objective(self, x: np.ndarray) -> float:
        quad = 0.5 * x @ (self.Q @ x) if self.Q is not None else 0.0
        return float(self.c @ x + quad + self.offset)

    def scaled(self, d: np.ndarray) -> StandardFormLP:
        """The same LP in the variables ``x / d`` (``d > 0`` per column): ``A diag(d)``, ``c d``,
        bounds divided by ``d``. Rows, names and offset are unchanged."""
        D = sp.diags(d)
        return replace(self, c=self.c * d, A=(self.A @ D).tocsr(), lower=self.lower / d, upper=self.upper / d,
                       Q=None if self.Q is None else (D @ self.Q @ D).tocsr())

    def violation(self, x: np.ndarray) -> float:
        """Largest equality residual or bound violation (scaled by 1 + |b|)."""
        eq = np.abs(self.A @ x - self.b) / (1 + np.abs(self.b))
        bnd = np.maximum(self.lower - x, 0) + np.maximum(x - self.upper, 0)
        return float(max(eq.max(initial=0), bnd.max(initial=0)))


@dataclass
class HighsSolution:
    status: str
    x: np.ndarray
    objective: float
    iterations: int
    solve_time: float
    row_dual: np.ndarray
    col_dual: np.ndarray


def solve_highs(lp: StandardFormLP, row_lower=None, row_upper=None, time_limit: float | None = None,
                **options) -> HighsSolution:
    """Solve with HiGHS (simplex for LPs, its QP solver when ``lp.Q`` is set).

    ``row_lower``/``row_upper`` replace ``b = b`` by ranges (the elastic re-solve uses them)."""
    import highspy
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    if time_limit:
        h.setOptionValue("time_limit", float(time_limit))
    for k, v in options.items():
        if h.setOptionValue(k, v) == highspy.HighsStatus.kError:
            raise ValueError(f"HiGHS rejected the option {k}={v!r}")
    A = lp.A.tocsc()
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = A.shape[1], A.shape[0]
    model.col_cost_ = np.asarray(lp.c, float)
    model.col_lower_, model.col_upper_ = _inf(lp.lower), _inf(lp.upper)
    model.row_lower_ = _inf(lp.b if row_lower is None else row_lower)
    model.row_upper_ = _inf(lp.b if row_upper is None else row_upper)
    model.offset_ = float(lp.offset)
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_, model.a_matrix_.index_ = A.indptr, A.indices
    model.a_matrix_.value_ = A.data
    h.passModel(model)
    if lp.Q is not None:
        Q = sp.tril(lp.Q).tocsc()                       # HiGHS takes the lower triangle by columns
        h.passHessian(Q.shape[0], Q.nnz, highspy.HessianFormat.kTriangular,
                      Q.indptr, Q.indices, Q.data)
    t = time.perf_counter()
    run_status = h.run()
    elapsed = time.perf_counter() - t
    status = h.modelStatusToString(h.getModelStatus())
    if run_status == highspy.HighsStatus.kError:
        # e.g. HiGHS 1.15's dual simplex on IEEE 8500's LP stops in phase 1 with model status
        # "Not Set"; without this check the caller would read an objective of 0
        raise RuntimeError(f"HiGHS failed on the {A.shape[0]} x {A.shape[1]} LP (model status "
                           f"{status!r}, options {options or 'default'}); try solver='ipm'")
    sol, info = h.getSolution(), h.getInfo()
    x = np.asarray(sol.col_value)
    return HighsSolution(status=status, x=x, objective=float(info.objective_function_value),
                         iterations=int(max(info.simplex_iteration_count, info.qp_iteration_count,
                                            info.ipm_iteration_count)),
                         solve_time=elapsed, row_dual=np.asarray(sol.row_dual),
                         col_dual=np.asarray(sol.col_dual))


def _inf(a) -> np.ndarray:
    """HiGHS reads +-1e30 and above as infinite; numpy infinities pass through as such."""
    return np.clip(np.asarray(a, float), -np.inf, np.inf)


def solve_clarabel(lp: StandardFormLP, **settings) -> HighsSolution:
    """The same standard form through Clarabel's interior point (used for QP objectives: HiGHS's
    active-set QP stalls on the tiny resistances of switches). Equalities go to the zero cone and
    finite bounds to the nonnegative cone."""
    import clarabel
    n = lp.A.shape[1]
    lo, hi = np.isfinite(lp.lower), np.isfinite(lp.upper)
    eye = sp.eye(n, format="csr")
    A = sp.vstack([lp.A, -eye[lo], eye[hi]]).tocsc()
    b = np.concatenate([lp.b, -lp.lower[lo], lp.upper[hi]])
    P = sp.triu(lp.Q if lp.Q is not None else sp.csr_matrix((n, n))).tocsc()
    cones = [clarabel.ZeroConeT(lp.A.shape[0]), clarabel.NonnegativeConeT(int(lo.sum() + hi.sum()))]
    opts = clarabel.DefaultSettings()
    opts.verbose = False
    for k, v in settings.items():
        setattr(opts, k, v)
    t = time.perf_counter()
    sol = clarabel.DefaultSolver(P, np.asarray(lp.c, float), A, b, cones, opts).solve()
    elapsed = time.perf_counter() - t
    x = np.asarray(sol.x)
    status = "Optimal" if str(sol.status) == "Solved" else str(sol.status)
    z = np.asarray(sol.z)
    return HighsSolution(status=status, x=x, objective=lp.objective(x), iterations=int(sol.iterations),
                         solve_time=elapsed, row_dual=z[:lp.A.shape[0]], col_dual=np.zeros(n))
