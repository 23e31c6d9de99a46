"""LinDist3Flow: the linear unbalanced branch-flow model, as sparse blocks.

Variables: squared voltage magnitude ``v`` on every node, and the complex power ``s = P + jQ`` each
branch delivers into each child node (one flow per non-root node: in a tree every node has exactly
one feeding branch phase). With the voltages assumed to keep their no-load angles ``alpha``
(:mod:`dopfkit.network.radial`), and losses neglected, every physical law becomes linear:

* voltage drop along a branch, ``V_j = N V_i - Z I_j``::

      v_j = W v_i - 2 Re[(Gamma o conj Z) s_j],     Gamma = alpha_j alpha_j^H,
      W[p, k] = Re(conj(x_p) N[p, k] alpha_k),      x = N alpha_i

  (``W = I`` on a line; a transformer's ``W`` carries its turns ratio and, for delta-wye, the
  mixing of two primary phases into one secondary phase);
* power a branch draws from its parent's phases, ``T s_j`` with ``T[k, p] = alpha_k N[p, k] / x_p``
  (``T = I`` on a line; columns of ``T`` sum to one, so no power is created);
* loads: OpenDSS's voltage law (:mod:`dopfkit.opf.loadlaws`) linearized in the squared pair voltage
  around 1 pu of the buses (its rating, unless the load is rated for another voltage);
  a delta pair's power is shared between its two nodes by ``V_a / (V_a - V_b)`` at the no-load
  angles, as in Byeon, Ryu and Kim (arXiv 2211.07942);
* shunts (line charging, capacitors) draw ``diag(V conj(Y V))``, linear in ``v`` at those angles.

Balance at every node: ``s_in = T s_children + H v + s_const - s_der``.

:meth:`LinDist3FlowBlocks.relinearized` moves the linearization from no load to an operating point of
the model's own (losses held constant, angles moved): re-solving from it is a sequential LP.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dopfkit.network.radial import RadialNetwork
from dopfkit.opf.loadlaws import linearized_loads, pair_regimes
from dopfkit.opf.problem import der_injection_map


@dataclass
class LinDist3FlowBlocks:
    """The model's sparse matrices. Flows are indexed by ``flow_node`` (every non-root node)."""
    radial: RadialNetwork
    flow_node: np.ndarray       # node fed by each flow
    W: sp.csr_matrix            # (flows x nodes) real: v_child = W v + drop
    C: sp.csr_matrix            # (flows x flows) complex: drop = -2 Re(C s)
    T: sp.csr_matrix            # (nodes x flows) complex: power drawn from parents
    H: sp.csr_matrix            # (nodes x nodes) complex: load and shunt power linear in v
    s_const: np.ndarray         # (nodes,) complex: load power independent of v
    # load scaling is kept apart so a time series or scenario only rescales two arrays
    H_scalable: sp.csr_matrix
    s_const_scalable: np.ndarray
    Z: sp.csr_matrix            # (flows x flows) complex: series impedance of the branch phases
    # branch losses (series, and transformers' core loss), constant: held at an operating point's by
    # relinearized; None: the paper's lossless model. Power the parents draw on top of T s, and the
    # drop's second-order term
    s_loss: np.ndarray | None = None      # (nodes,) complex
    drop_loss: np.ndarray | None = None   # (flows,) real
    # each load pair's regime of OpenDSS's law (dopfkit.opf.loadlaws), fixed where the model is first
    # built (1 pu) and kept by relinearized: a regime change is a kink, which a sequential LP would
    # chase back and forth (IEEE 8500's OPF: 437, 22, 405 load phases above vmaxpu in passes 1-3)
    load_regimes: np.ndarray | None = None

    def load_terms(self, load_scale=1.0) -> tuple[sp.csr_matrix, np.ndarray]:
        """(H, s_const) with scalable loads multiplied by ``load_scale`` (a scalar)."""
        return self.H + (load_scale - 1) * self.H_scalable, \
            self.s_const + (load_scale - 1) * self.s_const_scalable

    def loss_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(s_loss per node, drop_loss per flow), zeros for the lossless model."""
        return (np.zeros(self.n_nodes, complex) if self.s_loss is None else self.s_loss,
                np.zeros(self.n_flows) if self.drop_loss is None else self.drop_loss)

    def relinearized(self, v: np.ndarray, s: np.ndarray, angles: bool = True) -> LinDist3FlowBlocks:
        """The model linearized at an operating point of its own (squared voltages ``v``, flows
        ``s``) instead of at no load: the losses it drops are held at that point's values, the loads'
        laws are tangent at that point's voltages (in the regimes they had at 1 pu), and with
        ``angles`` the reference angles move to that point's, so delta shares, drops and
        line-to-line voltages see the phase imbalance.

        With ``I = conj(s / V)`` and ``V = sqrt(v) alpha`` on each flow's node, a forward sweep
        (``V_j = N V_i - Z I_j``) gives the point's phasors. Each branch then draws what it draws
        there from its parent, on top of the lossless ``T s``: ``(Z I) conj(I)`` on a line, and from
        the two-port's own admittance on a transformer (its series losses and its core loss and
        magnetizing power, which ``T``, power-conserving, leaves out). The drop keeps its
        second-order term: ``|V_j|^2 = |N V_i|^2 - 2 Re(conj(V_j) Z I) - |Z I|^2``."""
        r, fn = self.radial, self.flow_node
        current = np.zeros(r.n, complex)
        current[fn] = np.conj(s / (np.sqrt(np.maximum(v[fn], 1e-6)) * r.alpha[fn]))
        V = r.forward_voltages(current)
        blocks = lindist3flow_blocks(r.with_angles(V / np.abs(V)), v, self.load_regimes) if angles \
            else self.loads_at(v, self.load_regimes)
        zi = blocks.Z @ current[fn]
        # what the branches lose at that point: drawn from the parents minus T (received), both
        # from the sweep's own phasors (the linear model's voltages would mix in its error)
        received = V[fn] * np.conj(current[fn])
        lost = r.sending_power(V, current) - blocks.T @ received
        return replace(blocks, s_loss=lost, drop_loss=np.abs(zi) ** 2)

    def loads_at(self, v: np.ndarray, regimes: np.ndarray | None = None) -> LinDist3FlowBlocks:
        """The same model with every load's law tangent at squared node voltages ``v``, in ``regimes``
        (default: the regime each load is in there)."""
        H, s_const, H_s, s_s, regimes = _load_terms(self.radial, v, regimes)
        return replace(self, H=(H + _shunt_term(self.radial)).tocsr(), s_const=s_const, H_scalable=H_s,
                       s_const_scalable=s_s, load_regimes=regimes)

    @property
    def n_nodes(self) -> int:
        return self.radial.n

    @property
    def n_flows(self) -> int:
        return len(self.flow_node)


def lindist3flow_blocks(radial: RadialNetwork, v_loads: np.ndarray | None = None,
                        load_regimes: np.ndarray | None = None) -> LinDist3FlowBlocks:
    """The model's blocks at the radial network's reference angles, the loads linearized at squared
    node voltages ``v_loads`` (default 1 pu) in ``load_regimes`` (default: their regimes there)."""
    n, alpha = radial.n, radial.alpha
    flow_node = np.setdiff1d(np.arange(n), radial.root)
    flow_of = np.full(n, -1)
    flow_of[flow_node] = np.arange(len(flow_node))
    W, C, T, Zf = BlockTriplets(), BlockTriplets(), BlockTriplets(), BlockTriplets()
    for br in radial.branches:
        ai, aj = alpha[br.parent], alpha[br.child]
        x = br.N @ ai
        fj = flow_of[br.child]
        W.add(fj, br.parent, (np.conj(x)[:, None] * br.N * ai[None, :]).real)
        C.add(fj, fj, np.outer(aj, np.conj(aj)) * np.conj(br.Z))
        Zf.add(fj, fj, br.Z)
        T.add(br.parent, fj, (ai[:, None] * br.N.T) / x[None, :])
    nf = len(flow_node)
    H_load, s_load, H_scal, s_scal, regimes = _load_terms(radial, v_loads, load_regimes)
    return LinDist3FlowBlocks(
        radial=radial, flow_node=flow_node,
        W=W.matrix((nf, n), real=True), C=C.matrix((nf, nf)), T=T.matrix((n, nf)),
        H=(H_load + _shunt_term(radial)).tocsr(), s_const=s_load,
        H_scalable=H_scal, s_const_scalable=s_scal, Z=Zf.matrix((nf, nf)), load_regimes=regimes)


class BlockTriplets:
    """Collect dense blocks at (rows, cols) and assemble one sparse matrix at the end."""

    def __init__(self):
        self.r, self.c, self.v = [], [], []

    def add(self, rows, cols, block):
        r, c = np.meshgrid(rows, cols, indexing="ij")
        self.r.append(r.ravel()), self.c.append(c.ravel()), self.v.append(np.asarray(block).ravel())

    def matrix(self, shape, real=False) -> sp.csr_matrix:
        v = np.concatenate(self.v) if self.v else np.zeros(0)
        r, c = (np.concatenate(ix) if ix else np.zeros(0, int) for ix in (self.r, self.c))
        m = sp.csr_matrix((v.real if real else v.astype(complex), (r, c)), shape=shape)
        m.eliminate_zeros()
        return m


def _shunt_term(radial: RadialNetwork) -> sp.csr_matrix:
    """s_k = sum_m conj(Y_km) V_k conj(V_m) ~ conj(Y_km) Gamma_km (v_k + v_m) / 2."""
    Y = radial.shunt.tocoo()
    a = radial.alpha
    g = np.conj(Y.data) * a[Y.row] * np.conj(a[Y.col]) / 2
    n = radial.n
    return sp.csr_matrix((np.concatenate([g, g]), (np.concatenate([Y.row, Y.row]),
                                                   np.concatenate([Y.row, Y.col]))), shape=(n, n))


def _pair_geometry(radial: RadialNetwork):
    """Per load pair: nodes ``f``, ``t`` (-1: ground), the phasors its two ends contribute to its
    voltage at 1 pu and the reference angles, ``e_f + e_t`` (volts), and ``w_f, w_t`` with squared
    pair voltage / v_nom^2 ~ w_f v_f + w_t v_t (exact at 1 pu, and for wye pairs)."""
    ld, a = radial.loads, radial.alpha
    f, t = ld["node_from"].to_numpy(), ld["node_to"].to_numpy()
    e_f = ld["vbase_from"].to_numpy() * a[f]
    e_t = np.where(t >= 0, -ld["vbase_to"].to_numpy() * a[np.maximum(t, 0)], 0)
    x0, vn2 = e_f + e_t, ld["v_nom"].to_numpy() ** 2
    return f, t, e_f, e_t, (np.conj(x0) * e_f).real / vn2, (np.conj(x0) * e_t).real / vn2


def pair_voltages_squared(radial: RadialNetwork, v: np.ndarray | None = None) -> np.ndarray:
    """Each load pair's squared voltage (per unit of its rating) where the nodes' squared magnitudes
    are ``v`` (default 1 pu), as the linear model sees it."""
    f, t, _, _, w_f, w_t = _pair_geometry(radial)
    if v is None:
        return w_f + w_t
    return w_f * v[f] + w_t * np.where(t >= 0, v[np.maximum(t, 0)], 0.0)


def _load_terms(radial: RadialNetwork, v: np.ndarray | None = None, regimes: np.ndarray | None = None):
    """Linearized load power at the nodes: (H, s_const) for all loads and for scalable ones, each
    pair's law tangent at its squared voltage where the nodes' squared magnitudes are ``v`` (default
    1 pu), in ``regimes`` (default: the regime it is in there), and the regimes."""
    ld, n = radial.loads, radial.n
    f, t, e_f, e_t, w_f, w_t = _pair_geometry(radial)
    on_t = t >= 0
    x = pair_voltages_squared(radial, v)
    regimes = pair_regimes(ld, np.sqrt(x)) if regimes is None else regimes
    s0, s1 = linearized_loads(ld, x, regimes)                # power ~ s0 + s1 x
    share_f, share_t = e_f / (e_f + e_t), e_t / (e_f + e_t)   # delta: V_a / (V_a - V_b)

    def assemble(mask):
        both = mask & on_t
        rows = np.concatenate([f[mask], f[both], t[both], t[both]])
        cols = np.concatenate([f[mask], t[both], f[both], t[both]])
        vals = np.concatenate([(share_f * s1 * w_f)[mask], (share_f * s1 * w_t)[both],
                               (share_t * s1 * w_f)[both], (share_t * s1 * w_t)[both]])
        H = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
        const = np.zeros(n, complex)
        np.add.at(const, f[mask], (share_f * s0)[mask])
        np.add.at(const, t[both], (share_t * s0)[both])
        return H, const

    H, const = assemble(np.ones(len(ld), bool))
    H_s, const_s = assemble(ld["scalable"].to_numpy())
    return H, const, H_s, const_s, regimes


@dataclass
class LinearPowerFlow:
    v: np.ndarray        # squared voltage magnitude per radial node
    s: np.ndarray        # complex flow into each non-root node
    s_root: np.ndarray   # power the sources deliver, per root node

    def vmag(self, radial: RadialNetwork):
        """|V| (pu) indexed like the network's nodes (energized ones)."""
        keep = radial.net_index >= 0
        return pd.Series(np.sqrt(self.v[keep]), index=radial.network.nodes[radial.net_index[keep]],
                         name="vmag_lindist3flow")


