"""The OPF problem (what to decide, within which limits, for what objective), independent of the
formulation (how the physics is written: LinDist3Flow, NLP, SOCP, SDP).

Every formulation reads an :class:`OPFProblem` and returns a :class:`FormulationSolution` in the
radial-node numbering of :mod:`dopfkit.network.radial`; :func:`dopfkit.opf.solve_opf` then pushes the
set-points back through the exact power flow.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from dopfkit.network.math_model import Network, split_pairs
from dopfkit.network.radial import RadialNetwork, radial_network

OBJECTIVES = ("substation_power", "losses", "voltage_deviation", "curtailment", "generation_cost")


@dataclass
class OPFProblem:
    """Decisions: active and reactive power of each DER phase (``ders``), within its available
    power and its inverter rating ``|p + jq| <= s_rated``. Limits: ``vmin <= |V| <= vmax`` where
    customers are (``limit_nodes="loads"``: nodes with a load or a DER; the ANSI C84.1 service range),
    or on every node (``"all"``; regulator outputs then count too, and IEEE 13's sit at 1.06 pu).
    The sources' internal nodes are fixed. Per unit on ``network.sbase`` per phase.
    """
    network: Network
    ders: pd.DataFrame          # one row per DER phase: name, node (radial index), s_rated, p_avail, cost
    objective: str = "substation_power"
    vmin: float = 0.95
    vmax: float = 1.05
    load_scale: float = 1.0
    limit_nodes: str = "loads"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.limit_nodes not in ("loads", "all"):
            raise ValueError(f"limit_nodes must be 'loads' or 'all', not {self.limit_nodes!r}")

    def limited_nodes(self) -> np.ndarray:
        """Radial nodes where ``limit_nodes`` puts a limit (never the fixed source nodes)."""
        r = self.radial
        if self.limit_nodes == "all":
            limited = np.ones(r.n, bool)
        else:
            ends = (r.loads["node_from"].to_numpy(), r.loads["node_to"].to_numpy(), *der_ends(self.ders))
            limited = nodes_mask(r.n, *ends)
        limited[r.root] = False
        return limited

    def voltage_limits(self) -> VoltageLimits:
        """Every limited voltage: phase to ground, or line to line on ungrounded islands."""
        return voltage_limits(self.radial, self.limited_nodes(), self.vmin, self.vmax)

    def voltage_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on the squared voltage magnitude of every radial node: the phase-to-ground limits of
        :meth:`voltage_limits` (none on the nodes of an ungrounded island, limited line to line), the
        roots fixed."""
        return self.voltage_limits().node_bounds(self.radial)

    @property
    def radial(self) -> RadialNetwork:
        return radial_network(self.network)

    @property
    def n_ders(self) -> int:
        return len(self.ders)


@dataclass
class VoltageLimits:
    """Limits on squared voltage magnitudes (pu^2): ``|V_f|^2`` where ``node_to`` is -1, else the
    line-to-line ``|V_f - V_t|^2 / 3`` (per unit of sqrt(3) x the phase base).

    On an ungrounded island (IEEE 37 behind its delta-delta substation transformer, IEEE 123's bus
    610) a phase-to-ground voltage rests on ppm admittances to ground, and what customers' delta
    loads see is line to line; so a limited bus there is limited on every pair of its phases."""
    node: np.ndarray
    node_to: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    names: np.ndarray

    @property
    def pair(self) -> np.ndarray:
        return self.node_to >= 0

    def __len__(self) -> int:
        return len(self.node)

    def node_bounds(self, radial: RadialNetwork) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per radial node: the phase-to-ground limits, the roots fixed, others free."""
        lo, hi = np.zeros(radial.n), np.full(radial.n, np.inf)
        g = ~self.pair
        lo[self.node[g]], hi[self.node[g]] = self.lo[g], self.hi[g]
        lo[radial.root] = hi[radial.root] = radial.v_root
        return lo, hi

    def squared(self, V: np.ndarray) -> np.ndarray:
        """The limited quantities at complex node voltages ``V`` (radial numbering)."""
        to = np.where(self.pair, V[np.maximum(self.node_to, 0)], 0)
        return np.abs(V[self.node] - to) ** 2 / np.where(self.pair, 3.0, 1.0)


def voltage_limits(radial: RadialNetwork, limited: np.ndarray, vmin: float, vmax: float) -> VoltageLimits:
    """``vmin..vmax`` on the ``limited`` nodes: phase to ground on grounded nodes, on every phase
    pair of a limited bus of an ungrounded island (:meth:`RadialNetwork.floating_pairs`)."""
    k, m = radial.floating_pairs()
    ground = np.flatnonzero(limited & ~nodes_mask(radial.n, k, m))
    if k.size:                                           # a pair is limited if any node of its bus is
        bus = pd.Series(radial.nodes.str.rsplit(".", n=1).str[0])
        bus_limited = bus.map(pd.Series(limited).groupby(bus).any()).to_numpy()
        k, m = k[bus_limited[k]], m[bus_limited[k]]
    node = np.concatenate([ground, k])
    names = np.concatenate([np.asarray(radial.nodes[ground]), radial.pair_names(k, m)])
    return VoltageLimits(node=node, node_to=np.concatenate([np.full(len(ground), -1), m]),
                         lo=np.full(len(node), vmin**2), hi=np.full(len(node), vmax**2), names=names)


def nodes_mask(n: int, *index_arrays) -> np.ndarray:
    """Boolean mask of the nodes named in any of the arrays (-1 entries ignored)."""
    mask = np.zeros(n, bool)
    for k in index_arrays:
        k = np.asarray(k, int)
        mask[k[k >= 0]] = True
    return mask


def der_table(net: Network, nodes, s_rated_kva, p_avail_kw=None, cost=1.0, names=None) -> pd.DataFrame:
    """DER phases at the given OpenDSS nodes, ratings in kVA, available power in kW (default: the
    rating), per-unit on the network's base. ``"675.1"`` is a wye phase (node to ground),
    ``"701.1.2"`` a line-to-line (delta) one across nodes 701.1 and 701.2, as an ungrounded (three-wire
    delta) feeder needs: there a wye inverter would drive current into ground. A three-phase unit is
    three rows."""
    radial = radial_network(net)
    nodes = [str(x).lower() for x in nodes]
    first, second = split_pairs(nodes)
    pos = radial.nodes.get_indexer(first)
    pos_to = np.array([-1 if x is None else radial.nodes.get_loc(x) if x in radial.nodes else -2
                       for x in second], int)
    if (pos < 0).any() or (pos_to == -2).any():
        bad = [x for x, p, q in zip(nodes, pos, pos_to) if p < 0 or q == -2]
        raise KeyError(f"DER nodes not in {net.name}'s energized phase nodes: {bad}")
    s = np.broadcast_to(np.asarray(s_rated_kva, float), (len(nodes),)) * 1e3 / net.sbase
    p = s if p_avail_kw is None else np.broadcast_to(np.asarray(p_avail_kw, float),
                                                     (len(nodes),)) * 1e3 / net.sbase
    return pd.DataFrame({"name": names if names is not None else [f"der.{x}" for x in nodes],
                         "node": pos.astype(int), "node_to": pos_to, "node_name": nodes,
                         "s_rated": s, "p_avail": np.minimum(p, s),
                         "cost": np.broadcast_to(np.asarray(cost, float), (len(nodes),))})


def der_ends(ders: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(node, node_to) of every DER row in radial numbering; node_to is -1 for wye (also for tables
    built without the column)."""
    f = ders["node"].to_numpy(int)
    return f, ders["node_to"].to_numpy(int) if "node_to" in ders else np.full(len(f), -1)


def der_injection_map(radial: RadialNetwork, ders: pd.DataFrame, phasors=None) -> sp.csr_matrix:
    """(nodes x DERs) complex map from each DER's power ``p + jq`` to the power it injects at each
    node: 1 at a wye DER's node; across a pair ``(f, t)``, ``V_f / (V_f - V_t)`` at ``f`` and
    ``-V_t / (V_f - V_t)`` at ``t``, evaluated at ``phasors`` (default: the no-load angles), the share
    LinDist3Flow gives delta loads (Byeon, Ryu and Kim)."""
    a = radial.alpha if phasors is None else phasors
    f, t = der_ends(ders)
    pair = np.flatnonzero(t >= 0)
    d = a[f[pair]] - a[t[pair]]
    rows = np.r_[f, t[pair]]
    cols = np.r_[np.arange(len(f)), pair]
    vals = np.r_[np.where(t >= 0, 0, 1).astype(complex), -a[t[pair]] / d]
    vals[pair] = a[f[pair]] / d
    return sp.csr_matrix((vals, (rows, cols)), shape=(radial.n, len(f)))


def pv_sites(net, share: float = 0.1, seed: int = 0):
    """PV for examples and benchmarks: a seeded ``share`` of the load phases get a PV inverter rated
    1.2x that phase's load, connected as the load is: wye at a wye load's node, line to line across a
    delta load's pair (IEEE 37's loads are all delta, on an ungrounded feeder)."""
    r = radial_network(net)
    ld = r.loads[(r.loads.s_pu.abs() > 0) & r.loads.scalable]
    ld = ld.drop_duplicates("node_from")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ld), size=max(1, int(share * len(ld))), replace=False)
    rows = ld.iloc[np.sort(pick)]
    to = rows.node_to.to_numpy()
    nodes = [a if t < 0 else f"{a}.{r.nodes[t].rsplit('.', 1)[1]}"
             for a, t in zip(r.nodes[rows.node_from], to)]
    kva = 1.2 * np.abs(rows.s_pu.to_numpy()) * net.sbase / 1e3
    return der_table(net, nodes, kva)


