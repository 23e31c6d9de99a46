"""Multi-period LinDist3Flow OPF: a day of load and PV with batteries, as one sparse LP.

    >>> from dopfkit.profiles import load_profile, pv_profile
    >>> ders = der_table(net, ["675.1", "675.2", "675.3"], s_rated_kva=300)
    >>> bess = storage_table(net, ["634.1", "634.2", "634.3"], energy_kwh=500, power_kw=125)
    >>> load = load_profile(200, 60)
    >>> res = solve_multiperiod(net, ders, bess, load, pv_profile(200, 60), vmin=0.9, vmax=1.1,
    ...                         objective="energy_cost", price=0.1 + 0.2 * load.to_numpy())
    >>> res.p_discharge - res.p_charge                           # kW per step and battery phase

Model (per unit on the network's per-phase base; steps ``t = 1..T`` of ``dt`` hours). Each step is a
LinDist3Flow network (:mod:`dopfkit.opf.lindist3flow`) with the scalable loads times ``load_shape[t]``::

    v_t[root] = v_root,   vmin^2 <= v_t <= vmax^2   (other nodes; line to line on ungrounded islands)
    (E - T) s_t - H(l_t) v_t + G_der s_der,t + G_st s_st,t = s_const(l_t)   (balance, non-root nodes)
    (E^T - W) v_t + 2 Re(C s_t) = 0                                         (voltage drop per flow)
    0 <= p_der,t <= p_avail * pv_shape[t],   (p_der,t, q_der,t) in polygon(s_rated)
    0 <= p_ch,t, p_dis,t <= P_rated,         (p_dis,t - p_ch,t, q_st,t) in polygon(S_rated)
    e_t = e_{t-1} + dt (eta_c p_ch,t - p_dis,t / eta_d),   soc_min E <= e_t <= soc_max E
    e_0 = soc_init E,   e_T >= soc_init E

``polygon(S)``: the inverter's disc ``p^2 + q^2 <= S^2`` replaced by the regular ``m``-gon inscribed in
it, ``cos(th_k) p + sin(th_k) q <= S cos(pi/m)`` with ``th_k = (2k + 1) pi / m``; an *inner*
approximation: every set-point is within the true rating, the vertices (``S`` at angles 0, 2pi/m, ...,
so full active power at unity power factor) are on the circle, and at most ``1 - cos(pi/m)`` of the
rating is given up between them (1.9 % at the default ``m = 16``).
Energy is kept in kWh-like units (``e = soc E``), so a zero-size battery is just a fixed zero.

All steps share the same matrices except the load terms, so the constraint matrix is
``kron(I_T, A) + kron(diag(l - 1), A_load)`` plus the storage coupling ``kron(D, I)``, with ``D`` the
(T x T+1) difference matrix; one solver call (Clarabel by default, or HiGHS) solves the whole day.

Objectives (minimized; ``P_sub,t`` = real power the sources deliver, all phases):
``"substation_energy"`` sum dt P_sub; ``"energy_cost"`` sum price_t dt P_sub (``price`` per kWh);
``"peak_demand"`` max_t P_sub (an epigraph variable); ``"curtailment"`` sum dt (p_avail - p_der);
``"losses"`` sum dt of the branch-loss estimate ``Re(I^H Z I)`` with ``I = alpha o conj(s)`` (the
flows at 1 pu and the no-load angles): a convex quadratic in (P, Q), a QP solved with Clarabel (HiGHS's
active-set QP solver stops with residual infeasibilities on it). In the
lossless LinDist3Flow balance, the substation power equals load minus generation, so a "losses" objective
needs this estimate; it is the three-phase form of DistFlow's ``r (P^2 + Q^2)``.

With ``eta_c eta_d < 1`` and a positive price of energy, charging and discharging at once only wastes
energy, so an optimum does not do it unless energy must be spilled (negative prices, or a voltage limit
with no curtailment). The model does not forbid it (that needs binaries); the result reports
``simultaneous_kw = max_t min(p_ch, p_dis)`` so it can be checked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dopfkit.network.math_model import Network
from dopfkit.network.radial import RadialNetwork, radial_network
from dopfkit.opf.lindist3flow import (
    LinDist3FlowBlocks,
    capability_polygon,
    lindist3flow_blocks,
    line_to_line_map,
)
from dopfkit.opf.problem import (
    OPFInfeasibleError,
    VoltageLimits,
    der_ends,
    der_injection_map,
    nodes_mask,
    voltage_limits,
)

OBJECTIVES = ("substation_energy", "energy_cost", "peak_demand", "curtailment", "losses")

__all__ = ["OBJECTIVES", "MultiPeriodResult", "solve_multiperiod", "storage_table"]


# ------------------------------------------------------------------------------------------ inputs
def storage_table(net: Network, nodes, energy_kwh, power_kw, kva=None, eta_charge=0.95, eta_discharge=0.95,
                  soc_min=0.1, soc_max=0.9, soc_init=0.5, names=None) -> pd.DataFrame:
    """Battery phases at OpenDSS nodes (``"675.1"``), per unit on the network's base: ``energy`` in pu
    hours, ``power`` (charge and discharge limit) and ``s_rated`` (converter, default = power) in pu.
    A three-phase battery is three rows, each with its own energy and state of charge."""
    radial = radial_network(net)
    nodes = list(nodes)
    pos = radial.nodes.get_indexer(nodes)
    if (pos < 0).any():
        raise KeyError(f"storage nodes not in {net.name}'s energized phase nodes: "
                       f"{[x for x, p in zip(nodes, pos) if p < 0]}")
    m, k = len(nodes), 1e3 / net.sbase
    col = lambda x: np.broadcast_to(np.asarray(x, float), (m,)).copy()  # noqa: E731
    power = col(power_kw) * k
    table = pd.DataFrame({
        "name": names if names is not None else [f"storage.{x}" for x in nodes], "node": pos,
        "node_name": nodes, "energy": col(energy_kwh) * k, "power": power,
        "s_rated": power if kva is None else col(kva) * k, "eta_charge": col(eta_charge),
        "eta_discharge": col(eta_discharge), "soc_min": col(soc_min), "soc_max": col(soc_max),
        "soc_init": col(soc_init)})
    _check_storage(table)
    return table


def _check_storage(st: pd.DataFrame):
    eta_ok = (st.eta_charge > 0) & (st.eta_charge <= 1) & (st.eta_discharge > 0) & (st.eta_discharge <= 1)
    soc_ok = (st.soc_min >= 0) & (st.soc_min <= st.soc_init) & (st.soc_init <= st.soc_max) & (st.soc_max <= 1)
    size_ok = (st.energy >= 0) & (st.power >= 0) & (st.s_rated >= 0)
    for ok, what in ((eta_ok, "efficiencies must be in (0, 1]"),
                     (soc_ok, "need 0 <= soc_min <= soc_init <= soc_max <= 1"),
                     (size_ok, "energy, power and s_rated must be >= 0")):
        if not ok.all():
            raise ValueError(f"storage {list(st['name'][~ok])}: {what}")


_EMPTY_STORAGE = ("name", "node", "node_name", "energy", "power", "s_rated", "eta_charge", "eta_discharge",
                  "soc_min", "soc_max", "soc_init")


def _time_axis(load_shape, dt_hours):
    """(values, index, dt): a Series indexed by ``"hour"`` (as :mod:`dopfkit.profiles` makes them) gives
    its own time axis; anything else spans one day unless ``dt_hours`` is given."""
    values = np.asarray(load_shape, float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("load_shape must be a non-empty 1-D series of load multipliers")
    index = getattr(load_shape, "index", None)
    hourly = index is not None and index.name == "hour" and pd.api.types.is_numeric_dtype(index)
    if dt_hours is None:
        dt_hours = float(np.diff(np.asarray(index, float)).mean()) if hourly and values.size > 1 \
            else 24.0 / values.size
    if not hourly:
        index = pd.Index(np.arange(values.size) * dt_hours, name="hour")
    return values, index, float(dt_hours)


# ------------------------------------------------------------------------------------------ result
@dataclass
class MultiPeriodResult:
    """Set-points and states per step (rows: the time index, hours), in kW, kvar, kWh and pu volts."""
    status: str
    objective: float            # kWh for energy objectives, kW for peak_demand, currency for energy_cost
    objective_name: str
    time: pd.Index
    dt: float                   # hours
    load_shape: np.ndarray
    p_der: pd.DataFrame         # kW per DER phase
    q_der: pd.DataFrame
    p_avail: pd.DataFrame       # kW available (rating x PV shape)
    p_charge: pd.DataFrame      # kW per battery phase
    p_discharge: pd.DataFrame
    q_storage: pd.DataFrame
    energy: pd.DataFrame        # kWh at step boundaries (T + 1 rows: 0, dt, ..., T dt after the start)
    soc: pd.DataFrame           # energy / capacity (NaN for a zero-size battery)
    vmag: pd.DataFrame          # |V| pu per step and non-root OpenDSS node
    p_substation: pd.Series     # kW, all source phases
    q_substation: pd.Series
    simultaneous_kw: float      # max over steps and batteries of min(p_ch, p_dis)
    build_time: float
    solve_time: float
    solver: str
    iterations: int | None
    v: np.ndarray               # (T, radial nodes) squared |V|, radial numbering
    size: dict = field(default_factory=dict)   # rows, columns, nonzeros of the LP
    sbase: float = 1e6          # VA per phase (the network's base), for converting back to per unit

    @property
    def voltage_summary(self) -> pd.DataFrame:
        """Lowest and highest |V| per step and where they are."""
        return pd.DataFrame({"vmin": self.vmag.min(axis=1), "node_min": self.vmag.idxmin(axis=1),
                             "vmax": self.vmag.max(axis=1), "node_max": self.vmag.idxmax(axis=1)})

    def injections(self, t: int, ders: pd.DataFrame, storage: pd.DataFrame | None = None) -> pd.Series:
        """Complex injections (per unit, generator convention) of step ``t`` (position) summed per
        OpenDSS node: DER ``p + jq`` and battery ``p_dis - p_ch + j q``, ready for
        :func:`dopfkit.network.math_model.with_injections`."""
        kw = 1e3 / self.sbase
        parts = [pd.Series((self.p_der.iloc[t].to_numpy() + 1j * self.q_der.iloc[t].to_numpy()) * kw,
                           index=list(ders["node_name"]))]
        if storage is not None and len(storage):
            p = self.p_discharge.iloc[t].to_numpy() - self.p_charge.iloc[t].to_numpy()
            parts.append(pd.Series((p + 1j * self.q_storage.iloc[t].to_numpy()) * kw,
                                   index=list(storage["node_name"])))
        s = pd.concat(parts)
        return s.groupby(level=0, sort=False).sum()


# ------------------------------------------------------------------------------------------ the LP
@dataclass
class _Layout:
    """Column offsets inside one step's block, and of the global variables after the T blocks."""
    n: int
    nf: int
    nd: int
    ns: int
    T: int
    nl: int = 0                                       # limited line-to-line voltages (ungrounded islands)

    def __post_init__(self):
        sizes = dict(v=self.n, P=self.nf, Q=self.nf, pd=self.nd, qd=self.nd, pc=self.ns, pdis=self.ns,
                     qs=self.ns, vll=self.nl)
        self.off, k = {}, 0
        for name, size in sizes.items():
            self.off[name] = slice(k, k + size)
            k += size
        self.m = k                                    # columns per step
        self.e0 = self.T * self.m                     # energies e_0..e_T (T + 1 per battery)
        self.z = self.e0 + (self.T + 1) * self.ns     # epigraph of the peak (if used)

    def select(self, name) -> sp.csr_matrix:
        """(len x m) matrix picking the named block of a step's columns."""
        sl = self.off[name]
        size = sl.stop - sl.start
        return sp.csr_matrix((np.ones(size), (np.arange(size), np.arange(sl.start, sl.stop))),
                             shape=(size, self.m))


