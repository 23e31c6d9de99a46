"""Component-wise decomposition of the LinDist3Flow standard-form LP (Ryu, Byeon and Kim, PSCC 2024).

The feeder is a graph of *nodes* (buses, the source EMF included) and *lines* (branches: lines,
switches, regulators, transformers, the source impedance). Every row of ``A x = b`` belongs to one
component: a node's power balances, its inverters' capability rows and its line-to-line voltage
rows (ungrounded islands) to the node, a flow's voltage drop to the line that carries it. One
subsystem per component, except that a leaf node (a bus with no children) is merged with the line
that feeds it. Subsystem ``s`` keeps a local copy ``x_s = B_s z`` of
every column its rows touch; bounds stay on the global ``z``, so each local problem is an equality-
constrained least-squares step with the closed form

    x_s = P_s y + k_s,    P_s = I - A_s^+ A_s,    k_s = A_s^+ b_s,

where ``A_s^+`` is the pseudo-inverse: the paper reduces ``A_s`` to full row rank first, which the
singular value decomposition does implicitly (singular values below a relative tolerance are dropped).

Subsystems of the same size are stacked into *groups*: one ``(G, n, n)`` array of projectors per size,
so an ADMM iteration is a handful of batched matrix products, never a Python loop over subsystems.
The copies are laid out group by group, subsystem by subsystem, so a group is a contiguous slice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

RANK_TOL = 1e-10          # singular values below this fraction of the largest are rank deficiency


@dataclass
class Group:
    """Subsystems with ``n`` local variables each, stacked."""
    n: int
    start: int                 # first copy of the group in the copy vector
    subsystems: np.ndarray     # (G,) subsystem ids
    P: np.ndarray              # (G, n, n) projectors onto null(A_s)
    k: np.ndarray              # (G, n) minimum-norm solutions of A_s x = b_s
    rank: np.ndarray           # (G,) rank of A_s

    @property
    def size(self) -> int:
        return len(self.subsystems)

    @property
    def stop(self) -> int:
        return self.start + self.size * self.n


@dataclass
class Decomposition:
    """The consensus form of ``lp``: which subsystem owns which rows, and the copies ``B z``."""
    lp: object                     # the StandardFormLP decomposed
    names: pd.Index                # one label per subsystem ("bus 675", "line 692675", "line ... + leaf 611")
    kinds: np.ndarray              # "node", "line" or "line+leaf"; "zone" with zone_buses > 1
    row_owner: np.ndarray          # (rows,) subsystem of every row of A
    copy_col: np.ndarray           # (copies,) global column of every local copy, group-major
    copy_owner: np.ndarray         # (copies,) subsystem of every copy
    n_copies: np.ndarray           # (columns,) copies per column (0: a column no row touches)
    groups: list[Group]
    graph: dict                    # nodes, lines, leaves, subsystems (the paper's Table II counts); root:
                                   # the subsystem of the source bus; zone_buses where zoned
    scale: np.ndarray | None = None  # (columns,) the consensus runs on z / scale (None: on z itself)

    @property
    def n_subsystems(self) -> int:
        return len(self.names)

    def subset(self, subsystems) -> Decomposition:
        """The same decomposition restricted to some subsystems (an MPI rank's share). ``n_copies``
        stays global: the global update divides by the copies on every rank."""
        keep = np.zeros(self.n_subsystems, bool)
        keep[np.asarray(subsystems, int)] = True
        mine = keep[self.copy_owner]
        new_start = np.cumsum(mine) - mine              # position of each kept copy
        groups = []
        for g in self.groups:
            sel = keep[g.subsystems]
            if sel.any():
                first = g.start + int(np.argmax(sel)) * g.n
                groups.append(Group(n=g.n, start=int(new_start[first]), subsystems=g.subsystems[sel],
                                    P=g.P[sel], k=g.k[sel], rank=g.rank[sel]))
        return Decomposition(lp=self.lp, names=self.names, kinds=self.kinds, row_owner=self.row_owner,
                             copy_col=self.copy_col[mine], copy_owner=self.copy_owner[mine],
                             n_copies=self.n_copies, groups=groups, graph=self.graph, scale=self.scale)

    def depth(self) -> int:
        """Hops from the source bus's subsystem to the farthest one, subsystems that share a column
        being neighbours: information moves one hop per ADMM iteration, so agreement on the source's
        power takes at least this many iterations."""
        S = incidence(self)
        return int(breadth_first_levels((S @ S.T).tocsr(), self.graph.get("root", 0)).max())

    def sizes(self) -> pd.DataFrame:
        """Local variables and rank per subsystem."""
        n = np.concatenate([np.full(g.size, g.n) for g in self.groups])
        rank = np.concatenate([g.rank for g in self.groups])
        sid = np.concatenate([g.subsystems for g in self.groups])
        return pd.DataFrame({"kind": self.kinds[sid], "n_local": n, "rank": rank},
                            index=self.names[sid]).sort_index()


@dataclass
class FeederTree:
    """The feeder as a tree of buses, and the component (bus or branch) that owns each row of the LP."""
    bus_names: pd.Index
    parent: np.ndarray         # (buses,) parent bus, -1 at the root
    child_bus: np.ndarray      # (branches,) the bus each branch feeds
    feeding: np.ndarray        # (buses,) the branch that feeds each bus, -1 at the root
    root: int                  # the source bus
    is_leaf: np.ndarray        # (buses,) buses with no children (the root excepted)
    row_component: np.ndarray  # (rows,) bus b -> b, branch l -> buses + l; a leaf bus takes its branch's id

    def component_bus(self, component: np.ndarray) -> np.ndarray:
        """The bus of a component: the bus itself, or the bus a branch feeds."""
        nb = len(self.bus_names)
        return np.where(component < nb, component, self.child_bus[np.maximum(component - nb, 0)])

    def graph(self, used: np.ndarray) -> dict:
        """The counts of the paper's Table II for subsystems numbered by ``used`` (sorted ids whose
        rows they own), and the subsystem that holds the source bus."""
        return {"nodes": len(self.bus_names), "lines": len(self.child_bus), "leaves": int(self.is_leaf.sum()),
                "subsystems": len(used), "root": int(np.searchsorted(used, self.root))}

    def depth(self) -> np.ndarray:
        """Hops from the root to every bus, by pointer jumping (log(depth) vectorized passes)."""
        anc, hops = self.parent.copy(), (self.parent >= 0).astype(int)
        while (anc >= 0).any():
            up = anc >= 0
            hops = hops + np.where(up, hops[np.where(up, anc, 0)], 0)
            anc = np.where(up, anc[np.where(up, anc, 0)], -1)
        return hops


def feeder_tree(problem, lp) -> FeederTree:
    """Buses, branches and the owner of every row of ``lp``: a bus owns its power balances, its
    inverters' capability rows and its line-to-line voltage rows; a branch owns its voltage drops."""
    r = problem.radial
    bus_of_node = r.nodes.str.rsplit(".", n=1).str[0]
    bus_code, bus_names = pd.factorize(bus_of_node)
    nb, nl = len(bus_names), len(r.branches)
    parent_bus = np.array([bus_code[br.parent[0]] for br in r.branches])
    child_bus = np.array([bus_code[br.child[0]] for br in r.branches])
    root = int(bus_code[r.root[0]])
    is_leaf = ~np.isin(np.arange(nb), parent_bus)
    is_leaf[root] = False
    feeding = np.full(nb, -1)
    feeding[child_bus] = np.arange(nl)
    parent = np.full(nb, -1)
    parent[child_bus] = parent_bus
    # component ids: buses 0..nb-1, lines nb..nb+nl-1; a leaf bus takes its feeding line's id
    comp_of_bus = np.where(is_leaf, nb + feeding, np.arange(nb))
    rows = np.empty(lp.A.shape[0], dtype=int)
    flow_node = np.setdiff1d(np.arange(r.n), r.root)
    rows[lp.rows["power balance P"]] = comp_of_bus[bus_code]
    rows[lp.rows["power balance Q"]] = comp_of_bus[bus_code]
    rows[lp.rows["voltage drop"]] = nb + r.in_branch[flow_node]
    k = lp.rows["inverter capability"]
    n_der = len(problem.ders)
    if n_der:
        per = (k.stop - k.start) // n_der
        rows[k] = np.repeat(comp_of_bus[bus_code[problem.ders["node"].to_numpy()]], per)
    ll = problem.voltage_limits()                               # a bus's line-to-line limits
    rows[lp.rows["line-to-line voltage"]] = comp_of_bus[bus_code[ll.node[ll.pair]]]
    return FeederTree(bus_names=bus_names, parent=parent, child_bus=child_bus, feeding=feeding, root=root,
                      is_leaf=is_leaf, row_component=rows)


