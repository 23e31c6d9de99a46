"""Z-bus (fixed-point current injection) power flow, batched over load scenarios.

OpenDSS's own method, written in a few lines: keep the network *and* each load's nominal admittance
in one system matrix, factor it once, and correct for the difference between the true load currents
and the nominal-admittance currents by injections::

    (Y + Y_load) V^{k+1} = I_source - M^T ( i(M V^k) - y_nom M V^k ) / s_base

Near nominal voltage the correction is small, so the iteration contracts fast (a handful of
iterations to 1e-10 pu). Scenarios are columns of ``V``: one factorization, one multi-right-hand-side
solve per iteration, no per-scenario Python overhead. A column leaves the batch as soon as its own
step is below ``tol``: scenarios differ widely (IEEE 8500: ~17 iterations at half load, ~90 at 1.1).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dopfkit.backend import array_module, to_host
from dopfkit.network.math_model import Network
from dopfkit.powerflow.loads import load_model
from dopfkit.powerflow.result import PowerFlowError, PowerFlowResult

try:    # y += A @ x for CSR A, in place; scipy's (private, long-stable) kernel behind csr @ dense
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover
    _csr_matvecs = None


class ZBusSolver:
    """Factor once, then solve any number of snapshots or scenario batches.

    ``linear="sparse"`` uses a sparse LU (SuperLU; its factors solved level by level for batches);
    ``"dense"`` precomputes ``Z = Y^-1`` and turns each iteration into one matrix product, which is
    what a GPU does best.
    """

    def __init__(self, net: Network, device: str = "cpu", linear: str | None = None,
                 dtype=np.complex128):
        self.net, self.device, self.dtype = net, device, dtype
        self.xp = xp = array_module(device)
        self.linear = linear or ("dense" if device == "gpu" else "sparse")
        pairs = net.loads
        s = pairs.s_nom
        # every load's and injection's nominal admittance goes into the factored matrix, as in
        # OpenDSS: it is what grounds a DER behind a delta winding in the linear solve
        self.y_nom = np.conj(s) / pairs.v_nom**2
        y_sys = (net.Y + pairs.M.T @ sp.diags(self.y_nom) @ pairs.M / net.sbase).tocsc()
        if self.linear == "sparse":
            if device != "cpu":
                raise ValueError("linear='sparse' runs on the CPU; use linear='dense' on the GPU")
            self._lu = spla.splu(y_sys)
            self._levels = None                  # built on the first batch that pays for it
        elif self.linear == "dense":
            # Z = Y^-1 in double precision (cond(Y) reaches 1e15), on the device that uses it: on a GPU
            # by cuSOLVER; LAPACK took 80 s for IEEE 8500 (8531 nodes) on two CPU cores
            y_dense = xp.asarray(y_sys.toarray(), dtype=np.complex128)
            self._Z = xp.linalg.inv(y_dense).astype(dtype, copy=False)
        else:
            raise ValueError(f"linear must be 'sparse' or 'dense', not {linear!r}")
        self._M = pairs.M if device == "cpu" else _to_device_csr(pairs.M, dtype)
        self._MT = self._M.T.tocsr()
        self._i_source = xp.asarray(net.i_source, dtype=dtype)
        self._y_nom = xp.asarray(self.y_nom, dtype=dtype)

    def pair_powers(self, load_scale=1.0) -> np.ndarray:
        """Nominal VA of every load pair, scaled per load element and per scenario (OpenDSS's
        LoadMult: loads with status=fixed and DER injections keep their power).

        ``load_scale``: a scalar, one value per scenario (S,), or one per load element and scenario
        (n_loads, S). A single snapshot with per-load factors is therefore ``(n_loads, 1)``.
        """
        pairs = self.net.loads
        scale = np.asarray(load_scale, float)
        if scale.ndim == 1:
            scale = scale[None, :]
        elif scale.ndim == 2:
            scale = scale[pairs.element]
        keep = pairs.scalable if scale.ndim == 0 else pairs.scalable[:, None]
        s = pairs.s_nom if scale.ndim == 0 else pairs.s_nom[:, None]
        return np.where(keep, s * scale, s)       # fixed loads and DERs, like OpenDSS, do not scale

    def _solve(self, rhs):
        if self.linear == "dense":
            return self._Z @ rhs
        if rhs.shape[1] < LEVEL_MIN_RHS:
            return self._lu.solve(np.asfortranarray(rhs))
        return self._level_lu().solve(rhs)

    def _level_lu(self) -> LevelScheduledLU:
        if self._levels is None:
            self._levels = LevelScheduledLU(self._lu)
        return self._levels

    def solve(self, load_scale=1.0, v0=None, tol: float = 1e-10, max_iter: int = 100,
              raise_on_fail: bool = True) -> PowerFlowResult:
        xp = self.xp
        s = xp.asarray(self.pair_powers(load_scale), dtype=self.dtype)
        batch = s.ndim == 2
        s = s if batch else s[:, None]                    # one code path: scenarios are columns
        n, n_cols = self.net.n, s.shape[1]
        if v0 is None:                                    # the no-load state, the same for all
            v0 = self._solve(self._i_source[:, None])
        v = xp.array(xp.broadcast_to(xp.asarray(v0, dtype=self.dtype).reshape(n, -1), (n, n_cols)))
        # Scenarios are independent. On the CPU, a batch whose voltages outgrow BLOCK_BYTES is
        # solved in blocks of columns (the elementwise work stays in the cache), as many at a time
        # as there are THREADS: the level solve's sparse kernels release the GIL. IEEE 8500, 250
        # scenarios on 2 cores: ~1.4x the throughput of one thread. Smaller batches are not worth
        # a thread: their Python overhead, which holds the GIL, outweighs their arithmetic.
        blocks = [np.arange(n_cols)]
        count = -(-n_cols * n * v.itemsize // BLOCK_BYTES)
        if self.linear == "sparse" and count > 1:
            count = max(1, min(-(-count // THREADS) * THREADS, n_cols // LEVEL_MIN_RHS))  # rounds
            blocks = np.array_split(blocks[0], count)
        threads = min(THREADS, len(blocks))
        if len(blocks) == 1:
            runs = [self._iterate(s, v, tol, max_iter, self._solve)]
        elif threads == 1:
            runs = [self._iterate(s[:, c], v[:, c], tol, max_iter, self._solve) for c in blocks]
        else:       # (concurrent SuperLU solves crawl: the threads use the level solve throughout)
            solve = self._level_lu().solve
            with ThreadPoolExecutor(threads) as pool:
                runs = list(pool.map(lambda c: self._iterate(s[:, c], v[:, c], tol, max_iter, solve),
                                     blocks))
        V = runs[0][0] if len(runs) == 1 else np.concatenate([r[0] for r in runs], axis=1)
        longest = max(len(r[1]) for r in runs)
        history = [max(r[1][k] for r in runs if k < len(r[1])) for k in range(longest)]
        converged, stalled = all(r[2] for r in runs), any(r[3] for r in runs)
        result = PowerFlowResult(self.net, to_host(V if batch else V[:, 0]),
                                 iterations=len(history), history=history, converged=converged,
                                 method=f"zbus-{self.linear}", load_scale=load_scale,
                                 extra={"stalled": stalled})
        if not converged and raise_on_fail:
            raise PowerFlowError(self.net.name, history, tol)
        return result

    def _iterate(self, s, v, tol, max_iter, solve):
        """The fixed point on the columns of ``v`` (overwritten). A column leaves as soon as its own
        step is below ``tol``. Returns V, the history of the largest step, converged, stalled."""
        xp = self.xp
        i_src, y_nom, scale = self._i_source[:, None], self._y_nom[:, None], -1 / self.net.sbase
        V = xp.empty_like(v)
        cols = xp.arange(v.shape[1])                      # the columns still iterating
        currents = load_model(s, self.net.loads, xp)
        v_nom = xp.asarray(self.net.loads.v_nom)[:, None] / self.net.sbase
        history, i_pairs = [], None
        for _ in range(max_iter):
            u = self._M @ v
            i_prev, i_pairs = i_pairs, currents(u)
            rhs = self._MT @ ((i_pairs - y_nom * u) * scale)
            rhs += i_src
            v_new = solve(rhs)
            v -= v_new                                    # the step, in place: batches are large
            step = xp.abs(v).max(axis=0)
            history.append(float(step.max()))
            v = v_new
            if history[-1] < tol or _stalled(history, tol, i_pairs, i_prev, v_nom, xp):
                break
            done = step < tol
            if bool(done.any()):                          # retire converged columns
                V[:, cols[done]] = v[:, done]
                keep = ~done
                v, cols, s = v[:, keep], cols[keep], s[:, keep]
                currents = load_model(s, self.net.loads, xp)
        V[:, cols] = v
        converged = history[-1] < tol or _stalled(history, tol, i_pairs, i_prev, v_nom, xp)
        return V, history, converged, history[-1] >= tol


LEVEL_MIN_RHS = 16      # below this many right-hand sides SuperLU's own solve is as fast
BLOCK_BYTES = 24 << 20  # the voltages of one block of scenarios (L3 cache: 32 MB)
# threads for the blocks of a batch (set 1 to stay on one core)
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LevelScheduledLU:
    """Exact solves with SuperLU's factors for many right-hand sides at once.

    SuperLU's multi-RHS solve walks its supernodes (a column or two on a feeder) one at a time; it
    costs 0.2 ms per column on IEEE 8500 at best and slows down sharply past a few dozen columns.
    Here the rows of ``L`` (and of ``U``) are grouped in levels, a level's rows depending only on
    earlier levels; with the rows renumbered level by level, each level is one sparse-times-dense
    product over all columns. A feeder's elimination tree is shallow (IEEE 8500: ~340 levels for
    8531 rows), so the loop over levels is cheap: ~0.13 ms per column at any width from 32 up.
    Same factors, same arithmetic: the result equals SuperLU's to rounding.
    """

    def __init__(self, lu):
        # Pr A Pc = L U with (Pr b)[perm_r] = b and x = Pc z = z[perm_c] (scipy's convention)
        d = lu.U.diagonal()
        self.dtype = d.dtype
        l_order, self._l_blocks = _level_blocks(lu.L.tocsr())
        u_order, self._u_blocks = _level_blocks(sp.diags(1 / d) @ lu.U.tocsr())   # unit diagonal
        self._first = np.argsort(lu.perm_r)[l_order]     # rhs rows in L's level order
        self._between = np.argsort(l_order)[u_order]     # L's level order -> U's
        self._dinv = (1 / d)[u_order][:, None]
        self._last = np.argsort(u_order)[lu.perm_c]      # U's level order -> solution rows

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        y = np.asarray(rhs[self._first], dtype=self.dtype)
        _subtract_levels(self._l_blocks, y)
        y = y[self._between]
        y *= self._dinv
        _subtract_levels(self._u_blocks, y)
        return y[self._last]


def _subtract_levels(blocks, y):
    """``y[a:b] -= T[a:b] @ y`` level after level, in place (``blocks`` hold ``-T[a:b]``)."""
    n, cols = y.shape
    for a, b, neg in blocks:
        if _csr_matvecs is None:
            y[a:b] += neg @ y
        else:       # scipy's kernel behind csr @ dense, accumulating into y: no temporaries
            _csr_matvecs(b - a, n, cols, neg.indptr, neg.indices, neg.data, y.reshape(-1),
                         y[a:b].reshape(-1))


def _level_blocks(T: sp.csr_matrix):
    """Level order of the unit triangular ``T`` and, per level, the rows [a, b) of ``-T``'s strict
    part in that order (they reference columns < a only). The levels are the longest dependency
    paths, found by relaxation: one vectorized pass per level."""
    n = T.shape[0]
    strict = (T - sp.diags(T.diagonal())).tocsr()
    strict.eliminate_zeros()
    rows = np.flatnonzero(np.diff(strict.indptr))
    starts = strict.indptr[rows]
    level = np.zeros(n, dtype=np.int64)
    while True:
        new = np.zeros(n, dtype=np.int64)
        new[rows] = np.maximum.reduceat(level[strict.indices], starts) + 1
        if np.array_equal(new, level):
            break
        level = new
    order = np.argsort(level, kind="stable")
    strict = strict[order][:, order].tocsr()
    bounds = np.searchsorted(level[order], np.arange(level.max() + 2))
    blocks = [(a, b, -strict[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
              if strict.indptr[b] > strict.indptr[a]]           # level 0 has nothing to subtract
    return order, blocks


def _stalled(history: list[float], tol: float, i_pairs=None, i_prev=None, v_nom=None, xp=np) -> bool:
    """Accept a step that no longer shrinks, in two cases; the result says so (``extra["stalled"]``).

    - A load sitting exactly on an OpenDSS model boundary (|u| = vmax) can make the iteration hop
      between two regimes forever, a 2-cycle within 100 tol.
    - Voltages that no load sees can wander at the rounding floor of the linear solve while every
      load's power has settled (its step within 100 tol, per unit): IEEE 9500's 480 V delta islands,
      grounded only through 1-ppm anti-float reactors, against a 0.001-ohm source, float by ~1e-5
      pu in OpenDSS as here.
    """
    if len(history) < 4 or history[-1] < 0.9 * history[-3]:
        return False
    if history[-1] < 100 * tol:
        return True
    if i_prev is None or i_prev.shape != i_pairs.shape:
        return False
    return float(xp.abs((i_pairs - i_prev) * v_nom).max()) < 100 * tol


def _to_device_csr(m: sp.spmatrix, dtype):
    import cupyx.scipy.sparse as csp
    return csp.csr_matrix(m.astype(dtype))



def solve_powerflow(net: Network, load_scale=1.0, method: str = "zbus", **options) -> PowerFlowResult:
    """Solve the network's power flow.

    ``method="zbus"`` (default) is the general method (any topology, any transformer, batched when
    ``load_scale`` has a scenario axis); ``method="bfs"`` is the backward-forward sweep of chapter 2,
    for radial feeders. Options go to the solver (``tol``, ``max_iter``, ``device``, ``linear``).
    """
    if method == "zbus":
        solver_opts = {k: options.pop(k) for k in ("device", "linear", "dtype") if k in options}
        return ZBusSolver(net, **solver_opts).solve(load_scale, **options)
    if method == "bfs":
        from dopfkit.powerflow.bfs import solve_bfs
        return solve_bfs(net, load_scale, **options)
    raise ValueError(f"unknown power flow method {method!r}: use 'zbus' or 'bfs'")
