"""The component-wise ADMM over MPI ranks: every rank holds a contiguous part of the feeder.

Every rank builds the same problem and decomposition, keeps the subsystems of its part
(:meth:`Decomposition.subset`) and runs the single-process :class:`ADMM` on them, with the two
reductions of the algorithm replaced by ``MPI_Allreduce``: the partial sums of the global update and
the squared residual norms. The iterates are those of ``ADMM(decompose(problem)).solve(settings)`` up
to the order of floating-point summation.

Parts follow the feeder (:func:`tree_order`): the subsystems are ordered depth-first along the
feeder tree from the source, heaviest branch last, and the order is cut into ``N`` contiguous chunks of
nearly equal work. Such a range is a connected piece of the feeder plus whole subtrees, so only the
columns at the cuts (a voltage, a flow) have copies on two ranks: 24 of 27902 columns on IEEE 8500
with 2 ranks, 58 with 4 (cutting the subsystem numbering instead shares about 20000). With
``exchange="shared"`` only those columns are reduced; a column held by one rank needs no
communication at all (``exchange="full"`` reduces the whole vector, the simplest correct version).

Run it as ``mpiexec -n 4 python -m dopfkit.distributed.mpi --feeder ieee123``. Numpy's BLAS should
run one thread per rank (``OPENBLAS_NUM_THREADS=1``): threads of several ranks on the same cores
slow the residual dot products down by orders of magnitude.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import scipy.sparse as sp

from dopfkit.distributed.admm import ADMM, ADMMSettings
from dopfkit.distributed.decomposition import Decomposition, breadth_first_levels, decompose, incidence
from dopfkit.opf.problem import pv_problem

EXCHANGES = ("shared", "full")
ORDERS = ("tree", "index")



# -- partition ---------------------------------------------------------------------------------------
def tree_order(dec: Decomposition, root: int = 0) -> np.ndarray:
    """Subsystems in depth-first order of the feeder tree from ``root``, the heaviest branch last.

    The shared-column graph is not a tree (a bus shares its voltage with every line at it, and a
    line's flow with both its buses, so the two buses are adjacent too), and a depth-first search on
    it wanders across branches. Its bus-line edges alone are the feeder itself (bus, line, bus, ...),
    so the tree is built on them: every subsystem's parent is the neighbour one breadth-first level
    closer to ``root`` sharing the most columns with it (without bus/line kinds the whole graph is
    used). In the depth-first order a range ``[0, k)`` is cut from the rest only at the ancestors of
    position ``k`` that have children after it; visiting the heaviest child (the trunk) last leaves
    such ancestors only where the path leaves a light branch, a few even on IEEE 8500. ``decompose``
    numbers the source bus 0; subsystems unreachable from the root come last."""
    parent, level = spanning_tree(dec, root)
    K = dec.n_subsystems
    size = np.ones(K)
    work = subsystem_work(dec)
    by_level = [np.flatnonzero(level == d) for d in range(level.max() + 1)]
    for nodes in by_level[:0:-1]:                          # leaves up: subtree sizes and work
        np.add.at(size, parent[nodes], size[nodes])
        np.add.at(work, parent[nodes], work[nodes])
    pos = np.full(K, np.inf)
    pos[root] = 0
    for nodes in by_level[1:]:                             # root down: preorder positions
        nodes = nodes[np.lexsort((work[nodes], parent[nodes]))]
        before = np.cumsum(size[nodes]) - size[nodes]
        group_start = np.r_[True, parent[nodes][1:] != parent[nodes][:-1]]
        before -= np.maximum.accumulate(np.where(group_start, before, 0))
        pos[nodes] = pos[parent[nodes]] + 1 + before
    return np.argsort(pos, kind="stable")


def spanning_tree(dec: Decomposition, root: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(parent, level)`` of every subsystem in the feeder tree of :func:`tree_order`; -1 where
    none (the root's parent, unreachable subsystems)."""
    S = incidence(dec)
    adj = (S @ S.T).tocoo()
    K = dec.n_subsystems
    is_bus = np.asarray(dec.kinds == "node")
    feeder = is_bus[adj.row] != is_bus[adj.col]
    if feeder.any():
        adj = sp.coo_matrix((adj.data[feeder], (adj.row[feeder], adj.col[feeder])), shape=(K, K))
    level = breadth_first_levels(adj.tocsr(), root)
    up = (level[adj.col] == level[adj.row] - 1) & (level[adj.row] > 0)
    child, par, weight = adj.row[up], adj.col[up], adj.data[up]
    pick = np.lexsort((par, -weight, child))                  # per child: most shared columns first
    first = np.r_[True, child[pick][1:] != child[pick][:-1]]
    parent = np.full(K, -1)
    parent[child[pick][first]] = par[pick][first]
    return parent, level


def subsystem_work(dec: Decomposition) -> np.ndarray:
    """Flops of one local update per subsystem: the ``n x n`` projector product, plus the copies."""
    n = np.bincount(dec.copy_owner, minlength=dec.n_subsystems).astype(float)
    return n * n + n


def partition(dec: Decomposition, n_parts: int, order: str = "tree", root: int = 0) -> list[np.ndarray]:
    """Subsystem ids of each of ``n_parts`` parts: contiguous chunks of nearly equal work.

    ``order="tree"`` chunks the depth-first order (few cut columns); ``"index"`` chunks the
    decomposition's own numbering (buses, then lines), the naive baseline."""
    K = dec.n_subsystems
    if not 1 <= n_parts <= K:
        raise ValueError(f"cannot split {K} subsystems into n_parts={n_parts} parts")
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not one of {ORDERS}")
    seq = tree_order(dec, root) if order == "tree" else np.arange(K)
    cum = np.cumsum(subsystem_work(dec)[seq])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_parts) / n_parts)
    # at least one subsystem per part, cuts increasing
    cuts = np.maximum(cuts, np.arange(1, n_parts))
    cuts = np.minimum(cuts, K - n_parts + np.arange(1, n_parts))
    cuts = np.maximum.accumulate(cuts)
    return [np.sort(p) for p in np.split(seq, cuts)]


