r"""Convex relaxations of the multiphase branch-flow OPF: the SDP and its SOCP (2x2-minor) relaxation.

The model follows Gan and Low (PSCC 2014), generalized to the branch law of
:mod:`dopfkit.network.radial`, ``V_j = N V_i - Z I_j``: ``N`` is an ideal phase map (identity on a
line, turns ratio and phase mixing on a transformer) and the branch draws ``N^H I_j`` from its parent.

**Lifted variables.** Branch ``b`` joins parent nodes ``i`` (``n_i`` of them) to child nodes ``j``
(``n_j``). It carries one Hermitian matrix, the lifting of the parent voltages and the branch current::

    M_b = [V_i; I_j] [V_i; I_j]^H = [[W_i, K_b], [K_b^H, L_b]]       (K_b = V_i I_j^H, L_b = I_j I_j^H)

Lifting ``V_i`` rather than ``N V_i`` keeps the power drawn from each parent phase linear (``N`` of a
delta-wye bank is singular, so ``S = N K`` would lose it). The child bus's ``W_j = V_j V_j^H`` is the
linear image ``A_b M_b A_b^H``, ``A_b = [N, -Z]``, i.e. ``W_j = N W_i N^H - N K Z^H - Z K^H N^H +
Z L Z^H``; every bus has one feeding branch, so this defines each bus's ``W`` once. Two special cases:

* a branch fed by the sources (fixed EMFs ``v``) lifts ``[1; I_j]`` instead, so ``K = v I^H`` is
  linear in ``M`` and ``M`` can be strictly positive definite (a fixed rank-one ``W_i`` block would
  leave the cone without an interior point);
* a closed switch (a line with ``|Z| <`` :data:`IDEAL_Z` pu) is ideal: its child shares the parent's
  ``W`` and it passes a free complex power per phase. Lifted, its ``L`` would enter nothing but
  ``Z ~ 1e-8`` and stall the solver.

**Constraints** (per unit; bus ``j`` fed by branch ``b``, child branches ``c``)::

    M_b[:n_i, :n_i] = W_i[P_b, P_b]                       parent block = the parent bus's W
    diag(N K_b - Z L_b) = sum_c E_c diag(K_c N_c) + diag(W_j Y_j^H)
                          + s_load(W_j) - (p + j q)_DER   power balance at every phase of j
    M_b[:, n_i:] u = 0  for every u with Z_b u = 0        no current along null(Z) (floating secondary)
    vmin^2 <= diag(W_j) <= vmax^2                         where the problem limits voltages
    vmin^2 <= (W_aa + W_bb - 2 Re W_ab) / 3 <= vmax^2      line to line, on an ungrounded island
    0 <= p <= p_avail,  ||(p, q)|| <= s_rated             each DER phase
    M_b >= 0 (PSD)                                        SDP;  SOCP: its 2x2 principal minors

``diag(N K - Z L)`` is the power the branch delivers into ``j``, ``diag(K N)`` the power it draws
from its parent phases (``E_c`` places them in ``j``; a transformer draws ``diag(K G^H)`` with
``G = -B Z`` from its primitive, equal to ``N^H`` up to rounding), ``Y_j`` the shunt (line charging,
capacitors, and the no-load branch ``A + B N`` of each transformer ``j`` feeds:
:meth:`~dopfkit.network.radial.RadialBranch.parent_draw`).
``null(Z)`` is the zero sequence of a floating secondary, which radial.py drops (pseudo-inverse): no
current can take it, and without that row ``L`` would be free along it. Dropping ``rank M_b = 1`` is the
only relaxation of the branch physics: rank one on every branch gives back the phasors down the tree.

**Loads.** A load pair ``u = g_f V_f - g_t V_t`` (volts; ``g_t = 0`` for wye) has ``|u|^2`` linear in
``W``. Its power is written ``s0 + s1 |u|^2 / v_nom^2``:

* constant power (``s1 = 0``) and constant impedance (``s0 = 0``) are exact;
* constant current, OpenDSS's exponent models and the ZIP ``I`` share use LinDist3Flow's
  linearization in the squared voltage, ``|u|^e ~ 1 + (e/2)(|u|^2/v_nom^2 - 1)`` (approximate),
  taken where the pair is at 1 pu of its buses and in the regime it has there
  (:func:`dopfkit.opf.loadlaws.linearized_loads`: a load far from its rating is an impedance);
* on a delta pair the ``s1`` part is the impedance it is: ``(s1 / v_nom^2) g_f V_f conj(u)`` at ``f``,
  linear in ``W`` and exact; the constant part ``s0`` is shared between the two nodes as
  ``g_f V_f / u`` evaluated at the no-load angles, as LinDist3Flow does (approximate: the exact share
  depends on the phasors, which ``W`` holds only quadratically). ``share_iterations=k`` re-solves ``k``
  times with the share evaluated at the phasors recovered from the previous solve (a fixed point).

**SOCP.** Every PSD constraint ``M >= 0`` is replaced by ``|M_rs|^2 <= M_rr M_ss`` for every pair
``r < s``, each a second-order cone ``||(2 Re M_rs, 2 Im M_rs, M_rr - M_ss)|| <= M_rr + M_ss``, and the
same minors are imposed on each bus's ``W`` (PSD in the SDP because ``M_b`` is, not implied in the
SOCP). This is PowerModelsDistribution's SOC-UBF relaxation (``relaxation_psd_to_soc`` and
``constraint_mc_voltage_psd``, after Kim, Kojima and Yamashita 2003). Its feasible set contains the
SDP's, so its optimum is a lower bound on the SDP's, itself a lower bound on the exact OPF's.

**Objectives** are those of :mod:`dopfkit.opf.problem`; ``"losses"`` is ``sum_b Re tr(Z_b L_b)``, which
equals ``sum Re s_root + sum p_der - load P - shunt P`` on any point that satisfies the balances
(``s_root`` is what the EMFs deliver, so the source's Thevenin losses count). The relaxations are exact
only when the objective grows with the branch currents: ``"voltage_deviation"`` and ``"curtailment"``
leave ``L`` free (an unbounded, non-physical optimum) unless ``loss_weight > 0`` adds the losses.
Binding voltage limits also break exactness: the relaxation "buys" voltage with fictitious current
(``Z L Z^H`` in ``W_j``), so it cannot prove a lower limit unreachable.

**Implementation.** Every ``M_b`` is parametrized by ``m^2`` real numbers (real parts on and above the
diagonal, imaginary parts above it), stacked in one CVXPY variable ``x``; every physical law is a sparse
matrix acting on ``x``, built once with numpy/scipy (:func:`conic_maps`), and each PSD constraint is
the real embedding ``[[Re M, -Im M], [Im M, Re M]] >= 0``. CVXPY compiles a handful of large
constraints instead of thousands of small ones. :func:`exactness` reports how far each ``M_b`` is from
rank one and what that means physically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dopfkit.network.radial import IDEAL_Z, RadialBranch, RadialNetwork
from dopfkit.opf.lindist3flow import BlockTriplets, pair_voltages_squared
from dopfkit.opf.loadlaws import linearized_loads
from dopfkit.opf.problem import FormulationSolution, OPFInfeasibleError, OPFProblem, der_injection_map

RANK_TOL = 1e-5        # second / first eigenvalue of M_b below this: numerically rank one
NULL_Z = 1e-9          # singular values of Z below this (relative) span a path no current takes
ELASTIC_PENALTY = 1e3  # per pu^2 of voltage-limit violation in the infeasibility diagnosis


# ---------------------------------------------------------------------------------------------
# The lifted model as sparse linear maps (numpy / scipy only)
# ---------------------------------------------------------------------------------------------
@dataclass
class Lift:
    """One lifted branch: ``M = [y; I] [y; I]^H`` with ``y = V_i``, or ``y = 1`` when the parent
    voltages are the fixed source EMFs ``v`` (then ``K = v I^H`` is linear in ``M``)."""
    branch: RadialBranch
    offset: int                    # start of vec(M) in the stacked vector
    n_y: int                       # rows of M on the parent side: n_i, or 1 when source-fed
    A: np.ndarray                  # (n_j x m): W_j = A M A^H; power delivered diag(A M[:, n_y:])
    draw: np.ndarray               # (n_j x n_i): power drawn at parent p = sum_c draw[c, p] M[row_p, n_y + c]
    v_fixed: np.ndarray | None     # the source voltages when source-fed

    @property
    def m(self) -> int:
        return self.A.shape[1]

    def row(self, p: np.ndarray) -> np.ndarray:
        """Row of M holding parent phase p."""
        return p if self.v_fixed is None else np.zeros_like(p)


def _lift(branch: RadialBranch, offset: int, radial: RadialNetwork) -> Lift:
    draw = branch.parent_draw()[1].conj().T           # N on a line; (-B Z)^H on a two-port
    if np.isin(branch.parent, radial.root).all():
        v = np.sqrt(radial.v_root[branch.parent]) * radial.alpha[branch.parent]
        return Lift(branch, offset, 1, np.hstack([(branch.N @ v)[:, None], -branch.Z]),
                    draw * v[None, :], v)
    return Lift(branch, offset, len(branch.parent), np.hstack([branch.N, -branch.Z]), draw, None)


@dataclass
class ConicMaps:
    """Sparse maps from the real vector ``x`` to physical quantities (rows: radial nodes unless said).

    ``x`` holds the real parameters of every lifted ``M_b`` (``m**2`` each), then the complex flow
    (real parts, imaginary parts) of every phase of an ideal branch (see :func:`is_ideal`).
    Complex maps act on ``x`` directly.
    """
    radial: RadialNetwork
    lifts: list[Lift]
    ideal: list                 # zero-impedance branches (closed switches): V_j = V_i, power passes
    B: sp.csr_matrix            # x -> [vec(M_b) stacked (column-major), ideal flows] (complex)
    deliver: sp.csr_matrix      # power each branch delivers into its child phases
    drawn: sp.csr_matrix        # power drawn from each node by the branches it feeds
    losses: sp.csr_matrix       # (1 x nx) complex: sum_b tr(Z_b L_b)
    shunt: sp.csr_matrix        # power the shunt admittances draw
    load: sp.csr_matrix         # voltage-dependent part of the loads' power
    load_const: np.ndarray      # constant part of loads and shunts (after load_scale)
    w_diag: sp.csr_matrix       # squared voltage magnitude of every node (real part used) ...
    w_fixed: np.ndarray         # ... plus this constant (the roots)
    parent_re: sp.csr_matrix    # parent-side consistency of each M_b: real parts (= parent_re_rhs) ...
    parent_im: sp.csr_matrix    # ... and imaginary parts above the diagonal (= parent_im_rhs)
    parent_re_rhs: np.ndarray
    parent_im_rhs: np.ndarray
    w_pairs: sp.csr_matrix      # W_kl over the phase pairs k < l of every lifted branch's child bus
    w_pairs_kk: sp.csr_matrix   # their W_kk and W_ll (real)
    w_pairs_ll: sp.csr_matrix
    no_current: sp.csr_matrix   # (real rows) = 0: no current along null(Z) (floating secondaries)
    entries: _WEntries          # W_kl of any two phases of one bus, over vec(M) (before B)
    share_phasors: np.ndarray | None = None   # where delta pairs (loads, DERs) split their power

    @property
    def nx(self) -> int:
        return self.B.shape[1]

    def limited_voltages(self, limits) -> tuple[sp.csr_matrix, np.ndarray]:
        """(U, u0) with ``U x + u0`` each limited quantity of a
        :class:`~dopfkit.opf.problem.VoltageLimits`: ``W_ff``, or line to line
        ``(W_ff + W_tt - 2 Re W_ft) / 3``, both linear in the lifted matrices."""
        pair = limits.pair
        f, t = limits.node, np.where(pair, limits.node_to, limits.node)
        (ff, c_ff), (tt, c_tt), (ft, c_ft) = self.entries(f, f), self.entries(t, t), self.entries(f, t)
        w = np.where(pair, 1 / 3, 0.0)
        U = sp.diags(np.where(pair, 1 / 3, 1.0)) @ ff + sp.diags(w) @ (tt - 2 * ft)
        u0 = np.where(pair, 1 / 3, 1.0) * c_ff + w * (c_tt - 2 * c_ft)
        return (U @ self.B).real.tocsr(), u0.real

    def matrices(self, x: np.ndarray) -> list[np.ndarray]:
        """The Hermitian ``M_b`` of every lifted branch at a solution ``x``."""
        mu = self.B @ x
        return [mu[lf.offset:lf.offset + lf.m**2].reshape(lf.m, lf.m, order="F") for lf in self.lifts]


def is_ideal(branch: RadialBranch) -> bool:
    """A line or switch with ``N = I`` and every impedance entry below :data:`IDEAL_Z` pu. Lifting
    it would leave ``L`` free (it only enters through ``Z``) and stall the interior-point solver."""
    n = len(branch.child)
    return (branch.kind in ("line", "switch") and len(branch.parent) == n
            and np.allclose(branch.N, np.eye(n)) and np.abs(branch.Z).max() < IDEAL_Z)


def conic_maps(radial: RadialNetwork, load_scale: float = 1.0,
               V_share: np.ndarray | None = None) -> ConicMaps:
    """Build every linear map of the lifted model (see the module docstring). ``V_share``: phasors at
    which delta pairs share their constant power between their nodes (default: the no-load angles)."""
    lifts, ideal, offset = [], [], 0
    for b in radial.branches:
        if is_ideal(b):
            ideal.append(b)
            continue
        lifts.append(_lift(b, offset, radial))
        offset += lifts[-1].m ** 2
    n_flow = sum(len(b.child) for b in ideal)
    flow_basis = sp.hstack([sp.eye(n_flow), 1j * sp.eye(n_flow)])        # s = Re + j Im
    B = sp.block_diag([_hermitian_basis(lf.m) for lf in lifts] + [flow_basis], format="csr")
    wsel = _WEntries(radial, lifts, ideal, B.shape[0])
    deliver, drawn, losses = _branch_power_maps(radial, lifts, ideal, B.shape[0])
    shunt, sh_const = _shunt_map(radial, wsel)
    load, load_const, ld_fixed = _load_maps(radial, wsel, load_scale, V_share)
    n = radial.n
    w_diag, w_fixed = wsel(np.arange(n), np.arange(n))
    p_re, p_im, r_re, r_im = _parent_blocks(lifts, wsel)
    k, l_ = _bus_pairs(lifts)
    (w_kl, _), (w_kk, _), (w_ll, _) = wsel(k, l_), wsel(k, k), wsel(l_, l_)
    times_B = lambda m: (m @ B).tocsr()  # noqa: E731
    return ConicMaps(
        radial=radial, lifts=lifts, ideal=ideal, B=B, deliver=times_B(deliver), drawn=times_B(drawn),
        losses=times_B(losses), shunt=times_B(shunt), load=times_B(load),
        load_const=load_const + sh_const + ld_fixed, w_diag=times_B(w_diag), w_fixed=w_fixed.real,
        parent_re=times_B(p_re).real, parent_im=times_B(p_im).imag, parent_re_rhs=r_re,
        parent_im_rhs=r_im, w_pairs=times_B(w_kl), w_pairs_kk=times_B(w_kk).real,
        w_pairs_ll=times_B(w_ll).real, no_current=_null_current(lifts, B), entries=wsel,
        share_phasors=V_share)


def _hermitian_basis(m: int) -> sp.csr_matrix:
    """(m^2 x m^2) complex map from the real parameters of a Hermitian m x m matrix to vec(M)
    (column-major): Re M_rs for r <= s, then Im M_rs for r < s."""
    r, s = np.triu_indices(m)
    ri, si = np.triu_indices(m, 1)
    nre = len(r)
    col_re, col_im = np.arange(nre), nre + np.arange(len(ri))
    rows = np.concatenate([r + s * m, (s + r * m)[r != s], ri + si * m, si + ri * m])
    cols = np.concatenate([col_re, col_re[r != s], col_im, col_im])
    vals = np.concatenate([np.ones(nre), np.ones((r != s).sum()), np.full(len(ri), 1j),
                           np.full(len(ri), -1j)])
    return sp.csr_matrix((vals, (rows, cols)), shape=(m * m, m * m))


class _WEntries:
    """Entries W_kl of bus voltage products as rows over the stacked vector, plus a constant (roots).

    The W of a bus fed by a lifted branch is A M A^H, so W_kl = sum_rs A[k, r] conj(A[l, s]) M[r, s];
    a bus fed by an ideal branch shares its parent's W."""

    def __init__(self, radial: RadialNetwork, lifts: list[Lift], ideal: list, n_mu: int):
        self.radial, self.n_mu = radial, n_mu
        n = radial.n
        self.rep = np.arange(n)                   # node whose W row stands for this node
        self.owner = np.full(n, -1)               # lifted branch feeding the representative
        self.m = np.array([lf.m for lf in lifts])
        self.offset = np.array([lf.offset for lf in lifts])
        self.arow = np.zeros((n, self.m.max()), complex)     # row of A for each child node, padded
        for k, lf in enumerate(lifts):
            self.arow[lf.branch.child, :lf.m] = lf.A
            self.owner[lf.branch.child] = k
        ideal_of = {id(b) for b in ideal}
        for b in radial.branches:                 # ordered from the sources down
            if id(b) in ideal_of:
                self.rep[b.child] = self.rep[b.parent]
        self.vfix = np.zeros(n, complex)
        self.vfix[radial.root] = np.sqrt(radial.v_root) * radial.alpha[radial.root]

    def __call__(self, k, l_) -> tuple[sp.csr_matrix, np.ndarray]:
        k, l_ = self.rep[np.asarray(k, int)], self.rep[np.asarray(l_, int)]
        own = self.owner[k]
        root = np.isin(k, self.radial.root) & np.isin(l_, self.radial.root)
        bad = np.flatnonzero((own != self.owner[l_]) & ~root)
        if bad.size:
            nodes = self.radial.nodes
            raise ValueError(f"{self.radial.network.name}: nodes {nodes[k[bad[0]]]} and {nodes[l_[bad[0]]]} "
                             "are on different buses; the conic model couples phases of one bus only")
        const = np.where(root, self.vfix[k] * np.conj(self.vfix[l_]), 0)
        e = np.flatnonzero(~root)
        m = self.m[own[e]][:, None, None]
        mmax = self.arow.shape[1]
        rr, ss = np.meshgrid(np.arange(mmax), np.arange(mmax), indexing="ij")
        coef = self.arow[k[e], :, None] * np.conj(self.arow[l_[e], None, :])     # (E, r, s)
        col = self.offset[own[e]][:, None, None] + rr[None] + ss[None] * m
        keep = (rr[None] < m) & (ss[None] < m) & (coef != 0)
        row = np.broadcast_to(e[:, None, None], coef.shape)
        mat = sp.csr_matrix((coef[keep], (row[keep], col[keep])), shape=(len(k), self.n_mu))
        return mat, const


