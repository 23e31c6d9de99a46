"""Backward-forward sweep (BFS): the classic radial-feeder power flow, for teaching.

Every series element is a two-port ``[I1; I2] = [[Y11, Y12], [Y21, Y22]] [V1; V2]`` (its primitive in
per unit). Walking the tree from the source:

* backward sweep (leaves to root): the current a bus draws is its loads' and shunts' current plus
  what its child elements draw; the element delivers it, ``I2 = -J_bus2``, and draws
  ``I1 = Y11 V1 + Y12 V2`` from its parent bus;
* forward sweep (root to leaves): ``V2 = Y22^{-1} (I2 - Y21 V1)``, starting from the source's
  internal voltage behind its impedance.

The tree is built on *nodes*, not buses, so banks of single-phase regulators (three elements
feeding one bus, one phase each) are radial too. Meshed networks, elements with more than two
terminals and floating secondaries are refused with a message that points to ``method="zbus"``.
Python loops over elements keep the method readable; the vectorized Z-bus solver is the one to use
at scale.
"""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import scipy.sparse as sp

from dopfkit.network.math_model import GROUND, Network, _node_indices, _scatter, _shunt_primitives
from dopfkit.powerflow.loads import load_currents
from dopfkit.powerflow.result import PowerFlowError, PowerFlowResult


class NotRadialError(ValueError):
    """The backward-forward sweep needs a radial network of two-terminal elements."""


def _two_ports(net: Network):
    """(name, upstream nodes, downstream nodes, per-unit 2x2 blocks) in tree order from the source."""
    br = net.branches
    elements = []
    for e, name in enumerate(br.names):
        sel = br.conductor_element == e
        nodes, term = br.conductor_node[sel], br.conductor_terminal[sel]
        if term.max() > 1:
            raise NotRadialError(f"{name} has {term.max() + 1} terminals; use method='zbus'")
        prim = br.Y[np.flatnonzero(sel)][:, np.flatnonzero(sel)].toarray()
        live = nodes != GROUND
        d = np.where(live, net.vbase[np.maximum(nodes, 0)], 0.0)
        prim = (d[:, None] * prim * d[None, :] / net.sbase)[np.ix_(live, live)]
        elements.append((name, nodes[live], term[live], prim))
    src = net.feeder.sources[0]
    reached = np.zeros(net.n, bool)
    reached[_node_indices({n: i for i, n in enumerate(net.nodes)}, src.buses[0], src.nodes[0])] = True
    by_node = defaultdict(list)
    for k, (_, nodes, _, _) in enumerate(elements):
        for n in nodes:
            by_node[n].append(k)
    order, placed, queue = [], np.zeros(len(elements), bool), deque(np.flatnonzero(reached))
    while queue:
        for k in by_node[queue.popleft()]:
            name, nodes, term, prim = elements[k]
            if placed[k] or np.abs(prim).max() < 1e-9:          # done, or an open switch
                continue
            for up in (0, 1):
                a, b = nodes[term == up], nodes[term != up]
                if reached[a].all() and not reached[b].any():
                    ia, ib = np.flatnonzero(term == up), np.flatnonzero(term != up)
                    order.append((name, a, b, prim[np.ix_(ia, ia)], prim[np.ix_(ia, ib)],
                                  prim[np.ix_(ib, ia)], prim[np.ix_(ib, ib)]))
                    placed[k], reached[b] = True, True
                    queue.extend(b)
                    break
                if reached[b].any() and reached[a].any():
                    raise NotRadialError(f"{name} joins nodes that are already fed (a loop, or a "
                                         "bank such as open delta sharing a node); use method='zbus'")
    return order


def solve_bfs(net: Network, load_scale=1.0, tol: float = 1e-9, max_iter: int = 300,
              raise_on_fail: bool = True) -> PowerFlowResult:
    """Backward-forward sweep power flow of a radial network (single snapshot).

    ``tol`` is a decade looser than the Z-bus solver's: the sweep has no test for a stalled iteration,
    and where the network holds a near-zero impedance (IEEE 13's closed switch, 1e-7 ohm) its steps
    wander between 4e-10 and 1e-9 pu once converged, meeting 1e-10 only by chance."""
    if np.ndim(load_scale) > 0:
        raise ValueError("method='bfs' solves one snapshot; use method='zbus' for scenario batches")
    order = _two_ports(net)
    s = np.where(net.loads.scalable, net.loads.s_nom * load_scale, net.loads.s_nom)
    y_shunt = _bus_shunts(net)
    src_nodes, y_src = _source(net)
    e_src = np.linalg.solve(y_src, net.i_source[src_nodes])       # internal EMF, per unit
    v, i_down = np.zeros(net.n, complex), {}
    i_src = np.zeros(len(src_nodes), complex)                      # current drawn from the source
    history = []
    for _ in range(max_iter):
        v_old = v.copy()
        v[src_nodes] = e_src - np.linalg.solve(y_src, i_src)      # forward sweep
        for name, a, b, _, _, y21, y22 in order:
            v[b] = np.linalg.solve(y22, i_down.get(name, 0) - y21 @ v[a])
        j = _demand(net, v, s, y_shunt)                            # backward sweep
        for name, a, b, y11, y12, _, _ in reversed(order):
            i_down[name] = -j[b]
            j[a] += y11 @ v[a] + y12 @ v[b]
        i_src = j[src_nodes]
        history.append(float(np.abs(v - v_old).max()))
        if history[-1] < tol:
            break
    converged = history[-1] < tol
    if not converged and raise_on_fail:
        raise PowerFlowError(net.name, history, tol)
    return PowerFlowResult(net, v, len(history), history, converged, "bfs", load_scale)


def _demand(net: Network, v: np.ndarray, s: np.ndarray, y_shunt: sp.csr_matrix) -> np.ndarray:
    """Per-unit current each node delivers to its loads and shunt capacitors."""
    pairs = net.loads
    u = pairs.M @ v
    return pairs.M.T @ load_currents(u, s, pairs) / net.sbase + y_shunt @ v


def _bus_shunts(net: Network) -> sp.csr_matrix:
    index = {n: i for i, n in enumerate(net.nodes)}
    shunts = [(nd, p) for name, nd, p in _shunt_primitives(net.feeder, index)
              if not name.startswith("vsource")]
    D = sp.diags(net.vbase)
    return (D @ _scatter(net.n, shunts) @ D / net.sbase).tocsr() if shunts \
        else sp.csr_matrix((net.n, net.n))


def _source(net: Network):
    """Source nodes and the per-unit admittance of the source's Thevenin impedance."""
    src = net.feeder.sources[0]
    nodes = _node_indices({n: i for i, n in enumerate(net.nodes)}, src.buses[0], src.nodes[0])
    d = net.vbase[nodes]
    return nodes, d[:, None] * np.linalg.inv(src.z) * d[None, :] / net.sbase