def component_labels(problem, lp) -> tuple[np.ndarray, list[str], list[str], dict]:
    """Component of every row of ``lp`` (a bus or a branch), leaves merged into their lines.

    Returns ``(row_component, names, kinds, graph_counts)`` with components numbered 0..K-1."""
    tree = feeder_tree(problem, lp)
    branches = problem.radial.branches
    nb, nl = len(tree.bus_names), len(branches)
    used, rows = np.unique(tree.row_component, return_inverse=True)   # drop the absorbed leaf ids
    labels = np.concatenate([[f"bus {b}" for b in tree.bus_names],
                             [f"line {br.name}" for br in branches]]).astype(object)
    kinds = np.array(["node"] * nb + ["line"] * nl, dtype=object)
    for b in np.flatnonzero(tree.is_leaf):
        c = nb + tree.feeding[b]
        labels[c] = f"{labels[c]} + leaf {tree.bus_names[b]}"
        kinds[c] = "line+leaf"
    return rows, list(labels[used]), list(kinds[used]), tree.graph(used)


def bus_zones(tree: FeederTree, zone_buses: int) -> np.ndarray:
    """Cut the feeder into connected zones of at least ``zone_buses`` buses where the tree allows:
    going up from the deepest buses, a bus closes a zone (becomes its head) once it and the buses
    gathered below it number ``zone_buses``; the root closes the last one. Returns every bus's head."""
    depth = tree.depth()
    weight = np.ones(len(depth))
    head = np.zeros(len(depth), bool)
    for level in range(depth.max(), 0, -1):                    # vectorized within a level
        b = np.flatnonzero(depth == level)
        head[b] = weight[b] >= zone_buses
        open_ = b[~head[b]]
        np.add.at(weight, tree.parent[open_], weight[open_])
    head[tree.root] = True
    zone = np.arange(len(depth))
    for level in range(1, depth.max() + 1):                    # heads first, then downwards
        b = np.flatnonzero((depth == level) & ~head)
        zone[b] = zone[tree.parent[b]]
    return zone