def lindist3flow_powerflow(blocks: LinDist3FlowBlocks, load_scale=1.0,
                           s_der: np.ndarray | None = None) -> LinearPowerFlow:
    """Solve the model's equations with the source voltage fixed and no control: a square linear
    system in (v on non-root nodes, P, Q)."""
    r = blocks.radial
    H, s_const = blocks.load_terms(load_scale)
    if s_der is not None:
        s_const = s_const - s_der
    n, nf, fn = r.n, blocks.n_flows, blocks.flow_node
    E = sp.csr_matrix((np.ones(nf), (fn, np.arange(nf))), shape=(n, nf))   # flow -> its node
    Tr, Ti, Hr, Hi = blocks.T.real, blocks.T.imag, H.real, H.imag
    Cr, Ci = blocks.C.real, blocks.C.imag
    # unknowns [v (all nodes), P, Q]; root voltages moved to the right-hand side afterwards
    A = sp.bmat([[-Hr, E - Tr, Ti], [-Hi, -Ti, E - Tr],
                 [sp.csr_matrix(E.T) - blocks.W, 2 * Cr, -2 * Ci]], format="csr")
    s_loss, drop_loss = blocks.loss_terms()
    s_const = s_const + s_loss
    b = np.concatenate([s_const.real, s_const.imag, -drop_loss])
    rows = np.concatenate([fn, n + fn, 2 * n + np.arange(nf)])
    cols_v = fn
    cols = np.concatenate([cols_v, n + np.arange(2 * nf)])
    b = b - A[:, r.root] @ r.v_root
    x = spla.spsolve(A[rows][:, cols].tocsc(), b[rows])
    v = np.empty(n)
    v[r.root], v[fn] = r.v_root, x[:len(fn)]
    P, Q = x[len(fn):len(fn) + nf], x[len(fn) + nf:]
    s = P + 1j * Q
    s_root = (blocks.T @ s + H @ v + s_const)[r.root]            # s_const includes the losses
    return LinearPowerFlow(v=v, s=s, s_root=s_root)