def column_parts(dec: Decomposition, parts) -> tuple[np.ndarray, np.ndarray]:
    """Per column: how many parts hold a copy, and the lowest such part (-1 for none)."""
    part_of = np.empty(dec.n_subsystems, int)
    for k, p in enumerate(parts):
        part_of[p] = k
    ncol = dec.lp.A.shape[1]
    pairs = np.unique(part_of[dec.copy_owner].astype(np.int64) * ncol + dec.copy_col)
    part, col = pairs // ncol, pairs % ncol
    count = np.bincount(col, minlength=ncol)
    first = np.full(ncol, len(parts))
    np.minimum.at(first, col, part)
    first[count == 0] = -1
    return count, first


# -- the MPI run -------------------------------------------------------------------------------------
class _Reducer:
    """The two reductions of :class:`ADMM` as timed ``Allreduce`` calls.

    ``shared`` holds the columns with copies on more than one rank, or None to reduce every column.
    With ``split_wait`` a barrier precedes each call, so that waiting for the slowest rank (load
    imbalance) is timed apart from the transfer itself."""

    def __init__(self, comm, shared, split_wait=False):
        from mpi4py import MPI
        self.MPI, self.comm, self.shared, self.split_wait = MPI, comm, shared, split_wait
        self.t_vector = self.t_scalar = self.t_wait = 0.0
        self.calls = 0

    def _wait(self):
        if self.split_wait:
            t = self.MPI.Wtime()
            self.comm.Barrier()
            self.t_wait += self.MPI.Wtime() - t

    def vector(self, s):
        self._wait()
        t = self.MPI.Wtime()
        if self.shared is None:
            self.comm.Allreduce(self.MPI.IN_PLACE, s, op=self.MPI.SUM)
        elif len(self.shared):
            buf = s[self.shared]
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            s[self.shared] = buf
        self.t_vector += self.MPI.Wtime() - t
        self.calls += 1
        return s

    def scalar(self, a):
        """Sum of a scalar, or of a few stacked ones, over the ranks."""
        self._wait()
        t = self.MPI.Wtime()
        buf = np.array(a, dtype=float, ndmin=1)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        self.t_scalar += self.MPI.Wtime() - t
        self.calls += 1
        return buf[0] if np.ndim(a) == 0 else buf


def _as_decomposition(problem) -> tuple[Decomposition, str]:
    if isinstance(problem, Decomposition):
        return problem, "decomposition"
    if isinstance(problem, str):
        return decompose(pv_problem(problem)), problem
    return decompose(problem), getattr(problem.network, "name", "problem")


