"""Solver-free ADMM on the component-wise consensus form, one implementation for numpy and CuPy.

With ``z`` the global vector (bounds ``l <= z <= u``), ``x`` the stacked local copies and ``lam``
their multipliers, one iteration of Ryu, Byeon and Kim (PSCC 2024) is

1. global:  ``z_i = clip(sum_copies (rho x - lam) / (rho n_i + q_i), l_i, u_i)``  (``q_i``: diagonal
   quadratic cost, 0 for an LP)
2. local:   ``x_s = P_s (B_s z + (lam_s - c_s) / rho) + k_s``    (batched per size group)
3. dual:    ``lam += rho (B z - x)``

and it stops when the primal residual ``||B z - x||`` and the dual residual ``rho ||B (z - z_prev)||``
are both below ``tol``. The linear cost of a column is shared equally by its copies; a diagonal
quadratic cost (the losses and voltage-deviation objectives) is kept on the global update, where it
stays separable, so the local projectors never depend on ``rho``. That is what makes the accelerations
cheap: residual balancing changes ``rho`` without refactoring anything.

Accelerations beyond the paper (all off by default, so the default reproduces it):
``anderson=m`` (type-II Anderson acceleration with a safeguard), ``halpern=True`` with
``reflect=1.0`` (restarted reflected Halpern iteration, O(N) per step: the one that scales to IEEE
8500), ``adaptive=True`` (residual balancing, Boyd et al. 2011, section 3.4.1), ``relax`` in (1, 2)
(over-relaxation, section 3.4.3) and ``warm_start`` (the iterates of a previous solve).

On a GPU the cost of one iteration is mostly kernel launches and host round trips, not arithmetic.
Two things remove them: the global update sums the copies by a padded gather (``bincount`` would ask
the host for the largest index, a synchronization, every iteration), and ``graph=True`` keeps every
control variable on the device, Halpern's restart test included, so that ``check_every`` iterations
are captured once as a CUDA graph and replayed with one launch. On numpy the same device-resident loop
runs eagerly, which is how its iterates are tested against the plain loop. ``fuse=True`` compiles
each elementwise step of the iteration (:mod:`dopfkit.distributed.kernels`) into one CuPy kernel.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from dopfkit.backend import array_module, to_host
from dopfkit.distributed.decomposition import Decomposition, padded_groups
from dopfkit.distributed.kernels import ElementwiseSteps


@dataclass
class ADMMState:
    """Iterates, on the host (numpy), so that a later solve can start from them (in the
    decomposition's variables: ``z / dec.scale`` where the decomposition is scaled)."""
    z: np.ndarray
    x: np.ndarray
    lam: np.ndarray
    rho: float


@dataclass
class ADMMResult:
    z: np.ndarray                   # the global vector: the solution of the LP
    objective: float
    iterations: int
    converged: bool
    primal_residual: np.ndarray     # per iteration
    dual_residual: np.ndarray
    rho: np.ndarray                 # per iteration (changes only with adaptive=True)
    times: dict                     # seconds per iteration: global, local, dual, total; and total
    violation: float                # lp.violation(z): scaled equality residual or bound violation
    state: ADMMState
    device: str
    dtype: str

    def summary(self) -> dict:
        return {"iterations": self.iterations, "converged": self.converged,
                "objective": self.objective, "violation": self.violation, "device": self.device,
                "dtype": self.dtype, **{f"{k}_s": v for k, v in self.times.items()}}


@dataclass
class ADMMSettings:
    rho: float = 100.0
    tol: float = 1e-3               # on the 2-norms of the primal and dual residuals
    max_iter: int = 50_000
    adaptive: bool = False          # residual balancing
    mu: float = 10.0                # ... when one residual exceeds mu times the other
    tau: float = 2.0                # ... multiply or divide rho by tau
    adapt_every: int = 10
    relax: float = 1.0              # over-relaxation factor (1: none)
    check_every: int = 1            # GPU: test convergence every k iterations (one host sync each)
    timing: bool = False            # synchronize after every step to time global/local/dual apart
    anderson: int = 0               # Anderson acceleration memory (0: off)
    anderson_safeguard: float = 2.0
    halpern: bool = False           # restarted Halpern iteration (anchored averaging, adaptive restarts)
    reflect: float = 0.0            # ... on the relaxed map (1 + reflect) T - reflect I (0 <= reflect <= 1)
    graph: bool = False             # device-resident loop, check_every iterations per CUDA graph (CuPy)
    fuse: bool = False              # CuPy: each elementwise step one fused kernel (numpy: no effect)


class ADMM:
    """The arrays of one decomposition on one device, and the iteration."""

    def __init__(self, dec: Decomposition, device: str = "cpu", dtype=np.float64, buckets: int | None = None):
        """``buckets``: merge the size groups into that many zero-padded batches
        (:func:`~dopfkit.distributed.decomposition.padded_groups`): the same iterates in fewer, larger
        batched products, which a GPU runs with fewer kernel launches; None keeps one batch per size."""
        xp = self.xp = array_module(device)
        self.dec, self.device, self.dtype = dec, device, np.dtype(dtype)
        ncol = dec.lp.A.shape[1]
        self.scale = np.ones(ncol) if dec.scale is None else dec.scale
        lp = dec.lp.scaled(self.scale) if dec.scale is not None else dec.lp    # the LP in z / scale
        n = np.maximum(dec.n_copies, 1)
        q = lp.Q.diagonal() if lp.Q is not None else np.zeros(ncol)
        orphan = dec.n_copies == 0
        self._check_orphans(orphan, lp.c, q, lp.lower, lp.upper)
        put = lambda a: xp.asarray(np.asarray(a, dtype=self.dtype))  # noqa: E731
        self.copy_col = xp.asarray(dec.copy_col)
        self.n_col = put(dec.n_copies)
        self.lower, self.upper = put(lp.lower), put(lp.upper)
        self.q = put(q)
        # orphan columns (no row touches them) minimize c z + q z^2 / 2 alone: fold c into the numerator
        self.c_orphan = put(np.where(orphan, lp.c, 0.0))
        self.c_copy = put(lp.c[dec.copy_col] / n[dec.copy_col])
        # the local step's batches: contiguous size groups, or zero-padded ones read through an index
        self.groups = [] if buckets else [(g.start, g.stop, g.size, g.n, put(g.P), put(g.k))
                                          for g in dec.groups]
        self.padded = []
        for index, P, k in padded_groups(dec.groups, buckets) if buckets else []:
            flat = index.ravel()
            self.padded.append((xp.asarray(np.maximum(index, 0)), xp.asarray(np.flatnonzero(flat >= 0)),
                                xp.asarray(flat[flat >= 0]), put(P), put(k)))
        self.ncol, self.ncopy = ncol, len(dec.copy_col)
        # rho x - lam goes into a buffer whose extra last slot stays 0; on a GPU the copies are summed
        # per column by a padded gather (no host synchronization) that reads that slot for padding
        self.copies_of = None if xp is np else xp.asarray(copies_by_column(dec.copy_col, ncol))
        self._v = xp.zeros(len(dec.copy_col) + 1, self.dtype)
        self.steps = ElementwiseSteps(xp)
        # MPI replaces these by allreduce (dopfkit.distributed.mpi); one process sums nothing
        self.reduce = self.reduce_scalar = lambda a: a

    @staticmethod
    def _check_orphans(orphan, c, q, lo, hi):
        free = orphan & (q == 0) & (((c > 0) & ~np.isfinite(lo)) | ((c < 0) & ~np.isfinite(hi)))
        if free.any():
            raise ValueError(f"column {int(np.flatnonzero(free)[0])} is in no constraint and unbounded "
                             "in the direction of its cost: the LP is unbounded")

    # -- the three updates -------------------------------------------------------------------
    def global_update(self, x, lam, rho):
        """Clamped average of the copies. ``reduce`` sums the partial sums of all MPI ranks (the only
        communication the algorithm needs); in one process it is the identity."""
        xp, rho = self.xp, self.dtype.type(rho)
        self.steps.consensus_terms(self._v[:-1], x, lam, rho)
        if self.copies_of is None:
            s = xp.bincount(self.copy_col, weights=self._v[:-1], minlength=self.ncol)
            s = s.astype(self.dtype, copy=False)
        else:
            s = column_sums(self._v, self.copies_of)
        return self.steps.clamped_average(self.reduce(s), self.c_orphan, rho, self.n_col, self.q,
                                          self.lower, self.upper)

    def residual_norms(self, w_z, x_new, w_prev, lam, lam_new, rho, relax):
        """The primal residual's 2-norm and the dual's before its factor rho, over the copies of every
        rank, in one reduction. ``sum(d * d)`` rather than ``d @ d``: a threaded BLAS dot stalls for
        milliseconds when the other cores are busy."""
        xp, squared = self.xp, self.steps.squared_distance
        primal = squared(w_z, x_new, None) if relax == 1.0 else squared(lam_new, lam, self.dtype.type(rho))
        return xp.sqrt(self.reduce_scalar(xp.stack([primal, squared(w_z, w_prev, None)])))

    def local_update(self, w, lam, rho, out):
        """``x_s = P_s (w_s + (lam_s - c_s) / rho) + k_s`` for every group; ``w = B z``."""
        xp = self.xp
        y = self.steps.local_target(w, lam, self.c_copy, self.dtype.type(rho))
        for gather, slots, copies, P, k in self.padded:     # padding slots read any copy: P zeroes it
            out[copies] = (xp.matmul(P, y[gather][..., None])[..., 0] + k).reshape(-1)[slots]
        for start, stop, G, n, P, k in self.groups:
            out[start:stop] = (xp.matmul(P, y[start:stop].reshape(G, n, 1))[..., 0] + k).reshape(-1)
        return out

    def initial_x(self) -> np.ndarray:
        """The paper's start (:func:`paper_start`), copied into every subsystem."""
        return (paper_start(self.dec.lp) / self.scale)[self.dec.copy_col]

    def step(self, x, lam, rho, relax=1.0, sync=None, clock=None):
        """One iteration from ``(x, lam)``: ``z, x_new, lam_new, Bz``; step times added to ``clock``."""
        t0 = time.perf_counter()
        steps, dt = self.steps, self.dtype.type
        z = self.global_update(x, lam, rho)
        w_z = z[self.copy_col]
        w = steps.over_relaxed(w_z, x, dt(relax), dt(1 - relax)) if relax != 1.0 else w_z
        if sync:
            sync()
        t1 = time.perf_counter()
        x_new = self.local_update(w, lam, rho, self.xp.empty_like(x))
        if sync:
            sync()
        t2 = time.perf_counter()
        lam_new = steps.dual_update(lam, dt(rho), w, x_new)
        if sync:
            sync()
        if clock is not None:
            clock[0] += t1 - t0
            clock[1] += t2 - t1
            clock[2] += time.perf_counter() - t2
        return z, x_new, lam_new, w_z

    def solve(self, settings: ADMMSettings | None = None, warm_start: ADMMState | None = None,
              callback=None) -> ADMMResult:
        s = settings or ADMMSettings()
        xp, dt = self.xp, self.dtype
        if s.graph and (s.adaptive or s.anderson or s.timing):
            raise ValueError("ADMMSettings(graph=True) runs a fixed sequence of device operations: it "
                             "cannot change rho (adaptive), run Anderson's host solve or time the steps")
        sync = _synchronizer(xp)
        self.steps = ElementwiseSteps(xp, s.fuse)
        if warm_start is None:
            x = xp.asarray(self.initial_x().astype(dt))
            lam = xp.zeros(self.ncopy, dt)
            rho = float(s.rho)
        else:
            x, lam = xp.asarray(warm_start.x.astype(dt)), xp.asarray(warm_start.lam.astype(dt))
            rho = float(warm_start.rho)
        loop = self._iterate_resident if s.graph else self._iterate
        hist, clock = ([], [], []), [0.0, 0.0, 0.0]
        sync()
        t_start = time.perf_counter()
        it, converged, z, x, lam, rho = loop(s, x, lam, rho, hist, clock, callback)
        sync()
        total = time.perf_counter() - t_start
        z_h = to_host(z)
        state = ADMMState(z=z_h, x=to_host(x), lam=to_host(lam), rho=rho)
        lp = self.dec.lp
        per = {"global": clock[0] / it, "local": clock[1] / it, "dual": clock[2] / it,
               "iteration": total / it, "total": total}
        z64 = z_h.astype(float) * self.scale
        return ADMMResult(z=z64, objective=lp.objective(z64), iterations=it, converged=converged,
                          primal_residual=np.array(hist[0]), dual_residual=np.array(hist[1]),
                          rho=np.array(hist[2]), times=per, violation=lp.violation(z64), state=state,
                          device=self.device, dtype=self.dtype.name)

    def _iterate(self, s, x, lam, rho, hist, clock, callback):
        """The loop on the host: residuals read back every ``check_every`` iterations."""
        sync = _synchronizer(self.xp)
        w_prev = self.global_update(x, lam, rho)[self.copy_col]
        accel = _Anderson(self.xp, s.anderson, s.anderson_safeguard) if s.anderson else \
            _Halpern(self.steps, s.reflect, self.reduce_scalar) if s.halpern else None
        pending = []
        it, converged = 0, False
        while it < s.max_iter:
            it += 1
            z, x_new, lam_new, w_z = self.step(x, lam, rho, s.relax, sync if s.timing else None, clock)
            r_dev, s_dev = self.residual_norms(w_z, x_new, w_prev, lam, lam_new, rho, s.relax)
            s_dev = rho * s_dev
            w_prev = w_z
            x, lam = (x_new, lam_new) if accel is None else accel.update(x, lam, x_new, lam_new, rho)
            pending.append((r_dev, s_dev, rho))
            if it % s.check_every == 0 or it == s.max_iter:
                vals = [(float(a), float(b), c) for a, b, c in pending]
                pending.clear()
                for h, v in zip(hist, zip(*vals)):
                    h += v
                r_now, s_now = vals[-1][0], vals[-1][1]
                if callback is not None:
                    callback(it, z, r_now, s_now, rho)
                if r_now <= s.tol and s_now <= s.tol:
                    converged = True
                    break
                if s.adaptive and it % s.adapt_every == 0:
                    if r_now > s.mu * s_now:
                        rho *= s.tau
                    elif s_now > s.mu * r_now:
                        rho /= s.tau
                    if accel is not None and rho != vals[-1][2]:
                        accel.reset()
        return it, converged, z, x, lam, rho

    def _iterate_resident(self, s, x, lam, rho, hist, clock, callback):
        """The same iterates as :meth:`_iterate` (fixed rho), with the state in device buffers that
        :meth:`_block` updates in place without a host round trip. On CuPy the first block runs
        eagerly (compiling every kernel and filling the memory pool), the next ones replay one CUDA
        graph of it; the residuals come back once per block."""
        xp, n = self.xp, s.check_every
        st = SimpleNamespace(x=x.copy(), lam=lam.copy(), z=xp.empty(self.ncol, self.dtype),
                             w_prev=self.global_update(x, lam, rho)[self.copy_col],
                             hist=xp.empty((n, 2), self.dtype),
                             halpern=_Halpern(self.steps, s.reflect) if s.halpern else None)
        graph = _GraphRunner(xp, lambda: self._block(st, n, rho, s.relax)) if xp is not np else None
        it, converged = 0, False
        while it < s.max_iter:
            m = min(n, s.max_iter - it)
            if graph is not None and m == n:
                graph.run()
            else:
                self._block(st, m, rho, s.relax)
            it += m
            r, d = to_host(st.hist[:m]).astype(float).T
            hist[0].extend(r)
            hist[1].extend(d)
            hist[2].extend([rho] * m)
            if callback is not None:
                callback(it, st.z, r[-1], d[-1], rho)
            if r[-1] <= s.tol and d[-1] <= s.tol:
                converged = True
                break
        return it, converged, st.z, st.x, st.lam, rho

    def _block(self, st, n, rho, relax):
        """``n`` iterations on the buffers of ``st``; row i of ``st.hist`` gets iteration i's primal
        and dual residuals. Nothing here reads a value back to the host."""
        for i in range(n):
            z, x_new, lam_new, w_z = self.step(st.x, st.lam, rho, relax)
            norms = self.residual_norms(w_z, x_new, st.w_prev, st.lam, lam_new, rho, relax)
            st.hist[i, 0] = norms[0]
            st.hist[i, 1] = rho * norms[1]
            st.w_prev[...] = w_z
            if st.halpern is not None:
                x_new, lam_new = st.halpern.update(st.x, st.lam, x_new, lam_new, rho)
            st.x[...] = x_new
            st.lam[...] = lam_new
            st.z[...] = z


def copies_by_column(copy_col: np.ndarray, ncol: int) -> np.ndarray:
    """``(ncol, max copies)`` index of every column's copies, padded with ``len(copy_col)`` (an
    extra zero slot), so that a gather and a row sum add up the copies of each column."""
    order = np.argsort(copy_col, kind="stable")
    counts = np.bincount(copy_col, minlength=ncol)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(copy_col)) - first[copy_col[order]]
    index = np.full((ncol, max(int(counts.max(initial=0)), 1)), len(copy_col))
    index[copy_col[order], slot] = order
    return index