def zone_labels(problem, lp, zone_buses: int) -> tuple[np.ndarray, list[str], list[str], dict]:
    """Like :func:`component_labels`, with the components merged into :func:`bus_zones`."""
    tree = feeder_tree(problem, lp)
    zone = bus_zones(tree, zone_buses)
    used, rows = np.unique(zone[tree.component_bus(tree.row_component)], return_inverse=True)
    size = np.bincount(zone, minlength=len(zone))[used]
    names = [f"zone {tree.bus_names[h]} ({n} bus{'es' if n > 1 else ''})" for h, n in zip(used, size)]
    return rows, names, ["zone"] * len(used), {**tree.graph(used), "zone_buses": int(zone_buses)}


def decompose(problem, lp=None, zone_buses: int = 1, der_scale: float = 1.0,
              rank_tol: float = RANK_TOL) -> Decomposition:
    """Decompose the LinDist3Flow standard form of ``problem`` (built if ``lp`` is None).

    ``zone_buses=1``: the paper's component-wise decomposition (one subsystem per bus and per line,
    leaves merged). ``zone_buses=k > 1``: one subsystem per connected zone of about ``k`` buses
    (:func:`bus_zones`): fewer, larger subsystems, so agreement crosses the feeder in fewer hops.

    ``der_scale=d < 1``: the consensus runs on the DER columns (``p_der``, ``q_der`` and the
    inverter polygon's ``slack``) divided by ``d``, so ADMM's penalty weighs them ``1/d**2`` times more
    than the network's columns. The only cost, the substation's power, reaches the DERs through the
    projections spread over the whole feeder; on IEEE 8500, with 230 DERs, that is what sets ADMM's
    pace, and ``d = 0.3`` cuts the iterations of zones of 70 buses by a third (chapter 7; component-wise,
    where depth is the bottleneck, it does not help). The LP and its solution are the
    same: :class:`~dopfkit.distributed.admm.ADMM` scales back."""
    if lp is None:
        from dopfkit.opf.lindist3flow import lindist3flow_lp
        lp = lindist3flow_lp(problem)
    if lp.Q is not None and sp.triu(lp.Q, 1).nnz:
        raise NotImplementedError("ADMM takes linear or diagonal quadratic objectives; this Q has "
                                  "off-diagonal entries")
    labels = component_labels(problem, lp) if zone_buses <= 1 else zone_labels(problem, lp, zone_buses)
    row_owner, names, kinds, graph = labels
    if der_scale == 1.0:
        return decompose_rows(lp, row_owner, names, kinds, graph, rank_tol)
    scale = der_column_scale(lp, der_scale)
    dec = decompose_rows(lp.scaled(scale), row_owner, names, kinds, graph, rank_tol)
    return replace(dec, lp=lp, scale=scale)