def _incidence(n, nodes) -> sp.csr_matrix:
    """(n x len(nodes)): unit j sits at radial node nodes[j]."""
    nodes = np.asarray(nodes, int)
    return sp.csr_matrix((np.ones(nodes.size), (nodes, np.arange(nodes.size))), shape=(n, nodes.size))


def _step_blocks(blocks: LinDist3FlowBlocks, lay: _Layout, ders, storage, limits: VoltageLimits):
    """One step's equality rows (balance P, balance Q, voltage drop, line-to-line voltage) in the
    step's columns:
    (A for load scale 1, A's change per unit of load scale, b at 1, b's change), and the substation
    power row (c, its change, constant, its change)."""
    r = blocks.radial
    fn, n, nf = blocks.flow_node, r.n, blocks.n_flows
    H1, c1 = blocks.load_terms(1.0)
    H2, c2 = blocks.load_terms(2.0)
    dH, dc = (H2 - H1).tocsr(), c2 - c1                      # load terms are affine in the scale
    E = _incidence(n, fn)                                     # flow -> the node it feeds
    Tr, Ti, Cr, Ci = blocks.T.real, blocks.T.imag, blocks.C.real, blocks.C.imag
    D, Gs = der_injection_map(r, ders), _incidence(n, storage["node"])   # D complex: delta DERs mix p, q
    Z = lambda r_, c_: sp.csr_matrix((r_, c_))  # noqa: E731
    ns = Gs.shape[1]

    def rows(H, keep):
        """[balance P; balance Q] rows of the given nodes, in the step's column order."""
        Hr, Hi = H.real[keep], H.imag[keep]
        K = lambda M: M[keep]  # noqa: E731
        top = sp.hstack([-Hr, K(E - Tr), K(Ti), K(D.real), -K(D.imag), -K(Gs), K(Gs), Z(len(keep), ns),
                         Z(len(keep), lay.nl)])
        bot = sp.hstack([-Hi, -K(Ti), K(E - Tr), K(D.imag), K(D.real), Z(len(keep), ns), Z(len(keep), ns),
                         K(Gs), Z(len(keep), lay.nl)])
        return top.tocsr(), bot.tocsr()

    top, bot = rows(H1, fn)
    drop = sp.hstack([(E.T - blocks.W), 2 * Cr, -2 * Ci, Z(nf, lay.m - lay.n - 2 * nf)])
    pair = limits.pair
    ll = sp.hstack([line_to_line_map(r, limits.node[pair], limits.node_to[pair]),
                    Z(lay.nl, lay.m - n - lay.nl), -sp.identity(lay.nl)])
    A = sp.vstack([top, bot, drop, ll]).tocsr()
    dtop, dbot = rows(dH, fn)
    # only the v columns change with the load scale
    keep_v = sp.diags(np.r_[np.ones(n), np.zeros(lay.m - n)])
    dA = sp.vstack([dtop @ keep_v, dbot @ keep_v, sp.csr_matrix(drop.shape), sp.csr_matrix(ll.shape)]).tocsr()
    dA.eliminate_zeros()
    b = np.r_[c1.real[fn], c1.imag[fn], np.zeros(nf + lay.nl)]
    db = np.r_[dc.real[fn], dc.imag[fn], np.zeros(nf + lay.nl)]
    # substation power: s_root = T s + H v + s_const - injections, on the root rows, summed
    sub_p, sub_q = rows(H1, r.root)
    dsub_p, dsub_q = rows(dH, r.root)
    # the balance rows are "(E - T) s - H v + G inj = s_const", so s_root = -(row) + s_const
    sub = dict(p=-np.asarray(sub_p.sum(axis=0)).ravel(), q=-np.asarray(sub_q.sum(axis=0)).ravel(),
               dp=-np.asarray((dsub_p @ keep_v).sum(axis=0)).ravel(),
               dq=-np.asarray((dsub_q @ keep_v).sum(axis=0)).ravel(),
               p0=c1.real[r.root].sum(), q0=c1.imag[r.root].sum(),
               dp0=dc.real[r.root].sum(), dq0=dc.imag[r.root].sum())
    return A, dA, b, db, sub