def _branch_power_maps(radial, lifts: list[Lift], ideal, n_mu):
    """(deliver, drawn, losses): diag(A M[:, n_y:]) = diag(N K - Z L) at the child nodes, the power
    drawn at the parent nodes and tr(Z L) for lifted branches; an ideal branch's flow s delivers s
    and draws s."""
    rd, cd, vd, rp, cp_, vp, cl, vl = ([] for _ in range(8))
    for lf in lifts:
        b, m, o, ny = lf.branch, lf.m, lf.offset, lf.n_y
        c, r, p = np.arange(len(b.child)), np.arange(m), np.arange(len(b.parent))
        rd.append(np.repeat(b.child, m))                                # sum_r A[c, r] M[r, ny + c]
        cd.append((o + r[None, :] + (ny + c[:, None]) * m).ravel())
        vd.append(lf.A.ravel())
        rp.append(np.repeat(b.parent, len(c)))                          # sum_c draw[c, p] M[row_p, ny + c]
        cp_.append((o + lf.row(p)[:, None] + (ny + c[None, :]) * m).ravel())
        vp.append(lf.draw.T.ravel())
        cl.append((o + (ny + c[None, :]) + (ny + c[:, None]) * m).ravel())   # Z[c, d] M[ny + d, ny + c]
        vl.append(b.Z.ravel())
    start = sum(lf.m**2 for lf in lifts)
    for b in ideal:
        cols = start + np.arange(len(b.child))
        start += len(b.child)
        rd.append(b.child), cd.append(cols), vd.append(np.ones(len(cols)))
        rp.append(b.parent), cp_.append(cols), vp.append(np.ones(len(cols)))
    cat = np.concatenate
    shape = (radial.n, n_mu)
    deliver = sp.csr_matrix((cat(vd), (cat(rd), cat(cd))), shape=shape)
    drawn = sp.csr_matrix((cat(vp), (cat(rp), cat(cp_))), shape=shape)
    losses = sp.csr_matrix((cat(vl), (np.zeros(sum(map(len, cl)), int), cat(cl))), shape=(1, n_mu))
    return deliver, drawn, losses