# ---------------------------------------------------------------------------------------------
# The OPF: standard form (c, A, b, lower, upper), solved with HiGHS or through CVXPY
# ---------------------------------------------------------------------------------------------

DROP_BELOW = 1e-9     # HiGHS ignores matrix values this small; drop them ourselves so models agree
IPM_ABOVE = 5000      # columns beyond which HiGHS's IPM is used instead of its dual simplex
POLYGON_SIDES = 16    # inverter circle |p + jq| <= s as an inscribed 16-gon: at most 2% conservative


def capability_polygon(sides: int = POLYGON_SIDES, generator: bool = False):
    """Faces ``cos(th_k) p + sin(th_k) q <= S * shrink`` of the regular ``sides``-gon inscribed in the
    inverter's circle, ``th_k = (2k + 1) pi / sides``. A multiple of 4 puts vertices at (S, 0) and
    (0, +-S): full active power at unity power factor, full reactive power at p = 0. ``generator``:
    p >= 0 and |q| <= S are bounds, so only the faces with ``cos > 0`` can bind (half the rows).
    Returns ``(cos, sin, shrink)``."""
    if sides < 4 or sides % 4:
        raise ValueError(f"polygon_sides must be a multiple of 4 (>= 4), got {sides}")
    th = (2 * np.arange(sides) + 1) * np.pi / sides
    cos, sin = np.cos(th), np.sin(th)
    if generator:
        cos, sin = cos[cos > 0], sin[cos > 0]
    return cos, sin, np.cos(np.pi / sides)