def run_mpi_admm(problem, comm=None, settings: ADMMSettings | None = None, exchange: str = "shared",
                 order: str = "tree", split_wait: bool = False) -> dict:
    """Solve ``problem`` with the component-wise ADMM on the ranks of ``comm`` (default COMM_WORLD).

    ``problem``: a feeder name (:func:`pv_problem` set-up), an ``OPFProblem`` or a ``Decomposition``;
    every rank must pass the same one. Returns, on every rank, a dict with the assembled global ``z``,
    ``objective``, ``violation``, ``iterations``, ``converged``, the final residuals, the partition
    (``subsystems``/``copies`` per rank, ``shared_columns``) and the timings: ``wall_s``, and per
    iteration ``iteration_s`` with ``compute_s`` and ``communication_s`` (time inside the allreduce
    calls, waiting for slower ranks included) as the maximum over ranks, plus per-rank lists."""
    s = settings or ADMMSettings()
    if s.anderson:
        raise ValueError(f"settings.anderson={s.anderson}: Anderson acceleration is not supported under "
                         "MPI (its Gram matrix needs global inner products); use anderson=0")
    if s.graph:
        raise ValueError("settings.graph=True is not supported under MPI: the allreduce is a host call "
                         "that a CUDA graph cannot hold; use graph=False")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange {exchange!r} is not one of {EXCHANGES}")
    from mpi4py import MPI
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    t0 = MPI.Wtime()
    dec, name = _as_decomposition(problem)
    parts = partition(dec, size, order)
    count, first = column_parts(dec, parts)
    shared = np.flatnonzero(count > 1)
    red = _Reducer(comm, None if exchange == "full" else shared, split_wait)
    admm = ADMM(dec.subset(parts[rank]))
    admm.reduce, admm.reduce_scalar = red.vector, red.scalar
    comm.Barrier()
    t1 = MPI.Wtime()
    res = admm.solve(s)
    wall = MPI.Wtime() - t1
    z = _assemble(res.z, count, first, rank, comm, MPI)
    it = res.iterations
    comm_s = red.t_vector + red.t_scalar + red.t_wait
    mine = {"wall": wall, "compute": (wall - comm_s) / it, "communication": comm_s / it,
            "vector": red.t_vector / it, "scalar": red.t_scalar / it, "wait": red.t_wait / it,
            "copies": len(admm.dec.copy_col), "calls": red.calls}
    every = comm.allgather(mine)
    per = {k: [e[k] for e in every] for k in mine}
    lp = dec.lp
    return {
        "feeder": name, "ranks": size, "exchange": exchange, "order": order,
        "iterations": it, "converged": bool(res.converged),
        "objective": float(lp.objective(z)), "violation": float(lp.violation(z)),
        "primal_residual": float(res.primal_residual[-1]), "dual_residual": float(res.dual_residual[-1]),
        "rho": s.rho, "tol": s.tol, "max_iter": s.max_iter,
        "columns": int(lp.A.shape[1]), "subsystems": [len(p) for p in parts],
        "copies": per["copies"], "shared_columns": int(len(shared)),
        "allreduce_per_iteration": red.calls / it,
        "values_per_allreduce": int(lp.A.shape[1] if exchange == "full" else len(shared)),
        "setup_s": t1 - t0, "wall_s": max(per["wall"]),
        "iteration_s": max(per["wall"]) / it,
        "compute_s": max(per["compute"]), "communication_s": max(per["communication"]),
        "per_rank": {"compute_s": per["compute"], "communication_s": per["communication"],
                     "allreduce_vector_s": per["vector"], "allreduce_scalar_s": per["scalar"],
                     "barrier_wait_s": per["wait"]},
        "z": z,
    }


def _assemble(z_local, count, first, rank, comm, MPI) -> np.ndarray:
    """The global z: each column from the lowest rank holding a copy; columns no row touches are
    computed identically on every rank. Adding exact zeros keeps the values bit for bit."""
    mine = first == rank
    z = np.where(mine, z_local, 0.0)
    comm.Allreduce(MPI.IN_PLACE, z, op=MPI.SUM)
    orphan = count == 0
    z[orphan] = z_local[orphan]
    return z


# -- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dopfkit.distributed.mpi",
                                description="Component-wise ADMM for the LinDist3Flow OPF over MPI ranks "
                                            "(start with mpiexec -n N).")
    p.add_argument("--feeder", default="ieee123")
    p.add_argument("--halpern", action="store_true", help="restarted reflected Halpern acceleration")
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=50_000)
    p.add_argument("--share", type=float, default=0.1, help="share of load phases with PV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zone-buses", type=int, default=1,
                   help="subsystems: 1 = the paper's components, k > 1 = zones of about k buses")
    p.add_argument("--der-scale", type=float, default=1.0,
                   help="run the consensus on the DER columns divided by this (decompose's der_scale)")
    p.add_argument("--exchange", choices=EXCHANGES, default="shared",
                   help="allreduce only the columns on several ranks, or all columns")
    p.add_argument("--order", choices=ORDERS, default="tree",
                   help="partition the depth-first order of the feeder, or the subsystem numbering")
    p.add_argument("--split-wait", action="store_true",
                   help="barrier before each allreduce to time load imbalance apart")
    p.add_argument("--json", help="rank 0 writes the result here (z included)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    problem = pv_problem(args.feeder, share=args.share, seed=args.seed)
    settings = ADMMSettings(rho=args.rho, tol=args.tol, max_iter=args.max_iter, halpern=args.halpern,
                            reflect=1.0 if args.halpern else 0.0)
    dec = decompose(problem, zone_buses=args.zone_buses, der_scale=args.der_scale)
    out = run_mpi_admm(dec, comm, settings, exchange=args.exchange, order=args.order,
                       split_wait=args.split_wait)
    out["feeder"] = args.feeder
    if comm.Get_rank() == 0:
        us = 1e6
        print(f"{args.feeder}: {out['ranks']} ranks, {out['exchange']} exchange, "
              f"{out['shared_columns']} of {out['columns']} columns shared, subsystems per rank "
              f"{out['subsystems']}\n"
              f"iterations {out['iterations']} (converged {out['converged']}), objective "
              f"{out['objective']:.10g}, violation {out['violation']:.2e}\n"
              f"per iteration {out['iteration_s'] * us:.1f} us: compute {out['compute_s'] * us:.1f} us, "
              f"communication {out['communication_s'] * us:.1f} us (max over ranks); setup "
              f"{out['setup_s']:.2f} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**out, "z": out["z"].tolist(), "time": time.time()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
