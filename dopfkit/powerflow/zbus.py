"""Z-bus (fixed-point current injection) power flow, batched over load scenarios.

OpenDSS's own method, written in a few lines: keep the network *and* each load's nominal admittance
in one system matrix, factor it once, and correct for the difference between the true load currents
and the nominal-admittance currents by injections::

    (Y + Y_load) V^{k+1} = I_source - M^T ( i(M V^k) - y_nom M V^k ) / s_base

Near nominal voltage the correction is small, so the iteration contracts fast (a handful of
iterations to 1e-10 pu). Scenarios are columns of ``V``: one factorization, one multi-right-hand-side
solve per iteration, no per-scenario Python overhead.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dopfkit.backend import array_module
from dopfkit.network.math_model import Network
from dopfkit.powerflow.loads import load_currents
from dopfkit.powerflow.result import PowerFlowError, PowerFlowResult


class ZBusSolver:
    """Factor once, then solve any number of snapshots or scenario batches.

    ``linear="sparse"`` uses a sparse LU (SuperLU); ``"dense"`` precomputes ``Z = Y^-1`` and turns
    each iteration into one matrix product, which is what a GPU does best.
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
            self._solve = self._lu.solve
        elif self.linear == "dense":
            Z = xp.asarray(np.linalg.inv(y_sys.toarray()), dtype=dtype)
            self._solve = lambda rhs: Z @ rhs
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

    def solve(self, load_scale=1.0, v0=None, tol: float = 1e-10, max_iter: int = 100,
              raise_on_fail: bool = True) -> PowerFlowResult:
        xp = self.xp
        s = xp.asarray(self.pair_powers(load_scale), dtype=self.dtype)
        batch = s.ndim == 2
        i_src = self._i_source[:, None] if batch else self._i_source
        y_nom = self._y_nom[:, None] if batch else self._y_nom
        if v0 is None:
            v = self._solve(xp.broadcast_to(i_src, (self.net.n, s.shape[1])) if batch else i_src)
        else:
            v = xp.asarray(v0, dtype=self.dtype)
        history = []
        for _ in range(max_iter):
            u = self._M @ v
            rhs = i_src - self._MT @ (load_currents(u, s, self.net.loads, xp) - y_nom * u) \
                / self.net.sbase
            v_new = self._solve(rhs)
            history.append(float(xp.abs(v_new - v).max()))
            v = v_new
            if history[-1] < tol or _stalled(history, tol):
                break
        converged = history[-1] < tol or _stalled(history, tol)
        result = PowerFlowResult(self.net, _to_numpy(v), iterations=len(history),
                                 history=history, converged=converged, method=f"zbus-{self.linear}",
                                 load_scale=load_scale, extra={"stalled": history[-1] >= tol})
        if not converged and raise_on_fail:
            raise PowerFlowError(self.net.name, history, tol)
        return result


def _stalled(history: list[float], tol: float) -> bool:
    """A load sitting exactly on an OpenDSS model boundary (|u| = vmax) can make the iteration
    hop between two regimes forever, a 2-cycle far below any meaningful accuracy. Accept it when
    the step no longer shrinks and is within 100 tol; the result says so in ``extra["stalled"]``."""
    return len(history) >= 4 and history[-1] < 100 * tol and history[-1] >= 0.9 * history[-3]


def _to_device_csr(m: sp.spmatrix, dtype):
    import cupyx.scipy.sparse as csp
    return csp.csr_matrix(m.astype(dtype))


def _to_numpy(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


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