def lindist3flow_lp(problem, blocks: LinDist3FlowBlocks | None = None):
    """The LinDist3Flow OPF of ``problem`` as a :class:`StandardFormLP`.

    Columns: ``v`` (all nodes), ``P``, ``Q`` (one per flow), ``p_src``, ``q_src`` (per root node),
    ``p_der``, ``q_der``, ``slack`` (inverter polygon), ``v_ll`` (limited line-to-line voltages of
    ungrounded islands, :class:`~dopfkit.opf.problem.VoltageLimits`). Rows: ``power balance P``,
    ``power balance Q``, ``voltage drop``, ``inverter capability``, ``line-to-line voltage``. Root
    voltages are fixed through their bounds, and the voltage limits are bounds (on ``v`` and
    ``v_ll``), so the only inequalities are the polygon's.
    """
    from dopfkit.opf.standard_form import StandardFormLP
    b_ = blocks or lindist3flow_blocks(problem.radial)
    r, ders = b_.radial, problem.ders
    cos, sin, shrink = capability_polygon(generator=True)
    n, nf, nr, nd, K = r.n, b_.n_flows, len(r.root), len(ders), len(cos)
    H, s_const = b_.load_terms(problem.load_scale)
    s_loss, drop_loss = b_.loss_terms()
    s_const = s_const + s_loss
    fn = b_.flow_node
    E = sp.csr_matrix((np.ones(nf), (fn, np.arange(nf))), shape=(n, nf))
    R = sp.csr_matrix((np.ones(nr), (r.root, np.arange(nr))), shape=(n, nr))
    D = der_injection_map(r, ders)                      # complex: a delta DER's p and q mix
    Tr, Ti, Cr, Ci = b_.T.real, b_.T.imag, b_.C.real, b_.C.imag
    poly_p = sp.kron(sp.eye(nd), cos[:, None])
    poly_q = sp.kron(sp.eye(nd), sin[:, None])
    limits = problem.voltage_limits()
    ll = limits.pair
    L, nl = line_to_line_map(r, limits.node[ll], limits.node_to[ll]), int(ll.sum())
    Z = lambda rows, cols: sp.csr_matrix((rows, cols))  # noqa: E731
    A = sp.bmat([
        [-H.real, E - Tr, Ti, R, Z(n, nr), D.real, -D.imag, Z(n, nd * K), Z(n, nl)],
        [-H.imag, -Ti, E - Tr, Z(n, nr), R, D.imag, D.real, Z(n, nd * K), Z(n, nl)],
        [E.T - b_.W, 2 * Cr, -2 * Ci, Z(nf, nr), Z(nf, nr), Z(nf, nd), Z(nf, nd), Z(nf, nd * K), Z(nf, nl)],
        [Z(nd * K, n), Z(nd * K, nf), Z(nd * K, nf), Z(nd * K, nr), Z(nd * K, nr), poly_p, poly_q,
         sp.eye(nd * K), Z(nd * K, nl)],
        [L, Z(nl, nf), Z(nl, nf), Z(nl, nr), Z(nl, nr), Z(nl, nd), Z(nl, nd), Z(nl, nd * K), -sp.eye(nl)]],
        format="csr")
    s_rated = ders["s_rated"].to_numpy()
    b = np.concatenate([s_const.real, s_const.imag, -drop_loss,
                        np.repeat(s_rated * shrink, K), np.zeros(nl)])
    sizes = {"v": n, "P": nf, "Q": nf, "p_src": nr, "q_src": nr, "p_der": nd, "q_der": nd, "slack": nd * K,
             "v_ll": nl}
    columns = _blocks(sizes)
    rows = _blocks({"power balance P": n, "power balance Q": n, "voltage drop": nf,
                    "inverter capability": nd * K, "line-to-line voltage": nl})
    lower, upper = np.full(A.shape[1], -np.inf), np.full(A.shape[1], np.inf)
    lower[columns["v"]], upper[columns["v"]] = limits.node_bounds(r)
    lower[columns["v_ll"]], upper[columns["v_ll"]] = limits.lo[ll], limits.hi[ll]
    lower[columns["p_der"]], upper[columns["p_der"]] = 0.0, ders["p_avail"].to_numpy()
    lower[columns["q_der"]], upper[columns["q_der"]] = -s_rated, s_rated
    lower[columns["slack"]] = 0.0
    A.data[np.abs(A.data) < DROP_BELOW] = 0.0          # switches' 1e-10 impedances: below solver noise
    A.eliminate_zeros()
    c, Q, offset = _objective(problem, b_, columns, A.shape[1])
    return StandardFormLP(c=c, A=A, b=b, lower=lower, upper=upper, columns=columns, rows=rows,
                          Q=Q, offset=offset, names={"v": np.asarray(r.nodes),
                                                     "P": np.asarray(r.nodes[fn]),
                                                     "v_ll": limits.names[ll]})