_ROUNDOFF = 1e-12   # products of unit phasors leave ~1e-17 where the exact value is 0 (e.g. Im T on lines)


def _clean(M: sp.spmatrix) -> sp.csr_matrix:
    """Drop round-off entries: they only slow the solver down (HiGHS warns about them)."""
    M = sp.csr_matrix(M, copy=True)
    M.data[np.abs(M.data) < _ROUNDOFF] = 0.0
    M.eliminate_zeros()
    return M


def _capability_rows(lay: _Layout, ders, storage, sides):
    """Polygon rows of one step: a (rows x m) matrix and its upper bounds."""
    blocks, ub = [], []
    # a DER has p >= 0 (half the polygon binds); a battery's p = p_dis - p_ch takes either sign
    for (p_cols, q_cols, s, generator) in (
            ([("pd", 1.0)], "qd", ders["s_rated"].to_numpy(), True),
            ([("pdis", 1.0), ("pc", -1.0)], "qs", storage["s_rated"].to_numpy(), False)):
        if s.size == 0:
            continue
        cos, sin, shrink = capability_polygon(sides, generator)
        P = sum(sign * lay.select(name) for name, sign in p_cols)
        Q = lay.select(q_cols)
        blocks.append(sp.vstack([c * P + si * Q for c, si in zip(cos, sin)]))
        ub.append(np.tile(s * shrink, len(cos)))
    if not blocks:
        return sp.csr_matrix((0, lay.m)), np.zeros(0)
    return sp.vstack(blocks).tocsr(), np.concatenate(ub)


