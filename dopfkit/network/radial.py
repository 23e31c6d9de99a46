"""Radial branch-flow view of the math model: what every branch-flow formulation needs.

Each branch (a line or switch, a transformer bank, or the source's Thevenin impedance) joins a parent
bus ``i`` to a child bus ``j``. In per unit it is an ideal phase map followed by a series impedance on
the child's phases::

    V_j = N V_i - Z I_j           (I_j: current the branch delivers into bus j)

Lines have ``N = I``. A transformer's ``N`` and ``Z`` come from its per-unit primitive admittance
``[[A, B], [C, D]]`` (parent, child): ``Z = D^-1`` and ``N = -D^-1 C``. That is exact for any winding
connection whose child side is grounded (wye-grounded, split-phase service); on a floating child
(ungrounded delta, open-delta regulators) ``D`` has no zero-sequence path and the pseudo-inverse keeps
the positive and negative sequences only (reported as an approximation). A transformer's no-load
(core-loss and magnetizing) admittance is part of its primitive: eliminating the child side leaves it
as a shunt ``A + B N`` on the parent (:meth:`RadialBranch.parent_draw`), which the NLP, the SOCP/SDP
lift and :meth:`RadialNetwork.sending_power` keep and the lossless LinDist3Flow, drawing through ``N``
alone, leaves out (reported when present).

Every node also carries ``alpha``, the unit phasor of its no-load voltage (the network energized with
no load). Linear models assume the voltages keep these angles; taking them from the no-load solution
rather than from ideal 0/-120/120 degrees handles delta-wye phase shifts and the opposite halves of a
split-phase secondary with no special case.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dopfkit.network.math_model import GROUND, Network
from dopfkit.network.primitives import capacitor_susceptance
from dopfkit.network.report import APPROXIMATED

IDEAL_Z = 1e-6     # pu: a closed switch (OpenDSS gives it ~1e-8 pu); relaxations and the bus injection
                   # form treat it as ideal
PINV_RCOND = 1e-4   # anti-float shunts are ~1e-6 of the leakage admittance: drop them, keep the rest


class NotRadialError(ValueError):
    """The bus graph has a loop; branch-flow formulations need a tree."""


@dataclass
class RadialBranch:
    name: str                 # element name, or names joined by "+" for a bank of single-phase units
    kind: str                 # "line", "switch", "transformer", "reactor" or "source"
    parent: np.ndarray        # parent node indices (radial-node numbering)
    child: np.ndarray         # child node indices
    N: np.ndarray             # (child x parent) ideal map, V_j = N V_i - Z I_j
    Z: np.ndarray             # (child x child) series impedance, per unit
    Y: np.ndarray | None = None   # per-unit primitive on [parent, child] nodes (two-port branches)
    floating: bool = False        # child side has no zero-sequence path (Z, N from a pseudo-inverse)

    def parent_draw(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Y_sh, G)``: the current the branch draws from its parent phases is ``Y_sh V_i + G I_j``.
        A line draws ``N^H I_j``; a two-port ``A V_i + B V_j = (A + B N) V_i - B Z I_j``, whose
        shunt ``A + B N`` is a transformer's no-load (core-loss and magnetizing) admittance."""
        m = len(self.parent)
        if self.Y is None:
            return np.zeros((m, m), complex), self.N.conj().T
        A, B = self.Y[:m, :m], self.Y[:m, m:]
        return A + B @ self.N, -B @ self.Z