def line_to_line_map(radial: RadialNetwork, f: np.ndarray, t: np.ndarray) -> sp.csr_matrix:
    """(pairs x nodes) real: ``|V_f - V_t|^2 / 3 ~ (w_f v_f + w_t v_t) / 3`` with the voltages at
    their no-load angles, linearized in the squared magnitudes as the pair voltage of a delta load
    is (exact at the no-load point)."""
    a = radial.alpha
    x0 = a[f] - a[t]
    w_f, w_t = (np.conj(x0) * a[f]).real / 3, -(np.conj(x0) * a[t]).real / 3
    k = np.arange(len(f))
    return sp.csr_matrix((np.r_[w_f, w_t], (np.r_[k, k], np.r_[f, t])), shape=(len(f), radial.n))


def _blocks(sizes: dict[str, int]) -> dict[str, slice]:
    edges = np.cumsum([0] + list(sizes.values()))
    return {k: slice(int(a), int(b)) for k, a, b in zip(sizes, edges[:-1], edges[1:])}


def _objective(problem, blocks: LinDist3FlowBlocks, columns, m):
    """(c, Q, offset). Losses and voltage deviation are quadratic (Clarabel solves the QP):
    LinDist3Flow has no losses in its equations, so their usual estimate sum r (P^2 + Q^2) is used."""
    c, q_diag, offset = np.zeros(m), np.zeros(m), 0.0
    ders, obj = problem.ders, problem.objective
    if obj in ("substation_power", "generation_cost"):
        c[columns["p_src"]] = 1.0
    if obj == "generation_cost":
        c[columns["p_der"]] = ders["cost"].to_numpy()
    if obj == "curtailment":
        c[columns["p_der"]] = -1.0
        offset = float(ders["p_avail"].sum())
    if obj == "losses":
        r_flow = _flow_resistance(blocks)
        r_flow[r_flow < 1e-6 * r_flow.max()] = 0.0     # switches: keeps HiGHS's QP well scaled
        q_diag[columns["P"]] = q_diag[columns["Q"]] = 2 * r_flow
    if obj == "voltage_deviation":
        free = np.setdiff1d(np.arange(blocks.n_nodes), blocks.radial.root)
        idx = columns["v"].start + free
        q_diag[idx], c[idx], offset = 2.0, -2.0, float(len(free))
    Q = sp.diags(q_diag).tocsr() if q_diag.any() else None
    return c, Q, offset


