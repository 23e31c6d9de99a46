"""Proximal atomic coordination (PAC; Romvary and Annaswamy), the review's use case B, on the LinDist3Flow LP.

The atoms are the subsystems of :func:`~dopfkit.distributed.decomposition.decompose` (buses and lines).
Atom ``j`` holds its local copies ``a_j`` of the global columns its rows touch, with

* its own equality rows ``G_j a_j = b_j`` (power balances, voltage drops, inverter capabilities),
  *dualized* with multipliers ``mu_j``: PAC is a dual method, the atom does not enforce them itself;
* the bounds of its copies, the set ``X_j`` its local problem keeps;
* coordination rows ``a_k - a_own = 0``: every copy of a column equals the copy of the column's owner
  (the lowest-numbered subsystem holding it; buses come before lines), so each row joins two atoms that
  share a variable, i.e. neighbours. The atom of the non-owner copy holds the row's multiplier ``nu``.

A column's linear (and diagonal quadratic) cost is split equally among its copies. With ``K = [G; C]``,
``r = K a - b`` and ``y = (mu, nu)``, one iteration is

1. every atom: ``a_j = argmin_{a in X_j} f_j(a) + (K_j^T y_bar)^T a + ||a - a_j[tau]||^2 / (2 rho)``,
   a separable proximal step on a box, so solved exactly in closed form (a clip);
2. it sends ``a_j`` to its neighbours; each row's multiplier moves, ``y[tau+1] = y[tau] + rho gamma_j r``,
   and its prediction is ``y_bar[tau+1] = y[tau+1] + rho gamma_hat_j[tau] r`` (``r`` at ``tau+1``);
3. it sends ``nu_bar_j`` to the neighbour on the other end of each of its coordination rows.

Without privacy ``gamma_hat = gamma``: the predictor-corrector proximal multiplier method (Chen and
Teboulle, 1994) on which PAC is built. With ``private=True`` every atom draws a fresh ``gamma_hat_j[tau]``
in ``(0, gamma_j)`` each iteration and keeps it to itself, so a neighbour that sees ``nu_bar_j`` and the
``a``'s cannot solve for ``nu_j``. This is our reading of the review's summary (``gamma_j >
gamma_hat_j[tau] > 0``, the true duals stay private); the fixed points do not move (at one, ``r = 0``).

Diagonal preconditioning (on by default) is PAC on an equivalently rescaled problem: each row of ``G``
normalized, then the diagonal scalings of Pock and Chambolle (2011), ``T = 1 / sum_i |K_ij|`` per copy
and ``S = 1 / sum_j |K_ij|`` per row. They make the proximal weight ``rho T`` per copy and the dual step
``rho gamma S`` per row; each factor needs one atom's data only. On IEEE 13 they cut the iterations
to a 1e-3 gap from about 24 000 (the best of scalar steps ``rho`` in {0.1, 0.25, 0.5, 1} times
``gamma`` in {1, 4, 16}) to about 17 600, and to convergence (tol 1e-6) from about 41 600 to 32 800;
above all they make the step rule scale-free: the iteration diverged on IEEE 13 for ``rho**2 * gamma``
above about 1.3 (on IEEE 37 at 1.5), and the defaults use 1.

Restarts (off by default, an extension beyond PAC) borrow from the restarted primal-dual methods for LP
(Applegate et al., PDLP, 2021-23): ``restart=k`` replaces every atom's iterates by their averages over the
last ``k`` iterations on a fixed schedule (no extra messages); ``restart="adaptive"`` uses PDLP's test on
the fixed-point residual, one scalar per atom summed over the network every 16 iterations, like a
stopping test. On IEEE 13 they cut the iterations to a 1e-3 gap from about 17 600 to about 1 300, and
to convergence from about 32 800 to 1 900.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dopfkit.distributed.decomposition import Decomposition, decompose

ADAPTIVE_EVERY = 16       # iterations between two restart tests (restart="adaptive")
BETA_SUFFICIENT, BETA_NECESSARY, BETA_ARTIFICIAL = 0.2, 0.8, 0.36     # PDLP's restart thresholds


@dataclass
class PACForm:
    """The atoms' data: the stacked rows ``K a = bb`` on the copies and the diagonal metrics."""
    dec: Decomposition
    K: sp.csr_matrix           # (equality rows + coordination rows, copies): [G; C], rows of G normalized
    KT: sp.csr_matrix          # its transpose (the atoms' gradient step)
    bb: np.ndarray             # right-hand side [b scaled; 0]
    n_eq: int                  # the first n_eq rows are the atoms' own equalities
    row_scale: np.ndarray      # (n_eq,) the factor each row of A was multiplied by
    row_atom: np.ndarray       # the atom holding each row's multiplier
    owner_copy: np.ndarray     # (columns,) the owner's copy of each column
    owner_atom: np.ndarray     # (coordination rows,) the owner atom at the other end of each row
    lower: np.ndarray          # bounds of the copies
    upper: np.ndarray
    c: np.ndarray              # linear cost per copy (the column's cost over its copies)
    q: np.ndarray              # diagonal quadratic cost per copy (likewise split)
    T: np.ndarray              # primal diagonal metric per copy (ones without preconditioning)
    S: np.ndarray              # dual diagonal metric per row

    @property
    def n_atoms(self) -> int:
        return self.dec.n_subsystems

    def neighbours(self) -> pd.DataFrame:
        """The communication graph: the atom pairs joined by coordination rows, and how many rows."""
        holder = self.row_atom[self.n_eq:]
        pairs = pd.DataFrame({"a": np.minimum(holder, self.owner_atom),
                              "b": np.maximum(holder, self.owner_atom)})
        count = pairs.value_counts().sort_index()
        a, b = count.index.get_level_values(0), count.index.get_level_values(1)
        names = self.dec.names
        return pd.DataFrame({"atom": names[a], "neighbour": names[b], "rows": count.to_numpy()})


