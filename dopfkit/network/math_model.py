"""Math model: per unit, phase-expanded node index, sparse arrays.

Per-unit system. Every node ``"bus.k"`` has the line-to-neutral voltage base of its bus (OpenDSS's
``kVBase``), and one power base ``sbase`` (VA, per phase) holds everywhere, so with
``D = diag(vbase)``::

    V_pu = V / vbase,   I_pu = I * vbase / sbase,   Y_pu = D Y D / sbase.

The scaling is symmetric, so a reciprocal element stays symmetric in per unit, and transformers need
no special treatment: their turns ratios are inside their primitive matrices.

Loads (and fixed injections) are kept as *pairs*: one admittance-like branch per phase, from node
``a`` to node ``b`` (``b`` is often ground), with voltage ``u = M @ V_pu`` in volts. That one form
covers wye, delta, single-phase line-to-line and split-phase service loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra

from dopfkit.network.engineering import Feeder
from dopfkit.network.primitives import (
    capacitor_susceptance,
    lines_primitives,
    open_conductors,
    pairs_primitive,
    phase_voltage_base,
    source_primitive,
)
from dopfkit.network.report import IGNORED
from dopfkit.network.transformer import transformer_primitive

GROUND = -1


@dataclass
class LoadPairs:
    """One row per phase branch of every load, vectorized for the power flow."""
    names: np.ndarray        # element name of each pair
    element: np.ndarray      # index of the load element (for per-load scaling)
    node_from: np.ndarray    # node index or GROUND
    node_to: np.ndarray
    M: sp.csr_matrix         # (pairs x nodes): u_volts = M @ V_pu
    s_nom: np.ndarray        # VA per pair at nominal voltage (complex; negative for injections)
    v_nom: np.ndarray        # volts across the pair at which s_nom is drawn
    model: np.ndarray        # OpenDSS load model code
    vmin: np.ndarray         # pu of v_nom where model 1 / 5 switch to impedance
    vmax: np.ndarray
    vlow: np.ndarray
    zipv: np.ndarray         # (pairs x 7) ZIP coefficients, zeros unless model 8
    exponents: np.ndarray    # (pairs x 2) voltage exponents of P and Q inside the band
    scalable: np.ndarray     # False for loads OpenDSS keeps fixed (status=fixed) and for DERs

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Branches:
    """Every series element's primitive, stacked, to compute flows and losses in one product."""
    names: list[str]
    conductor_node: np.ndarray   # node index (or GROUND) of every conductor, all elements
    conductor_element: np.ndarray  # element index of every conductor
    conductor_terminal: np.ndarray
    Y: sp.csr_matrix             # block-diagonal primitives (siemens)