def column_sums(values_and_zero, index):
    """Per-column sums of the values (one per copy, then a 0 that the padding reads) through
    :func:`copies_by_column`'s index: the numbers of ``bincount(copy_col, weights=values)``, in two
    kernels that never synchronize."""
    return values_and_zero[index].sum(axis=1)


def paper_start(lp) -> np.ndarray:
    """The paper's start: 0 for unbounded entries, mid-bound if bounded, 1 for squared voltages (their
    fixed value where a voltage is fixed)."""
    lo, hi = lp.lower, lp.upper
    both = np.isfinite(lo) & np.isfinite(hi)
    z0 = np.where(both, (np.where(both, lo, 0) + np.where(both, hi, 0)) / 2, 0.0)
    v = lp.columns["v"]
    z0[v] = np.where(lo[v] == hi[v], lo[v], 1.0)
    return z0


class _Anderson:
    """Type-II Anderson acceleration of the ADMM map ``(x, lam/rho) -> T(x, lam/rho)``.

    The last ``m`` differences of residuals and of images are kept in ring buffers with their Gram
    matrix, so one update costs O(m N) and a small m x m solve (normal equations, lightly
    regularized). Safeguard: when the fixed-point residual grows by more than ``safeguard`` times,
    the memory is cleared and the plain ADMM iterate is taken."""

    def __init__(self, xp, m: int, safeguard: float, reg: float = 1e-10):
        self.xp, self.m, self.safeguard, self.reg = xp, m, safeguard, reg
        self.dG = self.dF = None
        self.reset()

    def reset(self):
        self.count, self.g_prev, self.f_prev, self.g_norm = 0, None, None, None
        self.gram = np.zeros((self.m, self.m))

    def update(self, x, lam, x_new, lam_new, rho):
        xp = self.xp
        s = xp.concatenate([x, lam / rho])
        f = xp.concatenate([x_new, lam_new / rho])
        g = f - s
        g_norm = float(xp.linalg.norm(g))
        if self.g_norm is not None and g_norm > self.safeguard * self.g_norm and self.count:
            self.reset()                             # the last extrapolation made things worse
        if self.dG is None:
            self.dG = xp.zeros((self.m, g.size), g.dtype)
            self.dF = xp.zeros_like(self.dG)
        if self.g_prev is not None:
            slot = self.count % self.m
            self.dG[slot] = g - self.g_prev
            self.dF[slot] = f - self.f_prev
            row = to_host(self.dG @ self.dG[slot]).astype(float)
            self.gram[slot, :], self.gram[:, slot] = row, row
            self.count += 1
        self.g_prev, self.f_prev, self.g_norm = g, f, g_norm
        k = min(self.count, self.m)
        if k:
            H = self.gram[:k, :k] + self.reg * np.trace(self.gram[:k, :k]) * np.eye(k)
            rhs = to_host(self.dG[:k] @ g).astype(float)
            gamma = np.linalg.solve(H, rhs)
            f = f - xp.asarray(gamma.astype(self.dF.dtype)) @ self.dF[:k]
        n = x.shape[0]
        return f[:n], f[n:] * rho