def _flow_resistance(blocks: LinDist3FlowBlocks) -> np.ndarray:
    """Self resistance (pu) of the branch phase carrying each flow."""
    r = np.zeros(blocks.n_flows)
    pos = np.full(blocks.n_nodes, -1)
    pos[blocks.flow_node] = np.arange(blocks.n_flows)
    for br in blocks.radial.branches:
        r[pos[br.child]] = np.real(np.diag(br.Z))
    return r


def solve_lindist3flow(problem, backend: str = "highs", solver: str | None = None, relinearize: int = 0,
                       angles: bool = True):
    """Solve the LinDist3Flow OPF: ``backend="highs"`` passes the standard form to highspy in one
    call (Clarabel's direct API for the quadratic objectives); ``"cvxpy"`` builds the same model in
    CVXPY with named constraint families.

    ``relinearize=k`` re-solves ``k`` more times, each time with the model linearized at the previous
    solution (its branch losses and, with ``angles``, its phase angles;
    :meth:`LinDist3FlowBlocks.relinearized`): a sequential LP. ``k = 0`` is the paper's model,
    lossless and at the no-load angles."""
    import time

    from dopfkit.opf.problem import FormulationSolution
    build = solve_t = 0.0
    blocks = lp = x = None
    for _ in range(relinearize + 1):
        t0 = time.perf_counter()
        if lp is None:
            blocks = lindist3flow_blocks(problem.radial)
        else:
            s = lp.block(x, "P") + 1j * lp.block(x, "Q")
            blocks = blocks.relinearized(lp.block(x, "v"), s, angles)
        lp = lindist3flow_lp(problem, blocks)
        build += time.perf_counter() - t0
        x, status, name, iters, t_solve, t_model = _solve_standard_form(lp, backend, solver)
        solve_t, build = solve_t + t_solve, build + t_model
        if status.lower() != "optimal":
            _raise_infeasible(problem, lp, status)
    v = lp.block(x, "v")
    root = problem.radial.root
    return FormulationSolution(
        formulation="lindist3flow", status="optimal", objective=lp.objective(x), v=v,
        p_der=lp.block(x, "p_der"), q_der=lp.block(x, "q_der"),
        s_root=lp.block(x, "p_src") + 1j * lp.block(x, "q_src"), build_time=build,
        solve_time=solve_t, solver=name, iterations=iters,
        extra={"lp_shape": lp.shape, "violation": lp.violation(x), "v_root_check": v[root],
               "relinearize": relinearize, "V": np.sqrt(np.maximum(v, 0)) * blocks.radial.alpha},
        flows=_at_nodes(blocks, lp.block(x, "P") + 1j * lp.block(x, "Q")))