def _shunt_map(radial, wsel):
    """Shunt power at node k: sum_l conj(Y_kl) W_kl, over the network's shunts and the two-ports'
    parent-side shunts (a transformer's no-load branch)."""
    Y = (radial.shunt + _parent_shunts(radial)).tocoo()
    W, const = wsel(Y.row, Y.col)
    rows = sp.csr_matrix((np.conj(Y.data), (Y.row, np.arange(Y.nnz))), shape=(radial.n, Y.nnz))
    return rows @ W, rows @ const


def _parent_shunts(radial) -> sp.csr_matrix:
    shunts = BlockTriplets()
    for br in (br for br in radial.branches if br.Y is not None):
        shunts.add(br.parent, br.parent, br.parent_draw()[0])
    return shunts.matrix((radial.n, radial.n))


def _load_maps(radial, wsel, load_scale, V_share=None):
    """(map, constant, root constant) of the loads' power at their nodes (module docstring)."""
    ld, n = radial.loads, radial.n
    a = radial.alpha if V_share is None else V_share
    f, t = ld["node_from"].to_numpy(), ld["node_to"].to_numpy()
    on_t = t >= 0
    tt = np.where(on_t, t, f)                                # placeholder node for wye pairs
    g_f = ld["vbase_from"].to_numpy()
    g_t = np.where(on_t, ld["vbase_to"].to_numpy(), 0.0)
    scale = np.where(ld["scalable"].to_numpy(), load_scale, 1.0)
    vn2 = ld["v_nom"].to_numpy() ** 2
    s0, s1 = linearized_loads(ld, pair_voltages_squared(radial))   # ~ s0 + s1 |u / rated|^2, at 1 pu
    s0, y1 = scale * s0, scale * s1 / vn2                 # y1: conj of the admittance
    # impedance part: at f, y1 (g_f^2 W_ff - g_f g_t W_ft); at t, y1 (g_t^2 W_tt - g_f g_t W_tf)
    (W_ff, c_ff), (W_ft, c_ft) = wsel(f, f), wsel(f, tt)
    (W_tt, c_tt), (W_tf, c_tf) = wsel(tt, tt), wsel(tt, f)
    npair = len(ld)
    at_f = sp.csr_matrix((np.ones(npair), (f, np.arange(npair))), shape=(n, npair))
    at_t = sp.csr_matrix((on_t.astype(float), (tt, np.arange(npair))), shape=(n, npair))
    Df, Dt = sp.diags(y1 * g_f**2), sp.diags(-y1 * g_f * g_t)
    Et, Ef = sp.diags(y1 * g_t**2), sp.diags(-y1 * g_f * g_t)
    M = at_f @ (Df @ W_ff + Dt @ W_ft) + at_t @ (Et @ W_tt + Ef @ W_tf)
    fixed = at_f @ (Df @ c_ff + Dt @ c_ft) + at_t @ (Et @ c_tt + Ef @ c_tf)
    # constant part: shares g_f a_f / x0 and -g_t a_t / x0 at the no-load angles or at V_share
    # (1 and 0 for wye)
    x0 = g_f * a[f] - g_t * a[tt]
    share_f, share_t = g_f * a[f] / x0, -g_t * a[tt] / x0
    const = at_f @ (share_f * s0) + at_t @ (share_t * s0)
    return M.tocsr(), const, fixed