@dataclass
class Network:
    """The math model of one feeder snapshot. Build it with :func:`dopfkit.load_feeder`."""
    feeder: Feeder
    nodes: pd.Index              # "650.1"
    vbase: np.ndarray            # volts, line to neutral
    sbase: float                 # VA per phase
    Y: sp.csc_matrix             # per unit, network and sources (no loads)
    i_source: np.ndarray         # per unit Norton injection of the sources
    loads: LoadPairs
    branches: Branches
    distance_km: pd.Series       # electrical path length from the source, per node
    energized: np.ndarray        # False on nodes that open switches isolate from every source

    @property
    def name(self) -> str:
        return self.feeder.name

    @property
    def n(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        s = self.feeder.summary()
        return (f"Network({self.name!r}: {self.n} nodes, {s['lines']} lines, "
                f"{s['transformers']} transformers, {len(self.loads)} load phases)")


def _node_indices(index: dict[str, int], bus: str, nodes) -> np.ndarray:
    return np.array([GROUND if k == 0 else index[f"{bus}.{k}"] for k in nodes], int)


def _conductor_nodes(index, buses, nodes) -> np.ndarray:
    return np.concatenate([_node_indices(index, b, n) for b, n in zip(buses, nodes)])


def _series_primitives(feeder: Feeder, index: dict[str, int]):
    """(name, node indices, terminal of each conductor, primitive) of every series element."""
    out = []
    by_size: dict[int, list] = {}
    for ln in feeder.lines:
        by_size.setdefault(ln.z.shape[0], []).append(ln)
    for group in by_size.values():
        prims = lines_primitives(np.stack([ln.z for ln in group]),
                                 np.stack([ln.c for ln in group]), feeder.frequency)
        for ln, prim in zip(group, prims):
            nc = ln.z.shape[0]
            out.append((ln.name, _conductor_nodes(index, ln.buses, ln.nodes),
                        np.repeat([0, 1], nc), open_conductors(prim, ln.open_conductors)))
    for t in feeder.transformers:
        nodes = np.concatenate([_node_indices(index, w.bus_name, w.nodes) for w in t.windings])
        out.append(("transformer." + t.name, nodes,
                    np.repeat(np.arange(t.n_windings), t.n_conductors), transformer_primitive(t)))
    return out


def _shunt_primitives(feeder: Feeder, index: dict[str, int]):
    out = []
    for c in feeder.capacitors:
        nodes = _conductor_nodes(index, c.buses, c.nodes)
        b = capacitor_susceptance(c.kvar, c.kv, c.phases, c.delta)
        out.append((c.name, nodes, pairs_primitive(c.pairs(), 1j * b, len(nodes))))
    for s in feeder.shunts:
        out.append((s.name, _conductor_nodes(index, s.buses, s.nodes), s.yprim))
    for src in feeder.sources:
        out.append((src.name, _node_indices(index, src.buses[0], src.nodes[0]),
                    source_primitive(src.z)))
    return out


def _scatter(n: int, elements) -> sp.csc_matrix:
    """Sum primitives into an n x n matrix; conductors on ground are dropped (V = 0 there)."""
    rows, cols, vals = [], [], []
    for nodes, prim in elements:
        r, c = np.meshgrid(nodes, nodes, indexing="ij")
        keep = (r >= 0) & (c >= 0)
        rows.append(r[keep]), cols.append(c[keep]), vals.append(prim[keep])
    return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, n))


def _source_emf(feeder: Feeder, index, n: int) -> np.ndarray:
    """Norton current (A) of every source: Y_s E, E the balanced internal voltage."""
    i = np.zeros(n, complex)
    for src in feeder.sources:
        nodes = _node_indices(index, src.buses[0], src.nodes[0])
        k = np.arange(len(nodes))
        e = src.pu * src.kv_base * 1e3 / np.sqrt(3) * np.exp(1j * np.deg2rad(src.angle_deg - 120 * k))
        np.add.at(i, nodes, source_primitive(src.z) @ e)
    return i


def _load_pairs(feeder: Feeder, index, vbase: np.ndarray) -> LoadPairs:
    rows = []
    for e, ld in enumerate(feeder.loads):
        nodes = _conductor_nodes(index, ld.buses, ld.nodes)
        zipv = np.zeros(7) if ld.model != 8 else np.asarray(ld.zipv, float)
        for k, (a, b) in enumerate(ld.pairs()):
            kva = ld.phase_kva[k] if ld.phase_kva else (ld.kw + 1j * ld.kvar) / ld.phases
            rows.append((ld.name, e, nodes[a], nodes[b], kva * 1e3,
                         phase_voltage_base(ld.kv, ld.phases, ld.delta), ld.model,
                         ld.vminpu, ld.vmaxpu, ld.vlowpu, zipv,
                         ld.exponents(), not ld.fixed))
    cols = list(zip(*rows))
    nf, nt = np.array(cols[2]), np.array(cols[3])
    m, n = len(rows), len(vbase)
    k = np.arange(m)
    M = sp.csr_matrix((np.concatenate([vbase[nf[nf >= 0]], -vbase[nt[nt >= 0]]]),
                       (np.concatenate([k[nf >= 0], k[nt >= 0]]),
                        np.concatenate([nf[nf >= 0], nt[nt >= 0]]))), shape=(m, n))
    return LoadPairs(np.array(cols[0]), np.array(cols[1]), nf, nt, M, np.array(cols[4]),
                     np.array(cols[5], float), np.array(cols[6]), np.array(cols[7], float),
                     np.array(cols[8], float), np.array(cols[9], float), np.stack(cols[10]),
                     np.array(cols[11], float), np.array(cols[12], bool))