def _loss_hessian(blocks: LinDist3FlowBlocks, lay: _Layout) -> sp.csr_matrix:
    """(m x m) symmetric L with loss = x^T L x on a step's (P, Q): per branch, M = D^H Re_h(Z) D
    (D = diag(alpha_child), Re_h the Hermitian part); loss = P'Mr P + Q'Mr Q + 2 P'Mi Q."""
    r = blocks.radial
    flow_of = np.full(r.n, -1)
    flow_of[blocks.flow_node] = np.arange(blocks.n_flows)
    rows, cols, vals = [], [], []
    for br in r.branches:
        a = r.alpha[br.child]
        Zh = (br.Z + br.Z.conj().T) / 2
        M = np.conj(a)[:, None] * Zh * a[None, :]
        f = flow_of[br.child]
        P, Q = lay.off["P"].start + f, lay.off["Q"].start + f
        for ri, ci, blk in ((P, P, M.real), (Q, Q, M.real), (P, Q, M.imag), (Q, P, M.imag.T)):
            rr, cc = np.meshgrid(ri, ci, indexing="ij")
            rows.append(rr.ravel()), cols.append(cc.ravel()), vals.append(blk.ravel())
    L = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(lay.m, lay.m))
    return ((L + L.T) / 2).tocsr()