def _parent_blocks(lifts: list[Lift], wsel):
    """The parent side of each M_b: M[r, s] = W_parent[r, s] for r <= s < n_i (real rows for
    r <= s, imaginary rows for r < s), or M[0, 0] = 1 when the parent is a source."""
    n_mu = wsel.n_mu
    select = lambda cols: sp.csr_matrix((np.ones(len(cols)), (np.arange(len(cols)), cols)),  # noqa: E731
                                        shape=(len(cols), n_mu))

    def block(upper: int):
        cols, k, l_ = [np.zeros(0, int)], [np.zeros(0, int)], [np.zeros(0, int)]
        for lf in (lf for lf in lifts if lf.v_fixed is None):
            par = lf.branch.parent
            r, s = np.triu_indices(len(par), upper)
            cols.append(lf.offset + r + s * lf.m), k.append(par[r]), l_.append(par[s])
        W, const = wsel(np.concatenate(k), np.concatenate(l_))
        src = [lf.offset for lf in lifts if lf.v_fixed is not None and not upper]
        return (sp.vstack([select(np.concatenate(cols)) - W, select(np.array(src, int))]).tocsr(),
                np.concatenate([const, np.ones(len(src))]))

    re, c_re = block(0)
    im, c_im = block(1)
    return re, im, c_re.real, c_im.imag