def _at_nodes(blocks: LinDist3FlowBlocks, s: np.ndarray) -> np.ndarray:
    """Flow-ordered values in radial-node numbering (0 at the roots)."""
    out = np.zeros(blocks.n_nodes, complex)
    out[blocks.flow_node] = s
    return out


def _solve_standard_form(lp, backend: str, solver: str | None):
    """(x, status, solver name, iterations, solve seconds, modelling-layer build seconds)."""
    if backend == "highs":
        from dopfkit.opf.standard_form import solve_clarabel, solve_highs
        # large LPs: HiGHS's interior point (with crossover) beats its simplex by ~2x on IEEE 8500
        opts = {"solver": "ipm"} if lp.A.shape[1] > IPM_ABOVE else {}
        sol = solve_highs(lp, **opts) if lp.Q is None else solve_clarabel(lp)    # QPs: see solve_clarabel
        return sol.x, sol.status, "highs" if lp.Q is None else "clarabel", sol.iterations, \
            sol.solve_time, 0.0
    if backend == "cvxpy":
        x, status, solve_t, name, t_build = _solve_cvxpy(lp, solver)
        return x, status, name, None, solve_t, t_build
    raise ValueError(f"backend must be 'highs' or 'cvxpy', not {backend!r}")


def _solve_cvxpy(lp, solver: str | None):
    """The same model through CVXPY: one variable per column block, one constraint per row block."""
    import time

    import cvxpy as cp

    from dopfkit import solvers
    t0 = time.perf_counter()
    x = {k: cp.Variable(s.stop - s.start, name=k) for k, s in lp.columns.items()}
    stacked = cp.hstack(list(x.values()))
    cons = {name: lp.A[rows] @ stacked == lp.b[rows] for name, rows in lp.rows.items()}
    lo, hi = lp.lower, lp.upper
    fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)
    cons["bounds lower"] = stacked[np.flatnonzero(fin_lo)] >= lo[fin_lo]
    cons["bounds upper"] = stacked[np.flatnonzero(fin_hi)] <= hi[fin_hi]
    obj = lp.c @ stacked + lp.offset
    if lp.Q is not None:
        obj = obj + 0.5 * cp.sum(cp.multiply(lp.Q.diagonal(), cp.square(stacked)))
    prob = cp.Problem(cp.Minimize(obj), list(cons.values()))
    build = time.perf_counter() - t0
    name = solver or ("HIGHS" if lp.Q is None else "CLARABEL")
    t1 = time.perf_counter()
    prob.solve(solver=solvers.cvxpy_solver(name.lower()))
    solve_t = time.perf_counter() - t1
    value = stacked.value if stacked.value is not None else np.full(lp.A.shape[1], np.nan)
    return np.asarray(value), prob.status, solve_t, f"cvxpy-{name.lower()}", build