def pac_form(dec: Decomposition, precondition: bool = True) -> PACForm:
    """The PAC data of a decomposition: each row of ``A`` on its owner's copies, the coordination rows."""
    lp = dec.lp
    ncol = lp.A.shape[1]
    if (dec.n_copies == 0).any():
        raise ValueError(f"column {int(np.flatnonzero(dec.n_copies == 0)[0])} is in no row, so no atom "
                         "holds it: drop it from the LP or give it a row")
    A = lp.A.tocoo()
    key = dec.copy_owner.astype(np.int64) * ncol + dec.copy_col
    order = np.argsort(key)
    copy_of_nz = order[np.searchsorted(key[order], dec.row_owner[A.row].astype(np.int64) * ncol + A.col)]
    ncopy = len(key)
    G = sp.csr_matrix((A.data, (A.row, copy_of_nz)), shape=(A.shape[0], ncopy))
    norm = np.sqrt(np.asarray(G.multiply(G).sum(axis=1)).ravel())
    row_scale = 1 / np.where(norm > 0, norm, 1.0)
    G = sp.diags(row_scale) @ G
    # a column's owner: its copy in the lowest-numbered subsystem
    by_col = np.lexsort((dec.copy_owner, dec.copy_col))
    first = np.r_[True, dec.copy_col[by_col[1:]] != dec.copy_col[by_col[:-1]]]
    owner_copy = np.empty(ncol, int)
    owner_copy[dec.copy_col[by_col[first]]] = by_col[first]
    other = np.flatnonzero(owner_copy[dec.copy_col] != np.arange(ncopy))
    m = len(other)
    C = sp.csr_matrix((np.r_[np.ones(m), -np.ones(m)],
                       (np.r_[np.arange(m), np.arange(m)], np.r_[other, owner_copy[dec.copy_col[other]]])),
                      shape=(m, ncopy))
    K = sp.vstack([G, C]).tocsr()
    if precondition:
        absK = abs(K)
        T = 1 / np.asarray(absK.sum(axis=0)).ravel()
        S = 1 / np.maximum(np.asarray(absK.sum(axis=1)).ravel(), 1e-300)
    else:
        T, S = np.ones(ncopy), np.ones(K.shape[0])
    share = dec.n_copies[dec.copy_col]
    q = lp.Q.diagonal() if lp.Q is not None else np.zeros(ncol)
    return PACForm(dec=dec, K=K, KT=K.T.tocsr(), bb=np.r_[lp.b * row_scale, np.zeros(m)],
                   n_eq=G.shape[0], row_scale=row_scale,
                   row_atom=np.r_[dec.row_owner, dec.copy_owner[other]], owner_copy=owner_copy,
                   owner_atom=dec.copy_owner[owner_copy[dec.copy_col[other]]],
                   lower=lp.lower[dec.copy_col], upper=lp.upper[dec.copy_col],
                   c=lp.c[dec.copy_col] / share, q=q[dec.copy_col] / share, T=T, S=S)


@dataclass
class PACResult:
    z: np.ndarray              # the global vector: every column at its owner atom
    x: np.ndarray              # all local copies a_j, in the decomposition's copy order
    y: np.ndarray              # multipliers: mu (rows of A, scaled by row_scale), then nu
    objective: float           # lp.objective(z)
    iterations: int
    status: str                # "converged", "max_iter" or "diverged"
    history: pd.DataFrame      # one row per iteration, see solve_pac
    time: float                # seconds in the iteration loop
    violation: float           # lp.violation(z)
    settings: dict

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def iterations_to(self, gap: float = 1e-3, coordination: float | None = None) -> int | None:
        """First iteration from which the relative objective gap (and, if given, the coordination
        residual) stays at or below the thresholds to the end of the run; None if it never does."""
        if "gap" not in self.history:
            raise ValueError("the history has no gap column: pass reference= to solve_pac")
        ok = (self.history["gap"] <= gap).to_numpy().copy()
        if coordination is not None:
            ok &= (self.history["coordination"] <= coordination).to_numpy()
        if not ok[-1]:
            return None
        bad = np.flatnonzero(~ok)
        return int(self.history.index[bad[-1] + 1 if len(bad) else 0])

    def summary(self) -> dict:
        return {"status": self.status, "iterations": self.iterations, "objective": self.objective,
                "violation": self.violation, "time_s": self.time}