def _null_current(lifts: list[Lift], B: sp.csr_matrix) -> sp.csr_matrix:
    """M[:, n_y:] u = 0 (i.e. u^H I = 0, so K u = 0 and L u = 0) for every u with Z u = 0. A floating
    secondary's Z (radial.py's pseudo-inverse) has no zero sequence: no current can take that path,
    and without these rows L would be free along it."""
    rows, cols, vals, n = [], [], [], 0
    for lf in lifts:
        _, sv, vh = np.linalg.svd(lf.branch.Z)
        null = vh[sv < NULL_Z * sv.max()].conj().T                # (n_j x k)
        m, ny = lf.m, lf.n_y
        for u in null.T:
            r, c = np.meshgrid(np.arange(m), np.arange(len(u)), indexing="ij")
            rows.append((n + r).ravel()), cols.append((lf.offset + r + (ny + c) * m).ravel())
            vals.append(np.broadcast_to(u[None, :], r.shape).ravel())
            n += m
    if not rows:
        return sp.csr_matrix((0, B.shape[1]))
    rows_c = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n, B.shape[0])) @ B
    return sp.vstack([rows_c.real, rows_c.imag]).tocsr()


def _bus_pairs(lifts: list[Lift]):
    """(k, l), k < l, over the phases of the child bus of every lifted branch."""
    ks, ls = [], []
    for lf in lifts:
        r, s = np.triu_indices(len(lf.branch.child), 1)
        ks.append(lf.branch.child[r]), ls.append(lf.branch.child[s])
    return np.concatenate(ks).astype(int), np.concatenate(ls).astype(int)


# ---------------------------------------------------------------------------------------------
# The CVXPY model
# ---------------------------------------------------------------------------------------------
def _embedding_map(m: int) -> sp.csr_matrix:
    """(4 m^2 x m^2) real map from vec(M) (complex, column-major) to vec([[Re M, -Im M], [Im M, Re M]])
    as [real part map | imaginary part map] acting on the stacked (Re mu, Im mu)."""
    i, j = np.meshgrid(np.arange(2 * m), np.arange(2 * m), indexing="ij")
    src = (i % m) + (j % m) * m
    quad_re = (i < m) == (j < m)                             # diagonal blocks: Re M
    sign = np.where(quad_re, 1.0, np.where(i >= m, 1.0, -1.0))
    row = (i + j * 2 * m).ravel()
    col = (src + np.where(quad_re, 0, m * m)).ravel()
    return sp.csr_matrix((sign.ravel(), (row, col)), shape=(4 * m * m, 2 * m * m))


def _psd_constraints(cp, maps: ConicMaps, x):
    """One real PSD constraint per branch: the real embedding of M_b."""
    out = []
    for lf in maps.lifts:
        o, m = lf.offset, lf.m
        Bb = maps.B[o:o + m * m]
        E = _embedding_map(m) @ sp.vstack([Bb.real, Bb.imag])
        out.append(cp.reshape(E.tocsr() @ x, (2 * m, 2 * m), order="F") >> 0)
    return out