def _raise_infeasible(problem, lp, status: str):
    """Re-solve with every voltage limit (phase to ground and line to line) and every power balance
    made elastic (penalized slacks) and name the constraint families that had to give."""
    from dopfkit.opf.problem import OPFInfeasibleError
    culprits = elastic_diagnosis(problem, lp)
    detail = "; ".join(f"{fam}: {txt}" for fam, txt in culprits.items()) or \
        "the elastic model found no single family to relax"
    raise OPFInfeasibleError(f"LinDist3Flow OPF on {problem.network.name} is {status.lower()}: {detail}")


def elastic_diagnosis(problem, lp, penalty: float = 1e3, shed_weight: float = 100.0) -> dict[str, str]:
    """Which constraint families an elastic version of ``lp`` relaxes, with the worst elements.

    Shedding load is priced ``shed_weight`` times a voltage-limit violation, so the limits, the usual
    culprit, are named first and a balance slack only appears when no voltage can make it up."""
    from dopfkit.opf.standard_form import StandardFormLP, solve_highs
    m, ncol = lp.A.shape
    ll = lp.columns.get("v_ll", slice(0, 0))
    vcols = np.r_[np.arange(lp.columns["v"].start, lp.columns["v"].stop), np.arange(ll.start, ll.stop)]
    limited = np.isfinite(lp.upper[vcols])
    limited[problem.radial.root] = False                 # the source voltage is data, not a limit
    free = np.flatnonzero(limited)
    nv, nb = len(free), lp.rows["power balance Q"].stop
    # new columns: v above its max, v below its min, and +/- balance slacks (load not served)
    ncol2 = ncol + 2 * nv + 2 * nb
    Av = sp.csr_matrix((np.ones(nv), (np.arange(nv), vcols[free])), shape=(nv, ncol))
    A = sp.bmat([[lp.A, None, None, sp.eye(m, nb), -sp.eye(m, nb)],
                 [Av, -sp.eye(nv), sp.csr_matrix((nv, nv)), None, None],
                 [Av, None, sp.eye(nv), None, None]], format="csr")
    A.resize((m + 2 * nv, ncol2))
    lower = np.concatenate([lp.lower, np.zeros(2 * nv + 2 * nb)])
    upper = np.concatenate([lp.upper, np.full(2 * nv + 2 * nb, np.inf)])
    vmax2, vmin2 = lp.upper[vcols[free]], lp.lower[vcols[free]]
    lower[vcols[free]], upper[vcols[free]] = 0.0, np.inf
    c = np.concatenate([np.zeros(ncol), np.full(2 * nv, penalty), np.full(2 * nb, penalty * shed_weight)])
    row_lo = np.concatenate([lp.b, np.full(nv, -np.inf), vmin2])
    row_hi = np.concatenate([lp.b, vmax2, np.full(nv, np.inf)])
    el = StandardFormLP(c=c, A=A, b=row_lo, lower=lower, upper=upper, columns={}, rows={})
    sol = solve_highs(el, row_lower=row_lo, row_upper=row_hi)
    if sol.status != "Optimal":
        return {"elastic model": sol.status}
    s = sol.x[ncol:]
    above, below = s[:nv], s[nv:2 * nv]
    shed = s[2 * nv:2 * nv + nb] + s[2 * nv + nb:]
    names = np.concatenate([lp.names["v"], lp.names.get("v_ll", [])])
    nodes = lp.names["v"]
    out = {}
    for fam, viol, labels in (("voltage upper limit", above, names[free]),
                              ("voltage lower limit", below, names[free]),
                              ("power balance", shed, np.concatenate([nodes, nodes]))):
        if viol.max(initial=0) > 1e-7:
            worst = np.argsort(-viol)[:3]
            out[fam] = ", ".join(f"{labels[k]} by {viol[k]:.3g}" for k in worst if viol[k] > 1e-7)
    return out