class _Halpern:
    """Restarted Halpern iteration on the ADMM map: ``s <- (k+1)/(k+2) T(s) + 1/(k+2) s_anchor``,
    with the anchor moved to the current point whenever the fixed-point residual has fallen to a fifth
    of its value at the last restart, or to 0.8 of it and stopped improving (the restart rules of
    restarted Halpern PDHG for LPs, Lu and Yang 2024). O(N) per iteration, no memory.

    A third rule restarts when the residual has *grown* to ``grow`` times its value at the last
    restart. Halpern's anchor does not damp the rounding error of ``T``: an error e per step adds up to
    about k e / 2 after k steps, so in float32 (e ~ 1e-7 relative) the iterate can drift once k
    reaches a few hundred: on IEEE 123 at rho 10 the residual stopped short of the tolerance and
    climbed until this rule was added (tests/test_distributed_admm.py checks float32 converges there).

    The point is kept in two halves, the copies ``x`` and the multipliers over rho, and the control
    state (step count, residuals at the anchor and at the last step) in float64 device scalars, the
    restart test a select: no step reads a value back to the host, which is what lets the device-
    resident loop replay it as a CUDA graph, and eight kernels do a step where fused
    (:mod:`dopfkit.distributed.kernels`). The residual at the anchor starts infinite, which makes the
    first step a restart onto the start point."""

    def __init__(self, steps: ElementwiseSteps, reflect: float = 0.0, reduce_scalar=lambda a: a,
                 sufficient: float = 0.2, necessary: float = 0.8, grow: float = 2.0):
        # reduce_scalar: the residual norm spans every MPI rank, so all ranks restart together
        self.steps, self.xp, self.reflect, self.reduce = steps, steps.xp, reflect, reduce_scalar
        self.sufficient, self.necessary, self.grow = sufficient, necessary, grow
        self.anchor = None
        self.k, self.r_anchor, self.r_prev = (self.xp.asarray(v, np.float64) for v in (0.0, np.inf, np.inf))

    def reset(self):
        """Restart at the next step."""
        self.r_anchor[...] = np.inf

    def update(self, x, lam, x_new, lam_new, rho):
        steps, dt = self.steps, x.dtype.type
        if self.anchor is None:
            self.anchor = (self.xp.zeros_like(x), self.xp.zeros_like(lam))
        reflect = (dt(self.reflect), dt(1 + self.reflect)) if self.reflect else (None, None)
        halves = [(x, x_new, None), (lam, lam_new, dt(rho))]
        pairs = [steps.halpern_pair(s, t, scale, *reflect) if scale is not None or self.reflect else (s, t)
                 for s, t, scale in halves]
        (sx, tx), (sl, tl) = pairs
        r2 = steps.squared_distance(tx, sx, None) + steps.squared_distance(tl, sl, None)
        restart, weight, count = steps.halpern_control(self.reduce(r2), self.k, self.r_anchor, self.r_prev,
                                                       self.sufficient, self.necessary, self.grow)
        return tuple(steps.halpern_point(anchor, restart, s, t, scale, weight, count)
                     for anchor, (s, t), (_, _, scale) in zip(self.anchor, pairs, halves))


class _GraphRunner:
    """Runs ``block`` (device work only, in place on buffers it holds) eagerly once, then captures it as
    a CUDA graph on a stream of its own and replays the graph. The capture allocates from a private
    memory pool that lives as long as the graph: the addresses the graph writes to are never handed to
    another array."""

    def __init__(self, cp, block):
        self.cp, self.block, self.graph, self.warm = cp, block, None, False
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()

    def run(self):
        cp = self.cp
        cp.cuda.Device().synchronize()              # the buffers were last written on the null stream
        with self.stream:
            if not self.warm:
                self.block()
                self.warm = True
            else:
                if self.graph is None:
                    self.graph = self._capture()
                self.graph.launch(self.stream)
        self.stream.synchronize()

    def _capture(self):
        with self.cp.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self.block()
            finally:
                graph = self.stream.end_capture()
        return graph


def _synchronizer(xp):
    if xp is np:
        return lambda: None
    return lambda: xp.cuda.Stream.null.synchronize()