def _minor_constraints(cp, maps: ConicMaps, x):
    """|M_rs|^2 <= M_rr M_ss for every r < s of every M_b and of every bus W, as one SOC family."""
    rows_rs, rows_rr, rows_ss = [], [], []
    for lf in maps.lifts:
        o, m = lf.offset, lf.m
        r, s = np.triu_indices(m, 1)
        rows_rs.append(o + r + s * m), rows_rr.append(o + r * (m + 1)), rows_ss.append(o + s * (m + 1))
    B = maps.B
    m_rs = B[np.concatenate(rows_rs)]
    m_rr = B[np.concatenate(rows_rr)].real
    m_ss = B[np.concatenate(rows_ss)].real
    # stack the bus-W minors after the branch ones (their constants are zero: roots have no pairs)
    rs = sp.vstack([m_rs, maps.w_pairs]).tocsr()
    rr = sp.vstack([m_rr, maps.w_pairs_kk]).tocsr()
    ss = sp.vstack([m_ss, maps.w_pairs_ll]).tocsr()
    t = (rr + ss) @ x
    X = cp.vstack([2 * (rs.real @ x), 2 * (rs.imag @ x), (rr - ss) @ x])
    return [cp.SOC(t, X, axis=0)]          # t >= |M_rr - M_ss| also makes the diagonals >= 0


@dataclass
class _Model:
    cvx: object            # the cvxpy.Problem
    x: object
    p: object
    q: object
    v: object              # cvxpy expression: squared voltage of every node
    s_root: tuple          # (real, imag) expressions
    objective: object      # the problem's objective (without the elastic or loss_weight terms)
    slack: tuple | None    # elastic voltage slacks (above, below) or None
    hi_k: np.ndarray       # rows of problem.voltage_limits() with an upper / a lower limit
    lo_k: np.ndarray


def _build(cp, problem: OPFProblem, maps: ConicMaps, relaxation: str, elastic: bool = False,
           loss_weight: float = 0.0) -> _Model:
    r, ders = maps.radial, problem.ders
    n, nd = r.n, len(ders)
    free = np.setdiff1d(np.arange(n), r.root)
    x = cp.Variable(maps.nx, name="M")
    bal = (maps.deliver - maps.drawn - maps.shunt - maps.load)[free]
    inj_p, inj_q, cons = 0, 0, []
    if nd:                                                   # DER phases inject p + jq at their node(s)
        p, q = cp.Variable(nd, name="p_der"), cp.Variable(nd, name="q_der")
        D = der_injection_map(r, ders, maps.share_phasors)[free]     # complex for line-to-line DERs
        inj_p, inj_q = D.real @ p - D.imag @ q, D.imag @ p + D.real @ q
        cons += [p >= 0, p <= ders["p_avail"].to_numpy(),
                 cp.SOC(ders["s_rated"].to_numpy(), cp.vstack([p, q]), axis=0)]
    else:
        p = q = cp.Constant(np.zeros(0))
    const = maps.load_const[free]
    cons += [bal.real @ x + inj_p == const.real,              # power balance, P
             bal.imag @ x + inj_q == const.imag,              # power balance, Q
             maps.parent_re @ x == maps.parent_re_rhs,        # parent block = parent bus's W
             maps.parent_im @ x == maps.parent_im_rhs]
    if maps.no_current.shape[0]:
        cons.append(maps.no_current @ x == 0)                  # floating secondaries
    cons += _psd_constraints(cp, maps, x) if relaxation == "sdp" else _minor_constraints(cp, maps, x)
    v = maps.w_diag.real @ x + maps.w_fixed
    limits = problem.voltage_limits()                        # phase to ground, or line to line
    lo, hi = limits.lo, limits.hi
    lo_k, hi_k = np.flatnonzero(lo > 0), np.flatnonzero(np.isfinite(hi))
    U, u0 = maps.limited_voltages(limits)
    u = U @ x + u0
    slack = (cp.Variable(len(hi_k), nonneg=True), cp.Variable(len(lo_k), nonneg=True)) if elastic else (0, 0)
    if len(limits):
        cons += [u[hi_k] <= hi[hi_k] + slack[0], u[lo_k] >= lo[lo_k] - slack[1]]
    drawn_root = maps.drawn[r.root]
    s_root = (drawn_root.real @ x, drawn_root.imag @ x)
    base = _objective(cp, problem, maps, x, p, v[free], s_root[0])
    obj = base + loss_weight * cp.sum(maps.losses.real @ x) if loss_weight else base
    if elastic:
        obj = obj + ELASTIC_PENALTY * (cp.sum(slack[0]) + cp.sum(slack[1]))
    return _Model(cp.Problem(cp.Minimize(obj), cons), x, p, q, v, s_root, base,
                  slack if elastic else None, hi_k, lo_k)


def _objective(cp, problem: OPFProblem, maps: ConicMaps, x, p, v_free, p_root):
    obj, ders = problem.objective, problem.ders
    if obj == "substation_power":
        return cp.sum(p_root)
    if obj == "generation_cost":
        return cp.sum(p_root) + (ders["cost"].to_numpy() @ p if len(ders) else 0)
    if obj == "losses":
        return cp.sum(maps.losses.real @ x)
    if obj == "curtailment":
        return float(ders["p_avail"].sum()) - cp.sum(p)
    if obj == "voltage_deviation":
        return cp.sum_squares(v_free - 1.0)
    raise ValueError(f"objective {obj!r} is not implemented in the conic formulations")


# ---------------------------------------------------------------------------------------------
# Solving, exactness, recovery
# ---------------------------------------------------------------------------------------------
def solve_sdp(problem: OPFProblem, solver: str = "clarabel", share_iterations: int = 0,
              loss_weight: float = 0.0, **opts) -> FormulationSolution:
    """The multiphase branch-flow SDP relaxation (module docstring).

    ``solver``: ``"clarabel"`` or ``"scs"``; ``opts`` go to ``cvxpy.Problem.solve`` (for Clarabel
    they default to :data:`CLARABEL_DEFAULTS`; SCS needs e.g. ``eps_abs=eps_rel=1e-8`` to be accurate).
    ``share_iterations``: re-solves in which delta pairs share their constant power at the phasors
    recovered from the previous solve instead of the no-load angles (0: LinDist3Flow's shares).
    ``loss_weight``: adds ``loss_weight * losses`` to the objective. The relaxations are exact only
    for objectives that grow with the branch currents; ``"voltage_deviation"`` and ``"curtailment"``
    leave ``L`` free (unbounded, non-physical solutions) unless paired with a loss term. The returned
    ``objective`` is the problem's own, without this term.
    ``extra``: the exactness check (:func:`exactness`), ``losses``, timings and model sizes.
    """
    return _solve(problem, "sdp", solver, share_iterations, loss_weight, opts)