def _distances(feeder: Feeder, index, nodes: pd.Index) -> pd.Series:
    """Path length (km) from the first source bus to every node, through lines and transformers."""
    buses = sorted(feeder.kv_base)
    bi = {b: i for i, b in enumerate(buses)}
    edges = [(ln.buses[0], ln.buses[1], ln.length) for ln in feeder.lines if not ln.open_conductors.all()]
    edges += [(t.windings[0].bus_name, w.bus_name, 0.0) for t in feeder.transformers
              for w in t.windings[1:]]
    u, v, w = zip(*edges)
    g = sp.coo_matrix((np.asarray(w) + 1e-9, ([bi[x] for x in u], [bi[x] for x in v])),
                      shape=(len(buses),) * 2)
    d = dijkstra(g, directed=False, indices=bi[feeder.sources[0].buses[0]])
    return pd.Series(d[[bi[x.split(".")[0]] for x in nodes]], index=nodes, name="distance_km")


def _energized(Y: sp.csc_matrix, source_nodes: np.ndarray) -> np.ndarray:
    """Nodes connected to a source through non-zero series admittances (open conductors are 0)."""
    coupling = Y - sp.diags(Y.diagonal())
    coupling.eliminate_zeros()
    _, label = connected_components(coupling.astype(bool), directed=False)   # pattern only
    return np.isin(label, label[source_nodes])


def _isolate(Y: sp.csc_matrix, dead: np.ndarray) -> sp.csc_matrix:
    """Pin de-energized nodes to 0 V: identity rows and columns, as OpenDSS leaves them at 0."""
    keep = sp.diags((~dead).astype(float))
    return (keep @ Y @ keep + sp.diags(dead.astype(float))).tocsc()


def build_network(feeder: Feeder, sbase: float = 1e6) -> Network:
    """Turn the engineering model into the per-unit math model."""
    nodes = pd.Index(feeder.bus_nodes, name="node")
    index = {name: i for i, name in enumerate(nodes)}
    vbase = np.array([feeder.kv_base[x.split(".")[0]] for x in nodes]) * 1e3
    n = len(nodes)
    series = _series_primitives(feeder, index)
    shunts = _shunt_primitives(feeder, index)
    Y = _scatter(n, [(nd, p) for _, nd, _, p in series] + [(nd, p) for _, nd, p in shunts])
    source_nodes = np.concatenate([_node_indices(index, s.buses[0], s.nodes[0]) for s in feeder.sources])
    energized = _energized(Y, source_nodes[source_nodes >= 0])
    D = sp.diags(vbase)
    conductor_node = np.concatenate([nd for _, nd, _, _ in series])
    branches = Branches(
        names=[name for name, *_ in series], conductor_node=conductor_node,
        conductor_element=np.repeat(np.arange(len(series)), [len(nd) for _, nd, _, _ in series]),
        conductor_terminal=np.concatenate([t for _, _, t, _ in series]),
        Y=sp.block_diag([p for *_, p in series], format="csr"))
    loads = _load_pairs(feeder, index, vbase)
    _drop_isolated_loads(feeder, loads, energized)
    return Network(feeder=feeder, nodes=nodes, vbase=vbase, sbase=sbase,
                   Y=_isolate((D @ Y @ D / sbase).tocsc(), ~energized),
                   i_source=_source_emf(feeder, index, n) * vbase / sbase,
                   loads=loads, branches=branches,
                   distance_km=_distances(feeder, index, nodes), energized=energized)