@dataclass
class RadialNetwork:
    """Tree of branches over phase nodes; node 0.. are the sources' internal (EMF) nodes."""
    network: Network
    nodes: pd.Index           # "vsource.source.1", then "650.1", ...
    net_index: np.ndarray     # position in network.nodes (-1 for EMF nodes)
    alpha: np.ndarray         # unit phasor of the no-load voltage
    root: np.ndarray          # EMF nodes: voltage fixed
    v_root: np.ndarray        # their squared voltage magnitude (pu^2)
    branches: list[RadialBranch]
    in_branch: np.ndarray     # branch feeding each node (-1 at the roots)
    shunt: sp.csr_matrix      # per-unit shunt admittance (line charging, capacitors), node x node
    loads: pd.DataFrame       # one row per load pair: node_from, node_to (-1 ground), s_pu, model...
    approximations: list[tuple[str, str]]

    @property
    def n(self) -> int:
        return len(self.nodes)

    def behind_approximation(self) -> np.ndarray:
        """Nodes whose phase-to-ground voltage rests on a floating delta's pseudo-inverse (the nodes
        of an ungrounded island, :meth:`floating_island`): only their line-to-line voltages are exact
        in the branch-flow view."""
        return self.floating_island() >= 0

    def floating_island(self) -> np.ndarray:
        """Per node, the floating-secondary branch whose island (the nodes it feeds, through lines and
        ungrounded banks such as IEEE 37's open-delta regulators, down to the next transformer that
        grounds its secondary) the node is in; -1 on grounded nodes. Pure topology: computed once
        (every formulation's limits and error check ask for it)."""
        if getattr(self, "_island", None) is None:
            island = np.full(self.n, -1)
            for b, br in enumerate(self.branches):       # breadth-first: parents come first
                grounds = br.Y is not None and _grounds_child(br)
                island[br.child] = b if br.floating else -1 if grounds else island[br.parent[0]]
            island.setflags(write=False)
            self._island = island
        return self._island

    def floating_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair ``(k, m)`` of phase nodes of one bus on an ungrounded island (its line-to-line
        voltages: all the physics there is on such a bus)."""
        idx = np.flatnonzero((self.floating_island() >= 0) & (self.net_index >= 0))
        bus = np.asarray(self.nodes[idx].str.rsplit(".", n=1).str[0])   # a bus's nodes are adjacent
        same = [(bus[:-gap] == bus[gap:], gap) for gap in (1, 2)]        # at most 3 phases a bus
        return (np.concatenate([idx[:-gap][s] for s, gap in same]).astype(int),
                np.concatenate([idx[gap:][s] for s, gap in same]).astype(int))

    def pair_names(self, k, m) -> np.ndarray:
        """``"701.1.2"`` for the pair of nodes 701.1 and 701.2."""
        return np.array([f"{self.nodes[a]}.{self.nodes[b].rsplit('.', 1)[1]}" for a, b in zip(k, m)],
                        dtype=object)

    def forward_voltages(self, current: np.ndarray) -> np.ndarray:
        """Complex node voltages from the source down, ``V_j = N V_i - Z I_j``, given the current
        ``I_j`` each branch delivers into each non-root node (a forward sweep)."""
        V = np.zeros(self.n, complex)
        V[self.root] = np.sqrt(self.v_root) * self.alpha[self.root]
        for br in self.branches:                         # parents first
            V[br.child] = br.N @ V[br.parent] - br.Z @ current[br.child]
        return V

    def sending_power(self, V: np.ndarray, current: np.ndarray) -> np.ndarray:
        """Complex power the branches draw from their parent nodes, given the node voltages and the
        currents delivered into the children: ``V_i conj(I_j)`` on a line, ``V_i conj(A V_i + B V_j)``
        from a two-port's primitive ``[[A, B], [C, D]]``."""
        drawn = np.zeros(self.n, complex)
        for br in self.branches:
            if br.Y is None:
                i_parent = current[br.child]
            else:
                m = len(br.parent)
                i_parent = br.Y[:m, :m] @ V[br.parent] + br.Y[:m, m:] @ V[br.child]
            np.add.at(drawn, br.parent, V[br.parent] * np.conj(i_parent))
        return drawn

    def with_angles(self, alpha: np.ndarray) -> RadialNetwork:
        """The same network with its linear models' reference angles moved to ``alpha``."""
        return replace(self, alpha=np.asarray(alpha, complex))

    def __repr__(self) -> str:
        return (f"RadialNetwork({self.network.name!r}: {self.n} nodes, {len(self.branches)} branches, "
                f"{len(self.loads)} load pairs)")