def solve_socp(problem: OPFProblem, solver: str = "clarabel", share_iterations: int = 0,
               loss_weight: float = 0.0, **opts) -> FormulationSolution:
    """The SOCP relaxation: every PSD constraint of :func:`solve_sdp` replaced by its 2x2 principal
    minors (module docstring), so its optimum is a lower bound on the SDP's. Same arguments and
    ``extra`` as :func:`solve_sdp`."""
    return _solve(problem, "socp", solver, share_iterations, loss_weight, opts)


_OK = ("optimal", "optimal_inaccurate")
# Clarabel stalls just short of its default 1e-8 gap on these SDPs (the rank-one optimum of a branch
# with a tiny resistance, a source or a regulator, is nearly degenerate) and reports 'AlmostSolved';
# 1e-7 is reached in about 10 iterations with the same solution.
CLARABEL_DEFAULTS = {"tol_gap_abs": 1e-7, "tol_gap_rel": 1e-7, "tol_feas": 1e-7}
# Clarabel's factorization can fail outright on a nearly degenerate SOCP (IEEE 37 with 30 % PV and
# slack limits); ten times its default static regularization gets through to the same optimum as SCS.
CLARABEL_RETRY = {"static_regularization_constant": 1e-7}
SHARE_RESIDUAL = 1e-2   # pu: above this the recovered phasors are no basis for the delta shares


def _solve(problem: OPFProblem, relaxation: str, solver: str, share_iterations: int, loss_weight: float,
           opts: dict) -> FormulationSolution:
    import cvxpy as cp

    from dopfkit import solvers
    constant = solvers.cvxpy_solver(solver)
    if constant == "CLARABEL":
        opts = {**CLARABEL_DEFAULTS, **opts}
    V_share, times, iters, share_change, note = None, np.zeros(4), 0, [], ""
    for k in range(share_iterations + 1):
        maps, model, t, n_it = _solve_once(cp, problem, relaxation, constant, opts, loss_weight, V_share,
                                           f"solve {k + 1} of {share_iterations + 1}")
        times, iters = times + t, iters + n_it
        x = np.asarray(model.x.value)
        extra = exactness(maps, x)
        if V_share is not None:
            share_change.append(float(np.abs(extra["V"] - V_share).max()))
        if k < share_iterations and extra["max_residual"] > SHARE_RESIDUAL:
            note = (f"share iterations stopped after solve {k + 1}: the relaxation is not exact "
                    f"(residual {extra['max_residual']:.2g} pu), so its phasors mean nothing")
            break
        V_share = extra["V"]
    extra.update(model_time=times[0], compile_time=times[1], solve_wall_time=times[3],
                 share_change=share_change, share_note=note, losses=float((maps.losses.real @ x).sum()),
                 n_variables=maps.nx + 2 * problem.n_ders, n_psd=len(maps.lifts), n_ideal=len(maps.ideal))
    return FormulationSolution(
        formulation=relaxation, status=model.cvx.status, objective=float(model.objective.value),
        v=np.asarray(model.v.value), p_der=np.atleast_1d(model.p.value).astype(float),
        q_der=np.atleast_1d(model.q.value).astype(float),
        s_root=np.asarray(model.s_root[0].value) + 1j * np.asarray(model.s_root[1].value),
        build_time=float(times[0] + times[1]), solve_time=float(times[2]), solver=f"cvxpy-{constant.lower()}",
        iterations=iters, extra=extra, flows=maps.deliver @ x)


def _solve_once(cp, problem, relaxation, constant, opts, loss_weight, V_share, which):
    """Build and solve one model: (maps, model, [model, compile, solver, wall] seconds, iterations)."""
    t0 = time.perf_counter()
    maps = conic_maps(problem.radial, problem.load_scale, V_share)
    model = _build(cp, problem, maps, relaxation, loss_weight=loss_weight)
    t1 = time.perf_counter()
    where = f"{relaxation.upper()} OPF on {problem.network.name} ({which})"
    try:
        model.cvx.solve(solver=constant, **opts)
    except cp.error.SolverError as err:         # an infeasible SDP can end this way: diagnose first
        _raise_infeasible(cp, problem, maps, relaxation, constant, opts, "not solved", quiet=True)
        retry = {**opts, **CLARABEL_RETRY} if constant == "CLARABEL" and opts.keys().isdisjoint(
            CLARABEL_RETRY) else None
        if retry is None:
            raise RuntimeError(f"{where}: {constant} failed: {err}") from err
        try:
            model.cvx.solve(solver=constant, **retry)
        except cp.error.SolverError as err2:
            raise RuntimeError(f"{where}: {constant} failed, also with {CLARABEL_RETRY}: {err2}") from err
    wall = time.perf_counter() - t1
    compile_t, solve_t = _cvxpy_times(model.cvx, wall)
    status = model.cvx.status
    if status in ("infeasible", "infeasible_inaccurate"):
        _raise_infeasible(cp, problem, maps, relaxation, constant, opts, status)
    if status not in _OK or model.x.value is None:
        raise RuntimeError(f"{where}: {constant} returned status {status!r}")
    return maps, model, np.array([t1 - t0, compile_t, solve_t, wall]), model.cvx.solver_stats.num_iters or 0