def der_column_scale(lp, der_scale: float) -> np.ndarray:
    """Per column: ``der_scale`` on the DER columns (``p_der``, ``q_der``, the polygon's ``slack``), 1
    elsewhere (see :func:`decompose`)."""
    if not 0 < der_scale <= 1:
        raise ValueError(f"der_scale must be in (0, 1], got {der_scale}")
    scale = np.ones(lp.A.shape[1])
    for block in ("p_der", "q_der", "slack"):
        scale[lp.columns[block]] = der_scale
    return scale


def decompose_rows(lp, row_owner, names, kinds, graph=None, rank_tol: float = RANK_TOL) -> Decomposition:
    """The consensus form of any standard-form LP, given the subsystem that owns each row."""
    A = lp.A.tocoo()
    ncol, K = A.shape[1], len(names)
    owner = row_owner[A.row]
    # the columns each subsystem touches, as unique (subsystem, column) pairs
    pair = np.unique(owner.astype(np.int64) * ncol + A.col)
    sub, col = pair // ncol, pair % ncol
    n_local = np.bincount(sub, minlength=K)
    if (n_local == 0).any():
        raise ValueError(f"subsystem {names[int(np.argmin(n_local))]!r} owns no variables")
    # group-major order: subsystems sorted by size (stable), copies in column order inside each
    order_sub = np.argsort(n_local, kind="stable")
    rank_of = np.empty(K, int)
    rank_of[order_sub] = np.arange(K)
    perm = np.lexsort((col, rank_of[sub]))
    sub, col = sub[perm], col[perm]
    start_of = np.zeros(K, int)
    start_of[order_sub] = np.concatenate([[0], np.cumsum(n_local[order_sub])[:-1]])
    local_col = np.empty(len(col), int)                      # in the order of ``pair``
    local_col[perm] = np.arange(len(col)) - start_of[sub]
    # column of every nonzero of A inside its subsystem's dense block
    nz_local_col = local_col[np.searchsorted(pair, owner.astype(np.int64) * ncol + A.col)]
    row_rank = _rank_within(row_owner)
    groups = []
    for n in np.unique(n_local):
        members = order_sub[n_local[order_sub] == n]
        groups.append(_group(n, members, start_of, A, owner, nz_local_col, row_owner, row_rank,
                             np.asarray(lp.b, float), rank_tol, names))
    return Decomposition(lp=lp, names=pd.Index(names), kinds=np.asarray(kinds, dtype=object),
                         row_owner=row_owner, copy_col=col, copy_owner=sub,
                         n_copies=np.bincount(col, minlength=ncol), groups=groups,
                         graph=graph or {"subsystems": K})