def solve_multiperiod(net: Network, ders: pd.DataFrame | None, storage: pd.DataFrame | None, load_shape,
                      pv_shape=None, objective: str = "substation_energy", vmin: float = 0.95,
                      vmax: float = 1.05, price=None, solver: str | None = None,
                      dt_hours: float | None = None, polygon_sides: int = 16, throughput_cost: float = 1e-4,
                      options: dict | None = None, limit_nodes: str = "all") -> MultiPeriodResult:
    """Solve the day-ahead LinDist3Flow OPF described in the module docstring.

    ``ders``: :func:`dopfkit.opf.problem.der_table` rows; each one's available power at step t is its
    ``p_avail`` (the nameplate) times ``pv_shape[t]`` (a 1-D shape shared by all DERs, or a (T x DERs)
    array). ``storage``: :func:`storage_table` rows. ``load_shape``: multipliers of the scalable loads
    (a Series from :mod:`dopfkit.profiles` gives the time index and ``dt``; a plain array is taken to
    span one day unless ``dt_hours`` is given). ``price``: per kWh, for ``objective="energy_cost"``.
    ``solver``: ``"clarabel"`` (default: an interior-point method with a direct sparse LDL factorization,
    which suits the banded-by-step structure: about 2 s for IEEE 123 x 96 steps) or ``"highs"`` (dual
    simplex: exact vertex solutions, crisp charge/discharge schedules; fine for small models, but
    ~20 s for IEEE 123 x 96 because every flow and voltage is a basic variable to pivot in; not for
    ``"losses"``). ``options``: the solver's options (HiGHS ``{"time_limit": 60}``,
    Clarabel settings attributes). ``throughput_cost``: a tie-breaker, ``throughput_cost x (mean step
    weight) x dt (p_ch + p_dis)`` added to the objective (and left out of the reported value): objectives
    that do not price energy (peak, curtailment) have many optima, and an interior-point solver returns
    their centre, which charges and discharges at once; the tie-breaker picks the optimum that cycles
    least, at a cost of 1e-4 of the objective per unit of energy cycled. ``limit_nodes``: where
    ``vmin``/``vmax`` apply, ``"all"`` nodes (the default here) or ``"loads"`` (nodes with a load, a
    DER or a battery: the customers' service range, as in :class:`dopfkit.opf.OPFProblem`).
    """
    if limit_nodes not in ("all", "loads"):
        raise ValueError(f"limit_nodes must be 'loads' or 'all', not {limit_nodes!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    from dopfkit import solvers
    solver = solver or "clarabel"
    if solver not in _SOLVE:
        raise ValueError(f"solver {solver!r}: the multi-period model is solved with 'highs' (highspy) or "
                         "'clarabel'")
    if solver == "highs" and objective == "losses":
        raise ValueError("objective 'losses' is a QP on which HiGHS's active-set QP solver stalls with "
                         "residual infeasibilities here; use solver='clarabel' (the default)")
    solvers.require(solver)
    t0 = time.perf_counter()
    shape, index, dt = _time_axis(load_shape, dt_hours)
    T = shape.size
    radial = radial_network(net)
    blocks = lindist3flow_blocks(radial)
    ders = ders if ders is not None else pd.DataFrame({"name": [], "node": np.zeros(0, int),
                                                      "node_to": np.zeros(0, int), "node_name": [],
                                                      "s_rated": [], "p_avail": []})
    storage = storage if storage is not None else pd.DataFrame({c: [] for c in _EMPTY_STORAGE}).astype(
        {"node": int})
    _check_storage(storage)
    p_avail = _available(ders, pv_shape, T)
    weights = _step_weights(objective, price, dt, T)
    limits = voltage_limits(radial, _limited_nodes(radial, ders, storage, limit_nodes), vmin, vmax)

    lay = _Layout(radial.n, blocks.n_flows, len(ders), len(storage), T, int(limits.pair.sum()))
    model = _assemble(blocks, lay, ders, storage, shape, p_avail, weights, objective, dt, polygon_sides,
                      limits)
    tie = np.zeros(model["n_x"])
    for name in ("pc", "pdis"):
        cols = (np.arange(T)[:, None] * lay.m + np.arange(lay.off[name].start, lay.off[name].stop)).ravel()
        tie[cols] = throughput_cost * np.abs(weights).mean()        # the weights carry dt
    model["cost"] = model["cost"] + tie
    model["tie"] = tie
    build_time = time.perf_counter() - t0

    x, status, iters, solve_time = _SOLVE[solver](model, options)
    if status == "infeasible":
        raise _diagnose_infeasible(model, lay, radial, index, vmin, vmax, solver, options, limits)
    if x is None:
        raise RuntimeError(f"{solver} stopped with status {status!r} on the multi-period LinDist3Flow OPF "
                           f"of {net.name} ({T} steps)")
    return _result(x, model, lay, radial, ders, storage, index, dt, shape, p_avail, status, iters,
                   build_time, solve_time, objective, net.sbase, solver)


def _available(ders, pv_shape, T):
    """(T x DERs) available power, pu."""
    rating = ders["p_avail"].to_numpy(float)
    if pv_shape is None:
        if rating.size:
            raise ValueError("ders given without pv_shape: pass the PV shape (per unit of nameplate)")
        return np.zeros((T, 0))
    pv = np.asarray(pv_shape, float)
    pv = pv[:, None] if pv.ndim == 1 else pv
    if pv.shape[0] != T or pv.shape[1] not in (1, rating.size):
        raise ValueError(f"pv_shape has shape {np.shape(pv_shape)}; expected ({T},) or ({T}, {rating.size})")
    if (pv < 0).any():
        raise ValueError("pv_shape has negative values")
    return pv * rating[None, :]


def _step_weights(objective, price, dt, T):
    if objective == "energy_cost":
        if price is None:
            raise ValueError("objective 'energy_cost' needs price (per kWh, one value per step)")
        price = np.asarray(price, float)
        if price.shape != (T,):
            raise ValueError(f"price has shape {price.shape}; expected ({T},)")
        return dt * price
    return np.full(T, dt)


def _limited_nodes(r: RadialNetwork, ders, storage, limit_nodes: str) -> np.ndarray:
    """Radial nodes whose voltage is limited (never the fixed source nodes)."""
    limited = np.ones(r.n, bool) if limit_nodes != "loads" else nodes_mask(
        r.n, r.loads["node_from"].to_numpy(), r.loads["node_to"].to_numpy(), *der_ends(ders),
        storage["node"].to_numpy(int))
    limited[r.root] = False
    return limited


def _assemble(blocks, lay, ders, storage, shape, p_avail, w, objective, dt, sides, limits):
    """The whole LP (or QP) as sparse matrices and bound vectors."""
    T, ns, r = lay.T, lay.ns, blocks.radial
    A, dA, b, db, sub = _step_blocks(blocks, lay, ders, storage, limits)
    A, dA = _clean(A), _clean(dA)
    for key in ("p", "q", "dp", "dq"):
        sub[key] = np.where(np.abs(sub[key]) < _ROUNDOFF, 0.0, sub[key])
    ls = shape - 1.0
    I_T = sp.identity(T, format="csr")
    # equality rows: network physics per step, then the energy balance of each battery
    A_net = sp.kron(I_T, A) + sp.kron(sp.diags(ls), dA)
    b_net = np.kron(np.ones(T), b) + np.kron(ls, db)
    eta_c, eta_d = storage["eta_charge"].to_numpy(float), storage["eta_discharge"].to_numpy(float)
    # e_t - e_{t-1} - dt eta_c p_ch,t + dt / eta_d p_dis,t = 0
    S_step = sp.csr_matrix((0, lay.m))
    if ns:
        S_step = -dt * sp.diags(eta_c) @ lay.select("pc") + dt * sp.diags(1 / eta_d) @ lay.select("pdis")
    D = sp.diags([-np.ones(T), np.ones(T)], [0, 1], shape=(T, T + 1))
    A_soc = sp.hstack([sp.kron(I_T, S_step), sp.kron(D, sp.identity(ns))])
    # capability polygons per step
    Cap, cap_ub = _capability_rows(lay, ders, storage, sides)
    A_cap = sp.kron(I_T, Cap)

    n_x = lay.z + (objective == "peak_demand")
    pad = lambda M: sp.hstack([M, sp.csr_matrix((M.shape[0], n_x - M.shape[1]))])  # noqa: E731
    rows = [pad(A_net), pad(A_soc), pad(A_cap)]
    lo = [b_net, np.zeros(A_soc.shape[0]), np.full(A_cap.shape[0], -np.inf)]
    hi = [b_net, np.zeros(A_soc.shape[0]), np.tile(cap_ub, T)]

    # substation real power per step, P_sub,t = c_t x_t + k_t
    c_sub = sp.kron(I_T, sp.csr_matrix(sub["p"])) + sp.kron(sp.diags(ls), sp.csr_matrix(sub["dp"]))
    k_sub = sub["p0"] + ls * sub["dp0"]
    c_qsub = sp.kron(I_T, sp.csr_matrix(sub["q"])) + sp.kron(sp.diags(ls), sp.csr_matrix(sub["dq"]))
    k_qsub = sub["q0"] + ls * sub["dq0"]
    cost, offset, hessian = np.zeros(n_x), 0.0, None
    if objective in ("substation_energy", "energy_cost"):
        cost[:c_sub.shape[1]] = w @ c_sub
        offset = float(w @ k_sub)
    elif objective == "peak_demand":
        cost[lay.z] = 1.0
        rows.append(pad(sp.hstack([c_sub, sp.csr_matrix((T, n_x - 1 - c_sub.shape[1])),
                                   -sp.csr_matrix(np.ones((T, 1)))])))
        lo.append(np.full(T, -np.inf)), hi.append(-k_sub)
    elif objective == "curtailment":
        pd_cols = (np.arange(T)[:, None] * lay.m + np.arange(lay.off["pd"].start, lay.off["pd"].stop)).ravel()
        cost[pd_cols] = -dt
        offset = dt * p_avail.sum()
    else:   # losses: (1/2) x' (2 dt L) x
        L = _loss_hessian(blocks, lay)
        hessian = sp.block_diag([sp.kron(I_T, 2 * dt * L), sp.csr_matrix((n_x - T * lay.m,) * 2)]).tocsc()

    lb, ub = _bounds(lay, r, storage, p_avail, ders, n_x, limits)
    return dict(A=sp.vstack(rows).tocsc(), lo=np.concatenate(lo), hi=np.concatenate(hi), lb=lb, ub=ub,
                cost=cost, offset=offset, hessian=hessian, c_sub=c_sub.tocsr(), k_sub=k_sub,
                c_qsub=c_qsub.tocsr(), k_qsub=k_qsub, n_x=n_x, objective=objective)


def _bounds(lay, r: RadialNetwork, storage, p_avail, ders, n_x, limits: VoltageLimits):
    T, m, off = lay.T, lay.m, lay.off
    lb, ub = np.full((T, m), -np.inf), np.full((T, m), np.inf)
    lb[:, off["v"]], ub[:, off["v"]] = limits.node_bounds(r)
    lb[:, off["vll"]], ub[:, off["vll"]] = limits.lo[limits.pair], limits.hi[limits.pair]
    s_der = ders["s_rated"].to_numpy(float)
    lb[:, off["pd"]], ub[:, off["pd"]] = 0.0, np.minimum(p_avail, s_der)
    lb[:, off["qd"]], ub[:, off["qd"]] = -s_der, s_der
    power, s_st = storage["power"].to_numpy(float), storage["s_rated"].to_numpy(float)
    for name in ("pc", "pdis"):
        lb[:, off[name]], ub[:, off[name]] = 0.0, power
    lb[:, off["qs"]], ub[:, off["qs"]] = -s_st, s_st
    E = storage["energy"].to_numpy(float)
    e_lo = np.tile(storage["soc_min"].to_numpy(float) * E, (T + 1, 1))
    e_hi = np.tile(storage["soc_max"].to_numpy(float) * E, (T + 1, 1))
    e_init = storage["soc_init"].to_numpy(float) * E
    e_lo[0] = e_hi[0] = e_init
    e_lo[-1] = np.maximum(e_lo[-1], e_init)                   # end the day no emptier than it started
    extra = n_x - lay.z
    return (np.concatenate([lb.ravel(), e_lo.ravel(), np.full(extra, -np.inf)]),
            np.concatenate([ub.ravel(), e_hi.ravel(), np.full(extra, np.inf)]))


def _solve_clarabel(model, options):
    """The same model in Clarabel's form ``min x'Px/2 + q'x, A x + s = b, s in cones``: equality rows and
    fixed columns in the zero cone, every finite one-sided limit in the nonnegative cone."""
    import clarabel

    t0 = time.perf_counter()
    n_x, A = model["n_x"], model["A"].tocsr()
    eye = sp.identity(n_x, format="csr")
    lo, hi, lb, ub = model["lo"], model["hi"], model["lb"], model["ub"]
    eq, fixed = lo == hi, lb == ub
    le, ge = ~eq & np.isfinite(hi), ~eq & np.isfinite(lo)
    cu, cl = ~fixed & np.isfinite(ub), ~fixed & np.isfinite(lb)
    M = sp.vstack([A[eq], eye[fixed], A[le], -A[ge], eye[cu], -eye[cl]]).tocsc()
    b = np.concatenate([hi[eq], ub[fixed], hi[le], -lo[ge], ub[cu], -lb[cl]])
    n_eq = int(eq.sum() + fixed.sum())
    P = sp.triu(model["hessian"]).tocsc() if model["hessian"] is not None else sp.csc_matrix((n_x, n_x))
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.direct_solve_method = "faer"     # supernodal LDL: ~30 % faster than qdldl on IEEE 123 x 96
    for k, v in (options or {}).items():
        setattr(settings, k, v)
    sol = clarabel.DefaultSolver(P, model["cost"], M, b,
                                 [clarabel.ZeroConeT(n_eq), clarabel.NonnegativeConeT(M.shape[0] - n_eq)],
                                 settings).solve()
    status = {"Solved": "optimal", "AlmostSolved": "almost solved (reduced tolerances)",
              "PrimalInfeasible": "infeasible"}.get(str(sol.status), str(sol.status))
    x = np.asarray(sol.x) if status.startswith(("optimal", "almost")) else None
    return x, status, int(sol.iterations), time.perf_counter() - t0


def _solve_highs(model, options):
    import highspy

    t0 = time.perf_counter()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    for k, v in (options or {}).items():
        h.setOptionValue(k, v)
    A = model["A"]
    h.passModel(model["n_x"], A.shape[0], A.nnz, int(highspy.MatrixFormat.kColwise),
                int(highspy.ObjSense.kMinimize), model["offset"], model["cost"], model["lb"], model["ub"],
                model["lo"], model["hi"], A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data,
                np.zeros(model["n_x"], np.int32))                 # integrality: all continuous
    if model["hessian"] is not None:
        Hl = sp.tril(model["hessian"]).tocsc()                 # HiGHS reads the lower triangle, by column
        h.passHessian(Hl.shape[0], Hl.nnz, int(highspy.HessianFormat.kTriangular),
                      Hl.indptr.astype(np.int32), Hl.indices.astype(np.int32), Hl.data)
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    iters = int(max(info.simplex_iteration_count, info.ipm_iteration_count, info.qp_iteration_count))
    status = {highspy.HighsModelStatus.kOptimal: "optimal",
              highspy.HighsModelStatus.kInfeasible: "infeasible"}.get(st, h.modelStatusToString(st))
    x = np.asarray(h.getSolution().col_value) if status == "optimal" else None
    return x, status, iters, time.perf_counter() - t0


def _diagnose_infeasible(model, lay, radial, index, vmin, vmax, solver, options,
                         limits: VoltageLimits) -> OPFInfeasibleError:
    """Re-solve with the voltage limits made elastic (the only constraints that can exclude the idle
    point: DERs at zero and batteries holding their charge are always feasible) and name the worst."""
    T, m = lay.T, lay.m
    g = ~limits.pair                                   # step columns of every limited quantity
    nonroot = np.r_[limits.node[g], lay.off["vll"].start + np.arange(lay.nl)]
    names = np.r_[limits.names[g], limits.names[limits.pair]]
    vcols = (np.arange(T)[:, None] * m + nonroot[None, :]).ravel()
    k = vcols.size
    lb, ub = model["lb"].copy(), model["ub"].copy()
    lb[vcols], ub[vcols] = 0.0, np.inf
    pick = sp.csr_matrix((np.ones(k), (np.arange(k), vcols)), shape=(k, model["n_x"]))
    eye = sp.identity(k, format="csr")
    zero = sp.csr_matrix((model["A"].shape[0], 2 * k))
    A = sp.vstack([sp.hstack([model["A"], zero]),
                   sp.hstack([pick, eye, sp.csr_matrix((k, k))]),       # v + s_lo >= vmin^2
                   sp.hstack([pick, sp.csr_matrix((k, k)), -eye])]).tocsc()   # v - s_hi <= vmax^2
    elastic = dict(model, A=A, n_x=model["n_x"] + 2 * k, hessian=None, offset=0.0,
                   cost=np.r_[np.zeros(model["n_x"]), np.ones(2 * k)],
                   lb=np.r_[lb, np.zeros(2 * k)], ub=np.r_[ub, np.full(2 * k, np.inf)],
                   lo=np.r_[model["lo"], np.full(k, vmin ** 2), np.full(k, -np.inf)],
                   hi=np.r_[model["hi"], np.full(k, np.inf), np.full(k, vmax ** 2)])
    x, status, _, _ = _SOLVE[solver](elastic, options)
    if x is None:
        return OPFInfeasibleError(f"multi-period LinDist3Flow OPF is infeasible, and so is its elastic "
                                  f"re-solve ({status}): check the inputs")
    s = x[model["n_x"]:].reshape(2, T, len(nonroot))
    j = np.unravel_index(np.argmax(s.max(axis=0)), s.shape[1:])
    v = np.sqrt(x[vcols].reshape(T, len(nonroot))[j])
    return OPFInfeasibleError(
        f"voltage limits [{vmin}, {vmax}] pu cannot be met: the least violation still has "
        f"|V| = {v:.4f} pu at node {names[j[1]]} at hour {index[j[0]]} "
        f"({int((s.max(axis=0) > 1e-7).any(axis=1).sum())} of {T} steps violate)")


def _result(x, model, lay, radial, ders, storage, index, dt, shape, p_avail, status, iters, build_time,
            solve_time, objective, sbase, solver) -> MultiPeriodResult:
    T, ns = lay.T, lay.ns
    X = x[:T * lay.m].reshape(T, lay.m)
    kw = sbase / 1e3
    frame = lambda name, cols: pd.DataFrame(X[:, lay.off[name]] * kw, index=index, columns=cols)  # noqa: E731
    dnames, snames = list(ders["name"]), list(storage["name"])
    e = x[lay.e0:lay.z].reshape(T + 1, ns)
    E = storage["energy"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        soc = np.where(E > 0, e / np.where(E > 0, E, 1), np.nan)
    bound_index = pd.Index(np.r_[index[0], np.asarray(index, float) + dt] if pd.api.types.is_numeric_dtype(
        index) else np.arange(T + 1) * dt, name=index.name)
    v = X[:, lay.off["v"]]
    nonroot = np.setdiff1d(np.arange(radial.n), radial.root)
    p_ch, p_dis = X[:, lay.off["pc"]], X[:, lay.off["pdis"]]
    obj = float((model["cost"] - model["tie"]) @ x + model["offset"])
    if model["hessian"] is not None:
        obj += 0.5 * float(x @ (model["hessian"] @ x))
    return MultiPeriodResult(
        status=status, objective=obj * kw,              # pu -> kW, kWh (price is per kWh)
        objective_name=objective, time=index, dt=dt, load_shape=shape,
        p_der=frame("pd", dnames), q_der=frame("qd", dnames),
        p_avail=pd.DataFrame(p_avail * kw, index=index, columns=dnames),
        p_charge=frame("pc", snames), p_discharge=frame("pdis", snames), q_storage=frame("qs", snames),
        energy=pd.DataFrame(e * kw, index=bound_index, columns=snames),
        soc=pd.DataFrame(soc, index=bound_index, columns=snames),
        vmag=pd.DataFrame(np.sqrt(np.maximum(v[:, nonroot], 0)), index=index, columns=radial.nodes[nonroot]),
        p_substation=pd.Series((model["c_sub"] @ x[:model["c_sub"].shape[1]] + model["k_sub"]) * kw,
                               index=index, name="p_substation_kw"),
        q_substation=pd.Series((model["c_qsub"] @ x[:model["c_qsub"].shape[1]] + model["k_qsub"]) * kw,
                               index=index, name="q_substation_kvar"),
        simultaneous_kw=float(np.minimum(p_ch, p_dis).max(initial=0.0) * kw),
        build_time=build_time, solve_time=solve_time, solver=solver, iterations=iters, v=v,
        size=dict(rows=model["A"].shape[0], cols=model["n_x"], nnz=model["A"].nnz), sbase=sbase)


_SOLVE = {"highs": _solve_highs, "clarabel": _solve_clarabel}