def _cvxpy_times(prob, wall: float) -> tuple[float, float]:
    """(compilation, solver) seconds of the last ``prob.solve``."""
    compile_t = float(prob.compilation_time or 0.0)
    solve_t = prob.solver_stats.solve_time
    return compile_t, float(solve_t) if solve_t is not None else wall - compile_t


def exactness(maps: ConicMaps, x: np.ndarray) -> dict:
    """How far each lifted ``M_b`` is from rank one, and what that means physically.

    ``eig_ratio``: largest |lambda_k|, k >= 2, over lambda_1 (a negative eigenvalue, possible in the
    SOCP, counts too); ``max_eig_ratio``, ``n_not_rank_one`` (ratio > :data:`RANK_TOL`), ``rank_one``.
    ``V``: phasors recovered down the tree (:func:`recover_phasors`); ``recovery_gap``:
    max | |V| - sqrt(diag W) |. ``residual``: with ``z = [y; I]`` the recovered lifting of each branch,
    the largest effect (pu) of ``M_b - z z^H`` on the child's W and on the power the branch delivers
    and draws. On a branch with a tiny impedance (a source, a regulator) ``L = I I^H`` is pinned only
    by its tiny losses, so its eigenvalue ratio stays near the solver's tolerance over that resistance
    while its residual, what the excess of ``L`` does to the physics, is negligible.
    """
    Ms = maps.matrices(x)
    V, zs = recover_phasors(maps, Ms, lifted=True)
    ratio = np.array([_eig_ratio(M) for M in Ms])
    resid = np.array([_residual(lf, M, z) for lf, M, z in zip(maps.lifts, Ms, zs)])
    v = maps.w_diag.real @ x + maps.w_fixed
    names = [lf.branch.name for lf in maps.lifts]
    return {"eig_ratio": pd.Series(ratio, index=names, name="eig_ratio"),
            "max_eig_ratio": float(ratio.max()), "n_not_rank_one": int((ratio > RANK_TOL).sum()),
            "rank_one": bool(ratio.max() < RANK_TOL),
            "residual": pd.Series(resid, index=names, name="residual"), "max_residual": float(resid.max()),
            "V": V, "recovery_gap": float(np.abs(np.abs(V) - np.sqrt(np.maximum(v, 0))).max()), "M": Ms}


def _eig_ratio(M: np.ndarray) -> float:
    lam = np.linalg.eigvalsh((M + M.conj().T) / 2)
    return float(np.abs(lam[:-1]).max(initial=0) / max(lam[-1], 1e-300))


def _residual(lf: Lift, M: np.ndarray, z: np.ndarray) -> float:
    R = M - np.outer(z, z.conj())
    ny, A = lf.n_y, lf.A
    drawn = (lf.draw.T * R[lf.row(np.arange(len(lf.branch.parent))), ny:]).sum(axis=1)
    return float(max(np.abs(A @ R @ A.conj().T).max(), np.abs(np.diag(A @ R[:, ny:])).max(),
                     np.abs(drawn).max()))


def recover_phasors(maps: ConicMaps, Ms: list[np.ndarray], lifted: bool = False):
    """V down the tree from the roots: I = K^H y / |y|^2 (y = V_i, or 1 when source-fed),
    V_j = N V_i - Z I, and V_j = V_i across an ideal branch. Exact when every M_b is rank one;
    otherwise the phasors that the parent side of each M_b implies. ``lifted=True`` also returns
    ``z = [y; I]`` per lifted branch."""
    r = maps.radial
    V = np.zeros(r.n, complex)
    V[r.root] = np.sqrt(r.v_root) * r.alpha[r.root]
    lift_of = {id(lf.branch): (lf, M) for lf, M in zip(maps.lifts, Ms)}
    zs = {}
    for b in r.branches:                          # ordered from the sources down
        vi = V[b.parent]
        if id(b) not in lift_of:                  # ideal branch
            V[b.child] = vi
            continue
        lf, M = lift_of[id(b)]
        ny = lf.n_y
        y = vi if lf.v_fixed is None else np.ones(1)
        current = M[:ny, ny:].conj().T @ y / np.vdot(y, y).real
        V[b.child] = b.N @ vi - b.Z @ current
        zs[id(b)] = np.concatenate([y, current])
    return (V, [zs[id(lf.branch)] for lf in maps.lifts]) if lifted else V


def _raise_infeasible(cp, problem, maps, relaxation, constant, opts, status, quiet=False):
    """Re-solve with the voltage limits elastic (the only constraint family that can make the
    relaxation infeasible: p = q = 0 meets the DER limits, and any power-flow solution the balances)
    and raise naming the nodes whose limits had to give. ``quiet``: return if nothing had to give."""
    model = _build(cp, problem, maps, relaxation, elastic=True)
    try:
        model.cvx.solve(solver=constant, **opts)
    except cp.error.SolverError:
        model.cvx._status = "solver_error"
    where = f"{relaxation.upper()} OPF on {problem.network.name} is {status}"
    if model.cvx.status not in _OK:
        if quiet:
            return
        raise OPFInfeasibleError(f"{where}; the elastic re-solve returned {model.cvx.status!r}")
    names, parts = problem.voltage_limits().names, []
    for fam, slack, nodes in (("voltage upper limit", model.slack[0], model.hi_k),
                              ("voltage lower limit", model.slack[1], model.lo_k)):
        s = np.asarray(slack.value)
        if s.size and s.max() > 1e-7:
            worst = np.argsort(-s)[:3]
            parts.append(f"{fam}: " + ", ".join(f"{names[nodes[k]]} by {s[k]:.3g} pu^2"
                                                for k in worst if s[k] > 1e-7))
    if parts or not quiet:
        where = where.replace("is not solved", "is infeasible")
        raise OPFInfeasibleError(f"{where}: " + ("; ".join(parts) or "the elastic model relaxed nothing"))