def radial_network(net: Network) -> RadialNetwork:
    """Build the branch-flow view of ``net`` (cached on the network: it is pure topology + data)."""
    cached = getattr(net, "_radial", None)
    if cached is not None:
        return cached
    fd = net.feeder
    live = np.flatnonzero(net.energized & ~_internal_neutrals(net))
    emf = [f"{s.name}.{k}" for s in fd.sources for k in s.nodes[0] if k]
    names = pd.Index(emf + list(net.nodes[live]), name="node")
    pos = np.full(net.n, GROUND)
    pos[live] = np.arange(len(emf), len(names))
    v0 = spla.spsolve(net.Y.tocsc(), net.i_source)            # no-load voltages
    alpha = np.concatenate([_source_phasors(fd), v0[live] / np.abs(v0[live])])

    approx: list[tuple[str, str]] = []
    transformers = _transformer_branches(net, pos, approx)
    grouped = {nm for br in transformers for nm in br.name.split("+")}
    branches = _source_branches(net, pos, len(emf)) + _line_branches(net, pos, grouped) + transformers
    branches = _orient(branches, len(names), np.arange(len(emf)), names)
    in_branch = np.full(len(names), -1)
    for b, br in enumerate(branches):
        in_branch[br.child] = b
    orphan = np.setdiff1d(np.flatnonzero(in_branch < 0), np.arange(len(emf)))
    if orphan.size:
        raise NotRadialError(f"{net.name}: nodes {list(names[orphan[:5]])} have no branch from the "
                             "source (a phase lost through a transformer or switch)")
    radial = RadialNetwork(
        network=net, nodes=names, net_index=np.concatenate([np.full(len(emf), -1), live]),
        alpha=alpha, root=np.arange(len(emf)),
        v_root=np.concatenate([np.full(len(s.nodes[0]) - list(s.nodes[0]).count(0), s.pu**2)
                               for s in fd.sources]),
        branches=branches, in_branch=in_branch, shunt=_shunts(net, pos, len(names)),
        loads=_loads(net, pos), approximations=approx)
    _island_phasors(radial)
    net._radial = radial
    return radial


def _island_phasors(radial: RadialNetwork) -> None:
    """On an ungrounded island, take ``alpha`` from the branch-flow model's own no-load voltages,
    ``V_j = N V_i`` from the island's feeding bus down, not from the exact no-load solution.

    There the exact phase-to-ground voltage carries a zero sequence set by ppm admittances to ground
    (8 % at IEEE 37's bus 799, from its open-delta regulators), which the pseudo-inverse ``N`` of the
    floating secondary leaves out. Angles that kept it would share delta loads and phase powers about
    one ground while the drops are written about another: on IEEE 37 that alone puts LinDist3Flow's
    line-to-line voltages 6.6 % off instead of 3.0 %."""
    island = radial.floating_island()
    V = radial.alpha.copy()
    for br in radial.branches:                           # parents first
        if island[br.child[0]] >= 0:
            V[br.child] = br.N @ V[br.parent]
    radial.alpha = V / np.abs(V)


def _internal_neutrals(net: Network) -> np.ndarray:
    """Floating neutral nodes (number 4 and up) that only transformer windings touch: they are
    Kron-reduced into their transformer, so the branch-flow model keeps phase nodes only."""
    number = np.array([int(x.rsplit(".", 1)[1]) for x in net.nodes])
    br = net.branches
    is_tx = np.array([nm.startswith("transformer.") for nm in br.names])[br.conductor_element]
    used = np.concatenate([net.loads.node_from, net.loads.node_to, br.conductor_node[~is_tx]])
    touched = np.zeros(net.n, bool)
    touched[used[used >= 0]] = True
    return (number >= 4) & ~touched


def _source_phasors(fd) -> np.ndarray:
    out = []
    for s in fd.sources:
        k = np.arange(sum(1 for x in s.nodes[0] if x))
        out.append(np.exp(1j * np.deg2rad(s.angle_deg - 120 * k)))
    return np.concatenate(out)


def _source_branches(net: Network, pos: np.ndarray, n_emf: int) -> list[RadialBranch]:
    """The Thevenin impedance between each source's EMF and its bus."""
    out, k = [], 0
    index = {x: i for i, x in enumerate(net.nodes)}
    for s in net.feeder.sources:
        nodes = np.array([index[f"{s.buses[0]}.{c}"] for c in s.nodes[0] if c])
        m = len(nodes)
        vb = net.vbase[nodes]
        z = s.z[:m, :m] * net.sbase / np.outer(vb, vb)
        out.append(RadialBranch(s.name, "source", np.arange(k, k + m), pos[nodes], np.eye(m), z))
        k += m
    return out