def _drop_isolated_loads(feeder: Feeder, loads: LoadPairs, energized: np.ndarray) -> None:
    """Loads on de-energized nodes draw nothing; say so in the import report."""
    on = lambda k: np.where(k >= 0, energized[np.maximum(k, 0)], True)  # noqa: E731 (ground is live)
    dead = ~(on(loads.node_from) & on(loads.node_to))
    loads.s_nom[dead] = 0
    reported = {row[0] for row in feeder.report.rows if row[1] == IGNORED}   # rebuilds add nothing
    for name in dict.fromkeys(loads.names[dead]):
        if name not in reported:
            feeder.report.add(name, IGNORED, "de-energized: open switches isolate its bus from the source")


def split_pairs(names) -> tuple[list[str], list[str | None]]:
    """``"701.1.2"`` -> (``"701.1"``, ``"701.2"``), a line-to-line connection; ``"675.1"`` ->
    (``"675.1"``, None), wye to ground. OpenDSS bus names hold no dots."""
    parts = [str(x).lower().split(".") for x in names]
    bad = [x for x, p in zip(names, parts) if len(p) not in (2, 3)]
    if bad:
        raise ValueError(f"nodes must be 'bus.k' (wye) or 'bus.k.m' (line to line), not {bad}")
    return [f"{p[0]}.{p[1]}" for p in parts], [f"{p[0]}.{p[2]}" if len(p) == 3 else None for p in parts]


def with_injections(net: Network, nodes, s_pu, names=None) -> Network:
    """A copy of ``net`` with constant-power injections ``s_pu`` (per unit, generator convention)
    at the given OpenDSS nodes: ``"675.1"`` wye to ground, ``"701.1.2"`` line to line. This is how OPF
    set-points are pushed back through the exact power flow. The feeder data and its import report
    are shared, not copied."""
    import dataclasses
    nodes = list(nodes)
    first, second = split_pairs(nodes)
    idx = net.nodes.get_indexer(first)
    to = np.array([GROUND if x is None else net.nodes.get_loc(x) if x in net.nodes else -2 for x in second])
    if (idx < 0).any() or (to == -2).any():
        missing = [x for x, i, t in zip(nodes, idx, to) if i < 0 or t == -2]
        raise KeyError(f"nodes not in {net.name}: {missing}")
    s = -np.asarray(s_pu, complex) * net.sbase            # loads draw; injections draw negative power
    m, lp = len(idx), net.loads
    pair = to >= 0
    extra = sp.csr_matrix((np.r_[net.vbase[idx], -net.vbase[to[pair]]],
                           (np.r_[np.arange(m), np.flatnonzero(pair)], np.r_[idx, to[pair]])),
                          shape=(m, net.n))
    v_nom = net.vbase[idx] * np.where(pair, np.sqrt(3), 1.0)    # regime band below is wide: rough is enough
    names = np.asarray(names if names is not None else [f"injection.{x}" for x in nodes])
    cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
    loads = LoadPairs(
        names=cat(lp.names, names), element=cat(lp.element, lp.element.max(initial=-1) + 1 + np.arange(m)),
        node_from=cat(lp.node_from, idx), node_to=cat(lp.node_to, to),
        M=sp.vstack([lp.M, extra]).tocsr(), s_nom=cat(lp.s_nom, s), v_nom=cat(lp.v_nom, v_nom),
        model=cat(lp.model, np.ones(m, int)), vmin=cat(lp.vmin, np.full(m, 0.5)),   # constant power
        vmax=cat(lp.vmax, np.full(m, 2.0)), vlow=cat(lp.vlow, np.full(m, 0.25)),      # well beyond

        zipv=np.vstack([lp.zipv, np.zeros((m, 7))]), exponents=np.vstack([lp.exponents, np.zeros((m, 2))]),
        scalable=cat(lp.scalable, np.zeros(m, bool)))
    return dataclasses.replace(net, loads=loads)