def solve_pac(problem, rho: float = 0.25, gamma=16.0, max_iter: int = 50_000, tol: float = 1e-6,
              private: bool = False, private_range: tuple[float, float] = (0.1, 0.9), restart=0,
              precondition: bool = True, reference=None, seed: int = 0) -> PACResult:
    """Solve the LinDist3Flow LP of ``problem`` (an ``OPFProblem``, a ``Decomposition`` or a
    :class:`PACForm`) by proximal atomic coordination.

    ``rho`` is the proximal step and ``gamma`` the over-relaxation of the multipliers (a scalar or one
    value per atom); with preconditioning, keep ``rho**2 * max(gamma)`` at or below 1.
    ``private=True``: each atom draws ``gamma_hat_j[tau]`` uniformly in ``private_range`` times
    ``gamma_j`` every iteration (generator seeded with ``seed``). ``restart``: 0 (PAC as published), a
    period ``k`` or ``"adaptive"`` (see the module notes). ``reference``: an optimum (an array or a
    solution with ``.x``, e.g. ``solve_highs(dec.lp)``) to add ``gap`` (relative objective gap) and
    ``distance`` (max |z - z*|) to the history. ``precondition`` applies when the form is built here,
    not to a :class:`PACForm` passed in (build that with ``pac_form(dec, precondition)``).

    The history has one row per iteration: ``objective`` (of ``z``, the owners' copies),
    ``coordination`` (max |copy - owner's copy|), ``equality`` (max |G_j a_j - b_j| / (1 + |b_j|)) and
    ``step`` (max |a[tau+1] - a[tau]|). The run stops when these three are all at or below ``tol``:
    the copies then agree, satisfy their rows and no longer move, i.e. they solve the LP to that
    accuracy."""
    _check_settings(rho, max_iter, tol, private_range, restart)
    if isinstance(problem, PACForm):
        f = problem
    else:
        f = pac_form(problem if isinstance(problem, Decomposition) else decompose(problem), precondition)
    dec, lp = f.dec, f.dec.lp
    g_atom = _atom_gamma(gamma, dec)
    g_row = g_atom[f.row_atom]
    z_ref = None if reference is None else np.asarray(getattr(reference, "x", reference), float)
    obj_ref = None if z_ref is None else lp.objective(z_ref)
    rng = np.random.default_rng(seed)
    holder = f.row_atom[f.n_eq:]
    step_p = rho * f.T                                 # proximal weight rho T per copy
    step_d = rho * f.S * g_row                         # dual step rho gamma S per row

    def hat():
        """gamma_hat / gamma per row: 1, or each atom's private draw on its coordination rows."""
        if not private:
            return 1.0
        return np.r_[np.ones(f.n_eq), rng.uniform(*private_range, dec.n_subsystems)[holder]]

    def pac_step(x, y, y_bar, ratio):
        """1. every atom's proximal step on its local Lagrangian, projected on its box;
        2. after the exchange of the a_j: its rows' residuals, multipliers and their predictions."""
        grad = f.c + f.KT @ y_bar
        x_new = np.clip((x / step_p - grad) / (1 / step_p + f.q), f.lower, f.upper)
        r = f.K @ x_new - f.bb
        y_new = y + step_d * r
        return x_new, r, y_new, y_new + step_d * ratio * r

    def fixed_point_residual(x, y):
        """Length of one non-private PAC step from (x, y) in the method's metric: zero at a saddle."""
        x1, _, y1, _ = pac_step(x, y, y + step_d * (f.K @ x - f.bb), 1.0)
        return np.sqrt(np.sum((x1 - x) ** 2 / step_p) + np.sum((y1 - y) ** 2 / step_d))

    x = _initial_copies(f)
    r = f.K @ x - f.bb
    y = np.zeros_like(r)
    y_bar = y + step_d * hat() * r
    acc_x, acc_y, count = np.zeros_like(x), np.zeros_like(y), 0
    adaptive = restart == "adaptive"
    res_last = res_prev = fixed_point_residual(x, y) if adaptive else None
    b_eq = 1 + np.abs(lp.b)
    rows, status = [], "max_iter"
    t0 = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):      # divergence is reported, not warned about
        for it in range(1, max_iter + 1):
            x_new, r, y, y_bar = pac_step(x, y, y_bar, hat())
            step = np.abs(x_new - x).max()
            x = x_new
            if restart:                                # running averages since the last restart
                acc_x += x
                acc_y += y
                count += 1
                new = None
                if adaptive and count % ADAPTIVE_EVERY == 0:
                    new, res_prev, res_last = _adaptive_restart(fixed_point_residual, x, y, acc_x / count,
                                                                acc_y / count, res_prev, res_last, count, it)
                elif not adaptive and count == restart:
                    new = (acc_x / count, acc_y / count)
                if new is not None:
                    x, y = new
                    r = f.K @ x - f.bb
                    y_bar = y + step_d * hat() * r
                    acc_x, acc_y, count = np.zeros_like(x), np.zeros_like(y), 0
            z = x[f.owner_copy]
            eq = np.max(np.abs(r[:f.n_eq] / f.row_scale) / b_eq, initial=0)
            co = np.abs(r[f.n_eq:]).max(initial=0)
            obj = lp.objective(z)
            row = [it, obj, co, eq, step]
            if z_ref is not None:
                row += [abs(obj - obj_ref) / max(abs(obj_ref), 1e-12), np.abs(z - z_ref).max()]
            rows.append(row)
            if not (np.isfinite(obj) and np.isfinite(step) and np.isfinite(co)):
                status = "diverged"
                break
            if co <= tol and eq <= tol and step <= tol:
                status = "converged"
                break
        elapsed = time.perf_counter() - t0
        z = x[f.owner_copy]
        cols = ["iteration", "objective", "coordination", "equality", "step"]
        cols += ["gap", "distance"] if z_ref is not None else []
        settings = {"rho": rho, "gamma": gamma, "private": private, "private_range": private_range,
                    "restart": restart, "precondition": precondition, "tol": tol, "seed": seed}
        return PACResult(z=z, x=x, y=y, objective=lp.objective(z), iterations=it, status=status,
                         history=pd.DataFrame(rows, columns=cols).set_index("iteration"), time=elapsed,
                         violation=lp.violation(z), settings=settings)


