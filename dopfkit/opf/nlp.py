"""The exact multiphase branch-flow OPF: a nonlinear program in Pyomo, solved by Ipopt.

Current-voltage form in rectangular coordinates on the radial network
(:mod:`dopfkit.network.radial`). Variables: the complex voltage ``V_k = V^r_k + j V^i_k`` of every
node, the current ``I_c`` the feeding branch delivers into every non-root node ``c``, a current ``J_l``
for every load pair that is not wye to ground (delta, line to line), and the DER set-points
``p_g, q_g``. Every law is a named, indexed constraint family, so an infeasibility can be attributed::

    branch_law[c, re|im]     V_c = N_b V_parent(b) - Z_b I_c                     (lines)
                             C_b V_parent(b) + D_b V_c + I_c = 0                (transformers)
    power_balance[k, p|q]    V_k conj(X_k) = S^load_k(V, J) - sum_{g at k} (p_g + j q_g)
                             X_k = I_k - (what child branches draw)_k - (Y^sh V)_k
                             (a line draws N_b^H I_b, a transformer A_b V_parent + B_b V_c)
    load_pair[l, p|q]        w_l conj(J_l) = P_l F^p_l(|w_l|^2) + j Q_l F^q_l(|w_l|^2)
                             w_l = (g_f V_f - g_t V_t) / v_l
    voltage_lower[j]         |V_k|^2 >= vmin^2        (OPFProblem.voltage_limits: phase to ground, or
    voltage_upper[j]         |V_k|^2 <= vmax^2         |V_k - V_l|^2 / 3 on an ungrounded island's bus)
    der_rating[g]            p_g^2 + q_g^2 <= s_g^2,   0 <= p_g <= p^avail_g  (variable bounds)
    der_pair[g, p|q]         (V_f - V_t) conj(K_g) = p_g + j q_g    (line-to-line DERs)

with the roots (the sources' EMF nodes) fixed at ``sqrt(v_root) alpha``. A wye load ``l`` at node ``f``
draws ``S_l = P_l F^p_l(x) + j Q_l F^q_l(x)``, ``x = (g_f / v_l)^2 |V_f|^2``; a pair load draws
``(g_f V_f / v_l) conj(J_l)`` at ``f`` and returns ``(g_t V_t / v_l) conj(J_l)`` at ``t`` (``g``: the
nodes' voltage bases, ``v_l``: the pair's rated voltage, both in volts). ``F`` is OpenDSS's
voltage law, an exact polynomial in ``sqrt(x)`` in each of its regimes (:mod:`dopfkit.opf.loadlaws`).
The regime is a discrete choice, so :func:`solve_nlp` finds it by an active-set loop: solve with
every load in the regime it has at 1 pu (the reference angles), give each load the regime its voltage
fell in, re-solve from that point, until no load changes regime (``extra["load_regime_rounds"]``;
the loads left outside their band are in ``extra["loads_outside_band"]``). Like any active-set
heuristic on a nonconvex model it finds a consistent local solution, not the best choice of regimes.

Objectives (per unit, minimized): ``substation_power`` = sum Re(s_root) with
``s_root = -V_root conj(X_root)``; ``losses`` = sum over the feeder's series elements (lines,
switches, transformers, reactors; not the source's Thevenin impedance, as OpenDSS counts them) of
``Re(I_b^H Z_b I_b)``; ``voltage_deviation`` = sum (|V_k|^2 - 1)^2; ``curtailment`` =
sum (p^avail - p); ``generation_cost`` = sum Re(s_root) + sum cost p.

Why Pyomo: the model is a polynomial program with a few fractional powers, which Pyomo hands to Ipopt
with exact first and second derivatives (through the AMPL library); CVXPY could not state it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyomo.environ as pyo
import scipy.sparse as sp
from pyomo.opt import TerminationCondition

from dopfkit import solvers
from dopfkit.network.radial import IDEAL_Z, RadialNetwork
from dopfkit.opf.lindist3flow import BlockTriplets
from dopfkit.opf.loadlaws import BAND, load_laws, load_regimes
from dopfkit.opf.problem import FormulationSolution, OPFInfeasibleError, OPFProblem, der_ends

ELASTIC = ("voltage_lower", "voltage_upper", "der_rating")   # families an elastic re-solve relaxes
PENALTY = 1e4           # per unit of slack: far above any objective's per-unit scale
SLACK_TOL = 1e-6
_OK = (TerminationCondition.optimal, TerminationCondition.locallyOptimal)


@dataclass
class _Structure:
    """Sparse maps of the radial network in node numbering (numpy only, no Pyomo)."""
    radial: RadialNetwork
    nonroot: np.ndarray
    A_V: sp.csr_matrix          # branch law: A_V V + K_I I = 0 on non-root rows
    K_I: sp.csr_matrix
    Z: sp.csr_matrix            # block diagonal series impedances, child x child (for the losses)
    B_I: sp.csr_matrix          # net current into each node: X = B_I I + B_V V
    B_V: sp.csr_matrix
    lossy: np.ndarray           # non-root nodes fed by a series element (not the source)


def _structure(radial: RadialNetwork, pinned=()) -> _Structure:
    """Every branch's law on its child rows, and what it draws from its parent's nodes. A line and the
    source impedance are ``V_c = N V_p - Z I_c`` and draw ``N^H I_c``. A transformer is written with
    its two-port primitive ``[[A, B], [C, D]]`` (parent, child): ``C V_p + D V_c + I_c = 0``, drawing
    ``A V_p + B V_c``. That is exact for every winding connection, anti-float shunts included.

    On a floating secondary (ungrounded delta) the primitive also sets the island's zero-sequence
    voltage, as OpenDSS does, from the island's admittance to ground; on IEEE 37 the regulators'
    anti-float shunts, doubled on the phase both share, shift it by 8 %. Where that admittance is the
    same on every phase of every bus, the zero sequence is exactly zero, but the primitive leaves it
    hanging on 1 ppm shunts, beyond Ipopt's tolerance (IEEE 123's bus 610: 1e-3 pu off from a cold
    start). Those branches (``pinned``, from :func:`_pinned_islands`) keep radial.py's pseudo-inverse
    ``V_c = N V_p - Z I_c``, which pins it to zero, and draw ``(A + B N) V_p - B Z I_c``."""
    n = radial.n
    law_v, law_i, draw_i, draw_v, Z = (BlockTriplets() for _ in range(5))
    for b, br in enumerate(radial.branches):
        m, eye = len(br.parent), np.eye(len(br.child))
        Z.add(br.child, br.child, br.Z)
        if br.Y is None or b in pinned:
            law_v.add(br.child, br.parent, -br.N), law_v.add(br.child, br.child, eye)
            law_i.add(br.child, br.child, br.Z)
        else:
            law_v.add(br.child, br.parent, br.Y[m:, :m]), law_v.add(br.child, br.child, br.Y[m:, m:])
            law_i.add(br.child, br.child, eye)
        if br.Y is None:
            draw_i.add(br.parent, br.child, br.N.conj().T)
        elif b in pinned:
            shunt, through = br.parent_draw()
            draw_v.add(br.parent, br.parent, shunt), draw_i.add(br.parent, br.child, through)
        else:
            draw_v.add(br.parent, br.parent, br.Y[:m, :m]), draw_v.add(br.parent, br.child, br.Y[:m, m:])
    nonroot = np.setdiff1d(np.arange(n), radial.root)
    E = sp.diags(np.isin(np.arange(n), nonroot).astype(complex)).tocsr()
    source_fed = np.concatenate([br.child for br in radial.branches if br.kind == "source"])
    return _Structure(radial, nonroot, law_v.matrix((n, n)), law_i.matrix((n, n)), Z.matrix((n, n)),
                      (E - draw_i.matrix((n, n))).tocsr(), (-radial.shunt - draw_v.matrix((n, n))).tocsr(),
                      np.setdiff1d(nonroot, source_fed))


def _pinned_islands(problem: OPFProblem) -> set[int]:
    """Floating secondaries whose island's zero-sequence voltage is zero: its admittance to ground
    (row sums of the shunts and of the transformer primitives touching it) is the same on every phase
    of each bus, no wye load or DER reaches ground in it, and no transformer inside it shifts the zero
    sequence between its sides (IEEE 37's open-delta regulators do, by 8 %)."""
    r = problem.radial
    island = r.floating_island()
    y_ground = np.asarray(r.shunt.sum(axis=1)).ravel().astype(complex)
    for br in r.branches:
        if br.Y is not None:
            np.add.at(y_ground, np.r_[br.parent, br.child], br.Y.sum(axis=1))
    ld, (f, t) = r.loads, der_ends(problem.ders)
    wye = np.r_[ld["node_from"].to_numpy()[(ld["node_to"].to_numpy() < 0) & (ld["s_pu"].to_numpy() != 0)],
                f[t < 0]].astype(int)
    bus = np.asarray(r.nodes.str.rsplit(".", n=1).str[0])
    shifted = {island[br.child[0]] for br in r.branches if br.Y is not None and not br.floating} - {-1}
    pinned = set()
    for b in np.setdiff1d(island[island >= 0], list(shifted)):
        mine = np.flatnonzero(island == b)
        spread = max(np.ptp(y_ground[mine[bus[mine] == x]]) for x in np.unique(bus[mine]))
        if spread <= 1e-3 * np.abs(y_ground[mine]).max() and not np.isin(wye, mine).any():   # rounding
            pinned.add(int(b))
    return pinned


# --------------------------------------------------------------------------------- model building
def _complex_rows(M: sp.csr_matrix, xr, xi, rows) -> tuple[dict, dict]:
    """Real and imaginary parts of (M x)_r as Pyomo linear expressions, x = xr + j xi."""
    re, im = {}, {}
    for r in rows:
        sl = slice(M.indptr[r], M.indptr[r + 1])
        terms_r, terms_i = [], []
        for c, a in zip(M.indices[sl], M.data[sl]):
            if a.real:
                terms_r.append(a.real * xr[c]), terms_i.append(a.real * xi[c])
            if a.imag:
                terms_r.append(-a.imag * xi[c]), terms_i.append(a.imag * xr[c])
        re[r], im[r] = pyo.quicksum(terms_r), pyo.quicksum(terms_i)
    return re, im


def _law(x, terms) -> object:
    """sum c x^(e/2): OpenDSS's voltage law in the squared (pair) voltage x."""
    out = 0
    for c, e in terms:
        if c:
            out = out + c * (1 if e == 0 else x if e == 2 else x ** (e / 2))
    return out


MAX_REGIME_ROUNDS = 6


FORMS = ("branch_flow", "bus_injection")


def build_nlp(problem: OPFProblem, elastic: bool = False, regimes=None,
              form: str = "branch_flow") -> pyo.ConcreteModel:
    """The Pyomo model of ``problem`` (not solved). ``elastic=True`` adds nonnegative slacks to the
    families in :data:`ELASTIC`, penalized in the objective, for diagnosing infeasibility;
    ``regimes``: each load pair's regime (:func:`load_regimes`; default: all in their band);
    ``form``: ``"branch_flow"`` or ``"bus_injection"`` (:func:`eliminated_currents`)."""
    if form not in FORMS:
        raise ValueError(f"unknown NLP form {form!r}; choose one of {', '.join(FORMS)}")
    radial = problem.radial
    pinned = _pinned_islands(problem)
    st = _structure(radial, pinned)
    n, nonroot, roots = radial.n, st.nonroot, radial.root
    m = pyo.ConcreteModel(name=f"nlp_{radial.network.name}")
    m.nodes, m.nonroot = pyo.Set(initialize=range(n)), pyo.Set(initialize=nonroot.tolist())
    m.Vr, m.Vi = pyo.Var(m.nodes, initialize=1.0), pyo.Var(m.nodes, initialize=0.0)
    G, kept = eliminated_currents(st, pinned) if form == "bus_injection" else (None, nonroot)
    m.branch_nodes = pyo.Set(initialize=kept.tolist())        # nodes whose feeding current is a variable
    if G is None:
        m.Ir, m.Ii = pyo.Var(m.nonroot, initialize=0.0), pyo.Var(m.nonroot, initialize=0.0)
        m._current_vars = (m.Ir, m.Ii)
    else:                                                      # I = G V on the other rows
        m.Ir_kept, m.Ii_kept = (pyo.Var(m.branch_nodes, initialize=0.0) for _ in range(2))
        m._current_vars = (m.Ir_kept, m.Ii_kept)
        gr, gi = _complex_rows(G, m.Vr, m.Vi, np.setdiff1d(nonroot, kept))
        m.Ir = pyo.Expression(m.nonroot, rule=lambda m, c: m.Ir_kept[c] if c in m.branch_nodes else gr[c])
        m.Ii = pyo.Expression(m.nonroot, rule=lambda m, c: m.Ii_kept[c] if c in m.branch_nodes else gi[c])
    e0 = np.sqrt(radial.v_root) * radial.alpha[roots]
    for k, e in zip(roots, e0):
        m.Vr[k].fix(e.real), m.Vi[k].fix(e.imag)
    _ders(m, problem)

    # branch law: V_c - (N V)_c + (Z I)_c = 0
    vr, vi = _complex_rows(st.A_V, m.Vr, m.Vi, kept)
    kr, ki = _complex_rows(st.K_I, m.Ir, m.Ii, kept)
    m.branch_law = pyo.Constraint(m.branch_nodes, ["re", "im"], rule=lambda m, c, part:
                                  (vr[c] + kr[c] if part == "re" else vi[c] + ki[c]) == 0)
    zr, zi = _complex_rows(st.Z, m.Ir, m.Ii, st.lossy)
    # net current into every node: own feed minus what child branches and shunts draw
    xr_i, xi_i = _complex_rows(st.B_I, m.Ir, m.Ii, range(n))
    xr_v, xi_v = _complex_rows(st.B_V, m.Vr, m.Vi, range(n))
    m.Xr = pyo.Expression(m.nodes, rule=lambda m, k: xr_i[k] + xr_v[k])
    m.Xi = pyo.Expression(m.nodes, rule=lambda m, k: xi_i[k] + xi_v[k])
    m._regimes = regimes
    load_p, load_q = _loads(m, radial, problem.load_scale)
    der_p, der_q = _der_at_nodes(m, problem)
    m.power_balance = pyo.Constraint(m.nonroot, ["p", "q"], rule=lambda m, k, part: (
        m.Vr[k] * m.Xr[k] + m.Vi[k] * m.Xi[k] == load_p[k] - der_p[k] if part == "p"
        else m.Vi[k] * m.Xr[k] - m.Vr[k] * m.Xi[k] == load_q[k] - der_q[k]))

    m.v = pyo.Expression(m.nodes, rule=lambda m, k: m.Vr[k] ** 2 + m.Vi[k] ** 2)
    _limits(m, problem, elastic)
    m.p_root = pyo.Expression(roots.tolist(), rule=lambda m, k: -(m.Vr[k] * m.Xr[k] + m.Vi[k] * m.Xi[k]))
    m.losses = pyo.Expression(expr=pyo.quicksum(zr[c] * m.Ir[c] + zi[c] * m.Ii[c] for c in st.lossy))
    obj = _objective(m, problem)
    if elastic:
        obj = obj + PENALTY * pyo.quicksum(getattr(m, f"slack_{f}")[k] for f in ELASTIC
                                           for k in getattr(m, f"slack_{f}"))
    m.objective = pyo.Objective(expr=obj, sense=pyo.minimize)
    m._structure = st
    return m


def eliminated_currents(st: _Structure, pinned=()) -> tuple[sp.csr_matrix, np.ndarray]:
    """The bus injection form: ``(G, kept)`` with ``I_c = (G V)_c`` on every non-root node ``c`` not in
    ``kept``, the branch law ``A_V V + K_I I = 0`` solved branch by branch (``I = -K_I^-1 A_V V``).
    The power balances then read ``V_k conj(X_k)`` with ``X = -Y V``, ``Y`` the nodal admittance
    matrix of chapter 2. Two kinds of branch keep their current as a variable and their law as a
    constraint (``kept``): closed switches (``|Z|`` below :data:`~dopfkit.network.radial.IDEAL_Z`,
    an admittance of a million per unit or more, which would swamp Ipopt's scaling) and the pinned
    floating secondaries, whose pseudo-inverse ``Z`` is singular."""
    r = st.radial
    K_inv, kept = BlockTriplets(), []
    for b, br in enumerate(r.branches):
        c = br.child
        if b in pinned or (br.Y is None and np.abs(br.Z).max() < IDEAL_Z):
            kept.append(c)
        else:
            K_inv.add(c, c, np.linalg.inv(st.K_I[c][:, c].toarray()))
    G = -(K_inv.matrix((r.n, r.n)) @ st.A_V).tocsr()
    return G, np.sort(np.concatenate(kept)) if kept else np.zeros(0, int)


def _ders(m, problem: OPFProblem) -> None:
    d = problem.ders
    m.ders = pyo.Set(initialize=range(len(d)))
    p_avail, s_rated = d["p_avail"].to_numpy(float), d["s_rated"].to_numpy(float)
    m.p = pyo.Var(m.ders, bounds=lambda m, g: (0.0, p_avail[g]), initialize=0.0)
    m.q = pyo.Var(m.ders, bounds=lambda m, g: (-s_rated[g], s_rated[g]), initialize=0.0)


def _der_at_nodes(m, problem: OPFProblem) -> tuple[dict, dict]:
    """Power the DERs inject at each node. A line-to-line DER ``g`` across ``(f, t)`` carries a current
    ``K_g`` with ``(V_f - V_t) conj(K_g) = p_g + j q_g`` (family ``der_pair``) and injects
    ``V_f conj(K_g)`` at ``f`` and ``-V_t conj(K_g)`` at ``t``."""
    f, t = der_ends(problem.ders)
    P = {k: [] for k in m.nonroot}
    Q = {k: [] for k in m.nonroot}
    for g in np.flatnonzero(t < 0):
        P[f[g]].append(m.p[g]), Q[f[g]].append(m.q[g])
    pairs = np.flatnonzero(t >= 0)
    m.der_pairs = pyo.Set(initialize=pairs.tolist())
    m.Kr, m.Ki = pyo.Var(m.der_pairs, initialize=0.0), pyo.Var(m.der_pairs, initialize=0.0)
    wr = {g: m.Vr[f[g]] - m.Vr[t[g]] for g in pairs}
    wi = {g: m.Vi[f[g]] - m.Vi[t[g]] for g in pairs}
    m.der_pair = pyo.Constraint(m.der_pairs, ["p", "q"], rule=lambda m, g, part: (
        wr[g] * m.Kr[g] + wi[g] * m.Ki[g] == m.p[g] if part == "p"
        else wi[g] * m.Kr[g] - wr[g] * m.Ki[g] == m.q[g]))
    for g in pairs:
        for k, sign in ((f[g], 1.0), (t[g], -1.0)):
            P[k].append(sign * (m.Vr[k] * m.Kr[g] + m.Vi[k] * m.Ki[g]))
            Q[k].append(sign * (m.Vi[k] * m.Kr[g] - m.Vr[k] * m.Ki[g]))
    return {k: pyo.quicksum(v) for k, v in P.items()}, {k: pyo.quicksum(v) for k, v in Q.items()}


def _loads(m, radial: RadialNetwork, load_scale: float) -> tuple[dict, dict]:
    """Power every load draws at each node (Pyomo expressions); adds J and load_pair for pairs."""
    ld = radial.loads
    s = ld["s_pu"].to_numpy(complex) * np.where(ld["scalable"].to_numpy(bool), load_scale, 1.0)
    f, t = ld["node_from"].to_numpy(int), ld["node_to"].to_numpy(int)
    a = ld["vbase_from"].to_numpy(float) / ld["v_nom"].to_numpy(float)
    b = ld["vbase_to"].to_numpy(float) / ld["v_nom"].to_numpy(float)
    laws = load_laws(ld, m._regimes)
    P = {k: [] for k in m.nonroot}
    Q = {k: [] for k in m.nonroot}
    for j in np.flatnonzero(t < 0):                       # wye to ground: power is a function of |V_f|
        x = a[j] ** 2 * (m.Vr[f[j]] ** 2 + m.Vi[f[j]] ** 2)
        P[f[j]].append(s[j].real * _law(x, laws[j][0]))
        Q[f[j]].append(s[j].imag * _law(x, laws[j][1]))
    pairs = np.flatnonzero(t >= 0)
    m.pairs = pyo.Set(initialize=pairs.tolist())
    m.Jr, m.Ji = pyo.Var(m.pairs, initialize=0.0), pyo.Var(m.pairs, initialize=0.0)
    wr = {j: a[j] * m.Vr[f[j]] - b[j] * m.Vr[t[j]] for j in pairs}
    wi = {j: a[j] * m.Vi[f[j]] - b[j] * m.Vi[t[j]] for j in pairs}
    m.load_pair = pyo.Constraint(m.pairs, ["p", "q"], rule=lambda m, j, part: (
        wr[j] * m.Jr[j] + wi[j] * m.Ji[j] == s[j].real * _law(wr[j] ** 2 + wi[j] ** 2, laws[j][0])
        if part == "p" else
        wi[j] * m.Jr[j] - wr[j] * m.Ji[j] == s[j].imag * _law(wr[j] ** 2 + wi[j] ** 2, laws[j][1])))
    for j in pairs:                                       # (g V / v_l) conj(J) at each end
        for k, g in ((f[j], a[j]), (t[j], -b[j])):
            P[k].append(g * (m.Vr[k] * m.Jr[j] + m.Vi[k] * m.Ji[j]))
            Q[k].append(g * (m.Vi[k] * m.Jr[j] - m.Vr[k] * m.Ji[j]))
    return {k: pyo.quicksum(v) for k, v in P.items()}, {k: pyo.quicksum(v) for k, v in Q.items()}


def _limits(m, problem: OPFProblem, elastic: bool) -> None:
    lim = problem.voltage_limits()                       # shared with every formulation
    limited, lo, hi = list(range(len(lim))), lim.lo, lim.hi
    f, t = lim.node, lim.node_to
    m.v_limited = pyo.Expression(limited, rule=lambda m, j: m.v[f[j]] if t[j] < 0 else (
        (m.Vr[f[j]] - m.Vr[t[j]]) ** 2 + (m.Vi[f[j]] - m.Vi[t[j]]) ** 2) / 3)
    s2 = problem.ders["s_rated"].to_numpy(float) ** 2
    if elastic:
        for fam in ELASTIC:
            index = m.ders if fam == "der_rating" else limited
            m.add_component(f"slack_{fam}", pyo.Var(index, bounds=(0, None), initialize=0.0))
    slack = (lambda fam, k: getattr(m, f"slack_{fam}")[k]) if elastic else (lambda fam, k: 0)
    m.voltage_lower = pyo.Constraint(limited, rule=lambda m, j: (
        m.v_limited[j] + slack("voltage_lower", j) >= lo[j]))
    m.voltage_upper = pyo.Constraint(limited, rule=lambda m, j: (
        m.v_limited[j] - slack("voltage_upper", j) <= hi[j]))
    m.der_rating = pyo.Constraint(m.ders, rule=lambda m, g: (
        m.p[g] ** 2 + m.q[g] ** 2 - slack("der_rating", g) <= s2[g]))


def _objective(m, problem: OPFProblem):
    d = problem.ders
    p_sub = pyo.quicksum(m.p_root[k] for k in m.p_root)
    name = problem.objective
    if name == "substation_power":
        return p_sub
    if name == "losses":
        return m.losses
    if name == "voltage_deviation":
        return pyo.quicksum((m.v[k] - 1) ** 2 for k in m.nonroot)
    if name == "curtailment":
        return pyo.quicksum(d["p_avail"].iloc[g] - m.p[g] for g in m.ders)
    if name == "generation_cost":
        return p_sub + pyo.quicksum(d["cost"].iloc[g] * m.p[g] for g in m.ders)
    raise ValueError(f"objective {name!r} has no NLP form")


# ---------------------------------------------------------------------------------- warm start
def initialize(m, problem: OPFProblem, warm_start: bool = True) -> None:
    """Set the model's starting point. ``warm_start``: the exact power flow with the DERs off
    (voltages, then branch and pair currents from the branch and load laws); otherwise, or when that
    power flow diverges, a flat start at the no-load voltages ``sqrt(v_root) alpha``."""
    from dopfkit.powerflow import PowerFlowError, solve_powerflow

    radial = problem.radial
    V = np.sqrt(radial.v_root.max()) * radial.alpha
    if warm_start:
        try:
            pf = solve_powerflow(problem.network, load_scale=problem.load_scale)
            on = radial.net_index >= 0
            V[on] = pf.V[radial.net_index[on]]
        except PowerFlowError:
            pass                                 # overloaded beyond collapse: Ipopt will say so
    V[radial.root] = np.sqrt(radial.v_root) * radial.alpha[radial.root]
    _set_point(m, problem, V)


def _set_point(m, problem: OPFProblem, V: np.ndarray) -> None:
    radial = problem.radial
    cur = np.zeros(radial.n, complex)
    for br in radial.branches:                  # currents from the branch laws
        k = len(br.parent)
        cur[br.child] = (-(br.Y[k:, :k] @ V[br.parent] + br.Y[k:, k:] @ V[br.child]) if br.Y is not None
                         else np.linalg.lstsq(br.Z, br.N @ V[br.parent] - V[br.child], rcond=None)[0])
    ir, ii = m._current_vars
    for k in m.branch_nodes:
        ir[k].set_value(cur[k].real), ii[k].set_value(cur[k].imag)
    for k in m.nonroot:
        m.Vr[k].set_value(V[k].real), m.Vi[k].set_value(V[k].imag)
    ld = radial.loads
    s = ld["s_pu"].to_numpy(complex) * np.where(ld["scalable"].to_numpy(bool), problem.load_scale, 1.0)
    laws = load_laws(ld, m._regimes)
    for j in m.pairs:
        f, t = ld["node_from"].iloc[j], ld["node_to"].iloc[j]
        w = (ld["vbase_from"].iloc[j] * V[f] - ld["vbase_to"].iloc[j] * V[t]) / ld["v_nom"].iloc[j]
        x = abs(w) ** 2
        sl = s[j].real * _law(x, laws[j][0]) + 1j * s[j].imag * _law(x, laws[j][1])
        J = np.conj(sl / w)
        m.Jr[j].set_value(J.real), m.Ji[j].set_value(J.imag)


# --------------------------------------------------------------------------------------- solving
def _run_ipopt(m, solver: str, tol: float, options: dict):
    """Solve in place; (termination condition, message, iterations, seconds)."""
    plugin = solvers.pyomo_plugin(solver)
    opt = pyo.SolverFactory(plugin)
    opts = {"tol": tol, "print_level": 0, "sb": "yes", **options}
    iters = [None]
    kw = {}
    if plugin == "cyipopt":
        def count(*args):                # Pyomo passes (nlp, alg_mod, iter_count, ...) to *args
            iters[0] = args[2]
            return True
        kw["intermediate_callback"] = count
    t0 = time.perf_counter()
    tee = opts["print_level"] > 0                       # print_level=5 asks for Ipopt's log
    results = opt.solve(m, tee=tee, load_solutions=False, options=opts, **kw)
    seconds = time.perf_counter() - t0
    tc = results.solver.termination_condition
    if tc in _OK:
        m.solutions.load_from(results)
    message = results.solver.message or str(tc)
    if isinstance(message, bytes):                       # cyipopt reports Ipopt's bytes
        message = message.decode()
    return tc, message.strip().rstrip("."), iters[0], seconds, plugin


def solve_nlp(problem: OPFProblem, solver: str = "ipopt", tol: float = 1e-8, warm_start: bool = True,
              regime_rounds: int = MAX_REGIME_ROUNDS, form: str = "branch_flow",
              **options) -> FormulationSolution:
    """Solve the exact OPF, in branch-flow form or in bus injection form (``form="bus_injection"``:
    the same model with the branch currents eliminated, :func:`eliminated_currents`). Options go to
    Ipopt (``max_iter=...``, ``print_level=5``). ``regime_rounds``: most solves of the loads' regime
    loop (1: every load kept in its regime at 1 pu).

    Raises :class:`OPFInfeasibleError` (naming the constraint family an elastic re-solve had to
    relax) when Ipopt does not reach an optimum.
    """
    if form == "bus_injection":
        # Ipopt's default scaling divides each row by its largest derivative, and the nodal balances
        # carry admittances of 1e3-1e4 pu: the scaled tolerance then left IEEE 123's objective 6e-6
        # above the branch-flow form's; unscaled, the two agree to 1e-11
        options = {"nlp_scaling_method": "none", **options}
    radial = problem.radial
    regimes = load_regimes(radial, radial.alpha)       # at 1 pu, the reference angles
    V, build_time, solve_time, iters = None, 0.0, 0.0, None
    for rounds in range(1, regime_rounds + 1):  # noqa: B007 (reported after the loop)
        # an active set over the loads' regimes
        t0 = time.perf_counter()
        m = build_nlp(problem, regimes=regimes, form=form)
        if V is None:
            initialize(m, problem, warm_start)
        else:
            _set_point(m, problem, V)                    # from the previous round's solution
        build_time += time.perf_counter() - t0
        tc, message, it, seconds, plugin = _run_ipopt(m, solver, tol, options)
        solve_time, iters = solve_time + seconds, it if iters is None else iters + (it or 0)
        if tc not in _OK:
            raise _diagnose(problem, solver, tol, options, warm_start, message, regimes, form)
        V = _values(m, problem)[0]
        found = load_regimes(problem.radial, V)
        settled = np.array_equal(found, regimes)
        if settled:
            break
        regimes = found
    sol = _solution(m, problem, build_time, solve_time, plugin, iters, message)
    sol.extra.update(load_regime_rounds=rounds, load_regimes_settled=settled, form=form,
                     variables=m.nvariables(), constraints=m.nconstraints())
    return sol


def _values(m, problem: OPFProblem) -> tuple[np.ndarray, np.ndarray]:
    n = problem.radial.n
    V = np.array([pyo.value(m.Vr[k]) + 1j * pyo.value(m.Vi[k]) for k in range(n)])
    cur = np.zeros(n, complex)
    nr = list(m.nonroot)
    cur[nr] = [pyo.value(m.Ir[k]) + 1j * pyo.value(m.Ii[k]) for k in nr]
    return V, cur


def _solution(m, problem, build_time, solve_time, plugin, iters, message) -> FormulationSolution:
    st, radial = m._structure, problem.radial
    V, cur = _values(m, problem)
    X = st.B_I @ cur + st.B_V @ V
    s_root = -V[radial.root] * np.conj(X[radial.root])
    nd = len(problem.ders)
    p = np.array([pyo.value(m.p[g]) for g in range(nd)], float)
    q = np.array([pyo.value(m.q[g]) for g in range(nd)], float)
    return FormulationSolution(
        formulation="nlp", status="optimal", objective=float(pyo.value(m.objective)),
        v=np.abs(V) ** 2, p_der=p, q_der=q, s_root=s_root, build_time=build_time, solve_time=solve_time,
        solver=f"ipopt ({plugin})", iterations=iters,
        extra={"V": V, "I": cur, "losses": float(pyo.value(m.losses)), "message": message, "model": m,
               "loads_outside_band": _loads_outside_band(radial, V)},
        flows=V * np.conj(cur))                          # cur is 0 at the roots


def _loads_outside_band(radial: RadialNetwork, V: np.ndarray) -> list[str]:
    """Loads with a pair outside OpenDSS's vminpu..vmaxpu band at ``V`` (one name per load)."""
    ld = radial.loads
    out = (load_regimes(radial, V) != BAND) & (ld["s_pu"].to_numpy() != 0)
    return list(dict.fromkeys(map(str, ld["element"][out])))


# ------------------------------------------------------------------------------------- diagnosis
_MEANING = {
    "voltage_lower": "|V|^2 >= vmin^2, line to line |V_ab|^2 / 3 on ungrounded islands",
    "voltage_upper": "|V|^2 <= vmax^2, line to line |V_ab|^2 / 3 on ungrounded islands",
    "der_rating": "p^2 + q^2 <= s_rated^2",
}


def _diagnose(problem: OPFProblem, solver, tol, options, warm_start, message, regimes=None,
              form="branch_flow") -> Exception:
    """Re-solve with slacks on the limit families; name the family that needed them."""
    name, limit_names = problem.network.name, problem.voltage_limits().names
    m = build_nlp(problem, elastic=True, regimes=regimes, form=form)
    initialize(m, problem, warm_start)
    tc, msg2, *_ = _run_ipopt(m, solver, tol, {"max_iter": 500, **options})   # bounded diagnosis
    head = (f"NLP OPF on {name} ({problem.objective}, vmin={problem.vmin}, vmax={problem.vmax}): "
            f"Ipopt: {message}.")
    if tc not in _OK:
        return OPFInfeasibleError(
            f"{head} An elastic re-solve (slacks on {', '.join(ELASTIC)}) also failed ({msg2}): the "
            "power-flow equations themselves (families power_balance, branch_law, load_pair) most likely "
            "have no solution at this loading: past the nose of the PV curve, with the loads' laws kept "
            "at every voltage (OpenDSS would turn them into impedances below their vminpu).")
    found = []
    for fam in ELASTIC:
        slack = getattr(m, f"slack_{fam}")
        vals = {k: pyo.value(slack[k]) for k in slack}
        bad = {k: v for k, v in vals.items() if v > SLACK_TOL}
        if bad:
            labels = problem.ders["name"].to_numpy() if fam == "der_rating" else limit_names
            worst = sorted(bad, key=bad.get, reverse=True)[:5]
            found.append((sum(bad.values()), fam, len(bad), max(bad.values()), [labels[k] for k in worst]))
    if not found:
        return OPFInfeasibleError(
            f"{head} An elastic re-solve needed no slack, so the model is feasible and the failure is "
            "numerical: try warm_start=True, a looser tol, or more iterations (max_iter=...).")
    found.sort(reverse=True)
    total, fam, count, worst, where = found[0]
    others = "; ".join(f"{f} ({c} constraints, up to {w:.3g})" for _, f, c, w, _ in found[1:])
    return OPFInfeasibleError(
        f"{head} Constraint family {fam!r} ({_MEANING[fam]}) is infeasible: an elastic re-solve had to "
        f"relax {count} of its constraints by up to {worst:.3g} pu^2 (at {', '.join(map(str, where))})"
        + (f"; also relaxed: {others}" if others else "") + ".")