def pv_problem(feeder, share: float = 0.1, seed: int = 0, objective: str = "substation_power",
               vmin: float = 0.9, vmax: float = 1.1) -> OPFProblem:
    """The benchmarks' OPF: PV at a seeded ``share`` of the load phases (:func:`pv_sites`), limits
    ``vmin``-``vmax`` at the load nodes. ``feeder``: a name for ``load_feeder`` or a loaded network."""
    from dopfkit.network import load_feeder
    net = load_feeder(feeder) if isinstance(feeder, str) else feeder
    return OPFProblem(net, pv_sites(net, share, seed), objective=objective, vmin=vmin, vmax=vmax)


@dataclass
class FormulationSolution:
    """What a formulation returns, in radial-node numbering and per unit."""
    formulation: str
    status: str                 # "optimal" or the solver's word
    objective: float
    v: np.ndarray               # squared voltage magnitude per radial node
    p_der: np.ndarray
    q_der: np.ndarray
    s_root: np.ndarray          # complex power the sources deliver, per root node
    build_time: float
    solve_time: float
    solver: str
    iterations: int | None = None
    extra: dict = field(default_factory=dict)   # e.g. rank or eigenvalue ratio of relaxations
    flows: np.ndarray | None = None  # complex power each branch delivers into each node's phase (0: roots)


class OPFInfeasibleError(RuntimeError):
    """The model has no feasible point; the message names the constraint family that an elastic
    (slack-penalized) re-solve had to relax."""