def _line_branches(net: Network, pos: np.ndarray, grouped: set) -> list[RadialBranch]:
    """Lines and closed switches; lines joining the same two buses (single-phase runs to a
    capacitor, parallel circuits) become one branch whose series admittances add."""
    index = {x: i for i, x in enumerate(net.nodes)}
    groups: dict[frozenset, list] = defaultdict(list)
    for ln in net.feeder.lines:
        closed = ~ln.open_conductors.any(axis=0)
        if ln.name in grouped or not closed.any():
            continue                                      # an open switch is not a branch
        i = np.array([index[f"{ln.buses[0]}.{c}"] for c in ln.nodes[0]])[closed]
        j = np.array([index[f"{ln.buses[1]}.{c}"] for c in ln.nodes[1]])[closed]
        if (pos[i] < 0).any():
            continue                                      # de-energized section
        groups[frozenset(ln.buses)].append((ln, i, j, ln.z[np.ix_(closed, closed)]))
    out = []
    for members in groups.values():
        ln0, i0, _, _ = members[0]
        pairs = {}                                        # child node -> parent node
        for ln, i, j, _ in members:
            flip = ln.buses[0] != ln0.buses[0]
            pairs.update(zip(i if flip else j, j if flip else i))
        child = np.array(sorted(pairs))
        at = {k: a for a, k in enumerate(child)}
        y = np.zeros((len(child),) * 2, complex)
        for ln, i, j, z in members:
            ix = [at[k] for k in (i if ln.buses[0] != ln0.buses[0] else j)]
            y[np.ix_(ix, ix)] += np.linalg.inv(z)
        vb = net.vbase[child]
        z = np.linalg.inv(y) * net.sbase / np.outer(vb, vb)
        kind = "switch" if all(m[0].is_switch for m in members) else "line"
        out.append(RadialBranch("+".join(m[0].name for m in members), kind,
                                pos[np.array([pairs[k] for k in child])], pos[child], np.eye(len(child)), z))
    return out


def _element_blocks(net: Network):
    """Per-unit primitive of every transformer on its non-ground nodes, grouped by the bus pair it
    joins: a bank of single-phase units becomes one branch, and so does a line in parallel with
    it (IEEE 37's open-delta regulators share phase 2 through a jumper)."""
    br = net.branches
    starts = np.searchsorted(br.conductor_element, np.arange(len(br.names)))
    ends = np.append(starts[1:], len(br.conductor_element))
    bus_of = np.array([x.split(".")[0] for x in net.nodes])
    elements = {}
    for e, name in enumerate(br.names):
        rows = np.arange(starts[e], ends[e])
        nodes, term = br.conductor_node[rows], br.conductor_terminal[rows]
        keep = nodes != GROUND
        elements[name] = (rows[keep], nodes[keep], term[keep])
    prims = {nm: br.Y[r][:, r].toarray() for nm, (r, _, _) in elements.items()}
    index = {x: i for i, x in enumerate(net.nodes)}
    for sh in net.feeder.shunts:                      # series reactors (IEEE 8500's source reactor)
        if len(set(sh.buses)) == 2:
            nodes = np.array([index.get(f"{b}.{k}", GROUND) if k else GROUND
                              for b, nd in zip(sh.buses, sh.nodes) for k in nd])
            term = np.repeat([0, 1], [len(nd) for nd in sh.nodes])
            keep = nodes != GROUND
            elements[sh.name] = (None, nodes[keep], term[keep])
            prims[sh.name] = sh.yprim[np.ix_(keep, keep)]
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for name, (_, nodes, term) in elements.items():
        if name.startswith("line."):
            continue
        parent = set(bus_of[nodes[term == 0]])
        child = set(bus_of[nodes[term > 0]]) - parent
        if len(parent) != 1 or len(child) != 1:
            raise NotRadialError(f"{name} joins buses {sorted(set(bus_of[nodes]))}: a branch-flow model "
                                 "needs each transformer to join exactly two buses")
        groups[(parent.pop(), child.pop())].append(name)
    pairs = {frozenset(k): k for k in groups}
    for name, (_, nodes, _) in elements.items():
        key = pairs.get(frozenset(bus_of[nodes]))
        if name.startswith("line.") and key is not None:
            groups[key].append(name)
    return {key: [(nm, elements[nm][1], prims[nm]) for nm in names] for key, names in groups.items()}