def _adaptive_restart(residual, x, y, x_avg, y_avg, res_prev, res_last, count, it):
    """PDLP's restart test on the fixed-point residual: restart (at the average or the current iterate,
    whichever is closer to a saddle) when the residual fell below 0.2 times its value at the last
    restart, or below 0.8 times and stopped falling, or when the epoch is 36 % of the run so far.
    Returns ``(new iterate or None, the candidate's residual, the residual at the last restart)``."""
    r_avg, r_cur = residual(x_avg, y_avg), residual(x, y)
    cand, res = ((x_avg, y_avg), r_avg) if r_avg < r_cur else ((x, y), r_cur)
    if (res <= BETA_SUFFICIENT * res_last or (res <= BETA_NECESSARY * res_last and res > res_prev)
            or count >= BETA_ARTIFICIAL * it):
        return cand, res, res
    return None, res, res_last


def _initial_copies(f: PACForm) -> np.ndarray:
    """Mid-bound where both bounds are finite, 1 for squared voltages, else 0 (then clipped to the box)."""
    lo, hi = f.lower, f.upper
    both = np.isfinite(lo) & np.isfinite(hi)
    x = np.where(both, (np.where(both, lo, 0) + np.where(both, hi, 0)) / 2, 0.0)
    v = f.dec.lp.columns.get("v")
    if v is not None:
        x[(f.dec.copy_col >= v.start) & (f.dec.copy_col < v.stop)] = 1.0
    return np.clip(x, lo, hi)


def _atom_gamma(gamma, dec: Decomposition) -> np.ndarray:
    """One over-relaxation per atom, checked."""
    g = np.asarray(gamma, float)
    if g.ndim == 0:
        g = np.full(dec.n_subsystems, float(g))
    if g.shape != (dec.n_subsystems,):
        raise ValueError(f"gamma must be a scalar or one value per atom ({dec.n_subsystems}), "
                         f"got shape {g.shape}")
    bad = ~(np.isfinite(g) & (g > 0))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"gamma of atom {dec.names[j]!r} is {g[j]}: it must be positive and finite")
    return g


def _check_settings(rho, max_iter, tol, private_range, restart):
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be positive and finite, got {rho}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    lo, hi = private_range
    if not 0 < lo <= hi < 1:
        raise ValueError("private_range must satisfy 0 < low <= high < 1 (gamma_hat strictly between 0 "
                         f"and gamma), got {private_range}")
    period = isinstance(restart, (int, np.integer)) and not isinstance(restart, bool) and restart >= 0
    if not (restart == "adaptive" or period):
        raise ValueError(f"restart must be 0 (off), a positive period or 'adaptive', got {restart!r}")