def _rank_within(owner: np.ndarray) -> np.ndarray:
    """Index of every row among the rows of its own subsystem."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(owner), int)
    rank[order] = np.arange(len(owner)) - first[owner[order]]
    return rank


def _group(n, members, start_of, A, owner, nz_local_col, row_owner, row_rank, b, rank_tol, names) -> Group:
    """Stack the members' dense ``A_s`` (zero-padded rows) and compute their projectors at once."""
    G = len(members)
    slot = np.full(owner.max() + 1 if len(owner) else 0, -1)
    slot[members] = np.arange(G)
    m = int(np.bincount(row_owner)[members].max())
    As = np.zeros((G, m, n))
    bs = np.zeros((G, m))
    nz = slot[owner] >= 0
    np.add.at(As, (slot[owner[nz]], row_rank[A.row[nz]], nz_local_col[nz]), A.data[nz])
    mine = slot[row_owner] >= 0
    bs[slot[row_owner[mine]], row_rank[mine]] = b[mine]
    U, S, Vt = np.linalg.svd(As, full_matrices=False)
    keep = S > rank_tol * np.maximum(S[:, :1], 1e-300)
    inv = np.where(keep, 1 / np.where(keep, S, 1), 0.0)
    Vr = Vt * keep[:, :, None]
    P = np.eye(n)[None] - np.einsum("gki,gkj->gij", Vr, Vr)
    k = np.einsum("gki,gk->gi", Vt, inv * np.einsum("gmk,gm->gk", U, bs))
    resid = np.abs(np.einsum("gmn,gn->gm", As, k) - bs).max(axis=1, initial=0)
    bad = resid > 1e-8 * (1 + np.abs(bs).max(axis=1, initial=0))
    if bad.any():
        raise ValueError(f"the equations of subsystem {names[members[np.argmax(bad)]]!r} are inconsistent "
                         f"(residual {resid[bad].max():.2e}): no local point satisfies A_s x = b_s")
    return Group(n=int(n), start=int(start_of[members[0]]), subsystems=members, P=P, k=k,
                 rank=keep.sum(axis=1))


def padded_groups(groups: list[Group], buckets: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Merge the size groups into at most ``buckets`` padded ones, ``(index, P, k)``: ``index`` (G, n)
    is the copy held in each local slot (-1: padding), ``P`` and ``k`` are zero on the padding. Fewer,
    larger batched products suit a GPU, where each product is a kernel launch; the padding costs
    arithmetic, so the sorted sizes are split into contiguous ranges that minimize the padded work
    sum G n^2 (a dynamic program over the few distinct sizes)."""
    groups = sorted(groups, key=lambda g: g.n)
    m = len(groups)
    size = np.array([g.n for g in groups], float)
    count = np.cumsum([0] + [g.size for g in groups])
    work = lambda i, j: (count[j + 1] - count[i]) * size[j] ** 2   # noqa: E731  (groups i..j padded to j)
    best = np.full((buckets + 1, m + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((buckets + 1, m + 1), int)
    for b in range(1, buckets + 1):
        for j in range(1, m + 1):
            options = [best[b - 1, i] + work(i, j - 1) for i in range(j)]
            cut[b, j] = int(np.argmin(options))
            best[b, j] = options[cut[b, j]]
    b, j, ranges = int(np.argmin(best[1:, m])) + 1, m, []
    while j > 0:
        ranges.append((cut[b, j], j))
        b, j = b - 1, cut[b, j]
    out = []
    for lo, hi in reversed(ranges):
        members, n = groups[lo:hi], groups[hi - 1].n
        G = sum(g.size for g in members)
        index, P, k = np.full((G, n), -1), np.zeros((G, n, n)), np.zeros((G, n))
        row = 0
        for g in members:
            rows = slice(row, row + g.size)
            index[rows, :g.n] = g.start + np.arange(g.size * g.n).reshape(g.size, g.n)
            P[rows, :g.n, :g.n], k[rows, :g.n] = g.P, g.k
            row += g.size
        out.append((index, P, k))
    return out


def incidence(dec: Decomposition) -> sp.csr_matrix:
    """(subsystems, columns) 0/1 matrix: which subsystem holds a copy of which column."""
    shape = (dec.n_subsystems, dec.lp.A.shape[1])
    return sp.csr_matrix((np.ones(len(dec.copy_col)), (dec.copy_owner, dec.copy_col)), shape=shape)


def breadth_first_levels(adj: sp.csr_matrix, root: int) -> np.ndarray:
    """Hops from ``root`` (-1: unreachable)."""
    level = np.full(adj.shape[0], -1)
    level[root] = 0
    front, d = np.array([root]), 0
    while len(front):
        d += 1
        nxt = np.unique(adj[front].indices)
        front = nxt[level[nxt] < 0]
        level[front] = d
    return level