def _transformer_branches(net: Network, pos: np.ndarray, approx: list) -> list[RadialBranch]:
    out = []
    scale = net.vbase / np.sqrt(net.sbase)
    for (bus_i, _), elements in _element_blocks(net).items():
        nodes = np.unique(np.concatenate([nd for _, nd, _ in elements]))
        at = {k: a for a, k in enumerate(nodes)}
        y = np.zeros((len(nodes),) * 2, complex)
        for _, nd, prim in elements:                          # sum the bank onto shared nodes
            ix = [at[k] for k in nd]
            y[np.ix_(ix, ix)] += prim
        y *= np.outer(scale[nodes], scale[nodes])              # per unit
        if not net.energized[nodes].all():
            continue
        inner = pos[nodes] < 0                                 # floating neutrals: Kron-reduce
        if inner.any():
            y = y[np.ix_(~inner, ~inner)] - y[np.ix_(~inner, inner)] @ np.linalg.solve(
                y[np.ix_(inner, inner)], y[np.ix_(inner, ~inner)])
            nodes = nodes[~inner]
        is_parent = np.array([net.nodes[k].split(".")[0] == bus_i for k in nodes])
        name = "+".join(nm for nm, _, _ in elements)
        kind = "transformer" if "transformer." in name else "reactor"
        order = np.concatenate([np.flatnonzero(is_parent), np.flatnonzero(~is_parent)])
        br = _two_port(name, kind, pos[nodes[order]], int(is_parent.sum()), y[np.ix_(order, order)], approx)
        out.append(br)
    for t in net.feeder.transformers:
        if t.pct_imag > 0 or t.pct_noloadloss > 0:
            approx.append(("transformer." + t.name, "no-load branch: its power is left out of "
                           "lossless LinDist3Flow's parent draw through N"))
    return out


def _orient(branches: list[RadialBranch], n: int, roots: np.ndarray, names) -> list[RadialBranch]:
    """Direct every branch away from the sources (breadth first); refuse loops."""
    node_bus = np.asarray(names.str.rsplit(".", n=1).str[0])
    bus_of = {b: i for i, b in enumerate(dict.fromkeys(node_bus))}
    nb = np.array([bus_of[b] for b in node_bus])
    adj: dict[int, list[int]] = defaultdict(list)
    for k, br in enumerate(branches):
        adj[nb[br.parent[0]]].append(k)
        adj[nb[br.child[0]]].append(k)
    seen_bus = set(nb[roots])
    ordered, frontier = [], list(seen_bus)
    used = set()
    while frontier:
        nxt = []
        for bus in frontier:
            for k in adj[bus]:
                if k in used:
                    continue
                used.add(k)
                br = branches[k]
                far = nb[br.child[0]] if nb[br.parent[0]] == bus else nb[br.parent[0]]
                if far in seen_bus:
                    raise NotRadialError(f"branch {br.name} closes a loop: a branch-flow model needs "
                                         "a radial feeder (open a tie switch)")
                if far != nb[br.child[0]]:
                    br = _reverse(br)
                seen_bus.add(far)
                ordered.append(br)
                nxt.append(far)
        frontier = nxt
    return ordered


def _two_port(name, kind, nodes, n_parent, y, approx=None) -> RadialBranch:
    """N and Z of ``V_j = N V_i - Z I_j`` from a per-unit primitive on [parent, child] nodes."""
    C, D = y[n_parent:, :n_parent], y[n_parent:, n_parent:]
    sv = np.linalg.svd(D, compute_uv=False)
    floating = bool(sv[-1] < PINV_RCOND * sv[0])
    if floating and approx is not None:
        approx.append((name, "floating secondary: zero sequence left out (pseudo-inverse)"))
    Z = np.linalg.pinv(D, rcond=PINV_RCOND)
    return RadialBranch(name, kind, nodes[:n_parent], nodes[n_parent:], -Z @ C, Z, y, floating)


def _grounds_child(br: RadialBranch) -> bool:
    """Whether the two-port passes current from its child terminals to ground (a grounded wye or
    split-phase winding), beyond the 1 ppm anti-float shunts: the child rows of its primitive do not
    sum to zero."""
    m = len(br.parent)
    return bool(np.abs(br.Y[m:].sum(axis=1)).max() > 1e-3 * np.abs(br.Y[m:]).max())


def _reverse(br: RadialBranch) -> RadialBranch:
    """The same element fed from its other side (a regulator reached from its load side)."""
    if br.Y is None:                                   # lines: symmetric, swap the ends
        return RadialBranch(br.name, br.kind, br.child, br.parent, br.N, br.Z)
    m = len(br.parent)
    order = np.r_[m:len(br.Y), 0:m]
    return _two_port(br.name, br.kind, np.r_[br.child, br.parent], len(br.child),
                     br.Y[np.ix_(order, order)])


def _shunts(net: Network, pos: np.ndarray, n: int) -> sp.csr_matrix:
    """Line charging (half at each end) and capacitors, per unit, on radial nodes."""
    rows, cols, vals = [], [], []
    index = {x: i for i, x in enumerate(net.nodes)}
    w = 2 * np.pi * net.feeder.frequency
    for ln in net.feeder.lines:
        closed = ~ln.open_conductors.any(axis=0)
        for t in (0, 1):
            nd = np.array([index[f"{ln.buses[t]}.{c}"] for c in ln.nodes[t]])[closed]
            if (pos[nd] < 0).any():
                continue
            y = 0.5j * w * ln.c[np.ix_(closed, closed)] * np.outer(net.vbase[nd], net.vbase[nd]) / net.sbase
            r, c = np.meshgrid(pos[nd], pos[nd], indexing="ij")
            rows.append(r.ravel()), cols.append(c.ravel()), vals.append(y.ravel())
    for cap in net.feeder.capacitors:
        nodes = np.array([GROUND if k == 0 else index[f"{cap.buses[t]}.{k}"]
                          for t in (0, 1) for k in cap.nodes[t]])
        b = capacitor_susceptance(cap.kvar, cap.kv, cap.phases, cap.delta) / net.sbase
        for a, c in cap.pairs():
            na, nc = nodes[a], nodes[c]
            for p, q, sgn in ((na, na, 1), (nc, nc, 1), (na, nc, -1), (nc, na, -1)):
                if p >= 0 and q >= 0 and pos[p] >= 0 and pos[q] >= 0:
                    rows.append([pos[p]]), cols.append([pos[q]])
                    vals.append([sgn * 1j * b * net.vbase[p] * net.vbase[q]])
    for sh in net.feeder.shunts:
        if len(set(sh.buses)) == 1:                   # one bus (or its neutral): a true shunt
            nd = np.array([index.get(f"{b}.{k}", GROUND) if k else GROUND
                           for b, ndl in zip(sh.buses, sh.nodes) for k in ndl])
            keep = (nd != GROUND)
            keep[keep] = pos[nd[keep]] >= 0
            y = sh.yprim[np.ix_(keep, keep)] * np.outer(net.vbase[nd[keep]], net.vbase[nd[keep]]) / net.sbase
            r, c = np.meshgrid(pos[nd[keep]], pos[nd[keep]], indexing="ij")
            rows.append(r.ravel()), cols.append(c.ravel()), vals.append(y.ravel())
    if not rows:
        return sp.csr_matrix((n, n), dtype=complex)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, n))


def _loads(net: Network, pos: np.ndarray) -> pd.DataFrame:
    """Load pairs on radial nodes, per unit; pairs on de-energized nodes (s = 0) are dropped here
    because the import report already lists them."""
    lp = net.loads
    on = lambda k: np.where(k >= 0, pos[np.maximum(k, 0)], GROUND)  # noqa: E731
    f, t = on(lp.node_from), on(lp.node_to)
    keep = ~(((lp.node_from >= 0) & (f < 0)) | ((lp.node_to >= 0) & (t < 0)))
    vb = lambda k: np.where(k >= 0, net.vbase[np.maximum(k, 0)], 0.0)  # noqa: E731
    df = pd.DataFrame({
        "element": lp.names, "node_from": f, "node_to": t,
        "vbase_from": vb(lp.node_from), "vbase_to": vb(lp.node_to),
        "s_pu": lp.s_nom / net.sbase, "v_nom": lp.v_nom, "model": lp.model,
        "exp_p": lp.exponents[:, 0], "exp_q": lp.exponents[:, 1], "scalable": lp.scalable,
        "vmin": lp.vmin, "vmax": lp.vmax, "vlow": lp.vlow})
    for k, name in enumerate(["zp", "ip", "pp", "zq", "iq", "pq"]):
        df[name] = lp.zipv[:, k]
    return df[keep].reset_index(drop=True)


def mark_approximations(radial: RadialNetwork) -> None:
    """Copy the branch-flow approximations into the feeder's import report (once)."""
    report = radial.network.feeder.report
    done = {(e, h) for e, s, h in report.rows if s == APPROXIMATED}
    for name, how in radial.approximations:
        if (name, "branch-flow: " + how) not in done:
            report.add(name, APPROXIMATED, "branch-flow: " + how)
