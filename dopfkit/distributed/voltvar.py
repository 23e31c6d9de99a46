"""OPTDIST-VC: primal-dual feedback volt/var control (the review's use case A), on three phases.

The model
---------
The review writes OPTDIST-VC on the single-phase LinDistFlow, ``v(q) = X q + v_par`` with ``v`` the
squared voltage magnitudes, ``q`` the reactive injections and ``Y = X^-1`` sparse (bus neighbours
only). :class:`VoltVarModel` is its *three-phase LinDist3Flow version*: one ``q`` and one ``v`` per
phase node, with the mutual (reactive) coupling between phases kept, built from dopfkit's
LinDist3Flow blocks (:func:`dopfkit.opf.lindist3flow.lindist3flow_blocks`). With constant-power
loads and reactive injections ``q``, the branch flows ``Q`` and the voltages obey::

    L v = K Q + (source terms),      L^T Q = -q + (loads),

``L`` the sparse branch-node incidence that carries each branch's phase map ``W``, and ``K`` the
block-diagonal ``-2 Im(Gamma o conj Z)`` of every branch (3x3 at most). Hence
``X = L^-1 K L^-T`` (by sparse solves) and ``Y = X^-1 = L^T K^-1 L``, a product of sparse
matrices whose nonzeros join each phase node to the phases of its own bus and of the adjacent
buses; ``q^T X q = Q^T K Q`` is a reactive-loss-like term, as on a single phase. Three choices make
the model symmetric and well conditioned:

* *Symmetry.* The method needs a symmetric ``X``: its quadratic term ``d/2 q^T X q`` and its dual
  preconditioning must agree, or its fixed point is not the optimum. LinDist3Flow's ``K`` is not
  symmetric: mutual resistances seen 120 degrees apart (``Im(Gamma) o R``) add an antisymmetric
  part. The model keeps ``K``'s symmetric part (``2 Re(Gamma) o X_line``, the reactance part).
  Against the full LinDist3Flow sensitivity that costs 11% (IEEE 13) and 21% (IEEE 123) of the
  largest entry of ``X``, mostly in the cross-phase entries (:meth:`VoltVarModel.lindist3flow_error`;
  with ``K`` unsymmetrized the gap would be 0.1% and 8%, the latter at IEEE 123's delta-delta
  transformer, whose complex power split the model replaces by ``L^T``). In closed loop on the exact
  power flow, feedback still holds the voltages at their limits; the inverters' q lands a few
  percent (IEEE 13) to about a fifth (IEEE 123) of their range away from the model's optimum.
* *Referral.* Regulators and transformers scale ``v`` by their squared turns ratio. Working with
  ``v' = v / sigma`` (``sigma``: the squared voltage the turns ratios alone give, 1 at the source)
  makes every branch's map average its parents with weights summing to one, so the power split
  is ``L^T`` as on a single-phase line. Each agent refers its own measurement by its ``sigma_k``.
* *Contraction.* Switches (~1e-7 pu) and the source, substation transformer and regulators
  (~1e-5 pu) would put entries of 1e5 and more in ``Y``, and the stable steps scale with
  ``1 / max eig(Y)``. Branches below ``merge_below`` (pu) are contracted: a child whose parents are
  all fixed becomes fixed (the feeder head, the review's bus 0; its voltage is not monitored),
  one that maps phase to phase is merged into its parent (same referred voltage, same injection).
  OpenDSS nodes answer through the agent that represents them (:meth:`VoltVarModel.agent_of`).

The rest
--------
:class:`OptDistVC` is the review's update vectorized over all agents; messages travel along the
nonzeros of ``Y`` and can be dropped or delayed (:class:`Faults`). :func:`centralized_optimum`
solves the same problem with CVXPY + Clarabel. :func:`run_closed_loop` runs the controller against
the linear model or the exact power flow. :func:`ieee123_overvoltage_case` and
:func:`ieee13_overvoltage_case` build PV cases whose voltage limits bind.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dopfkit.network.math_model import Network, with_injections
from dopfkit.network.radial import radial_network
from dopfkit.opf.lindist3flow import lindist3flow_blocks, lindist3flow_powerflow
from dopfkit.powerflow import solve_powerflow

STEP = 2.0              # primal step, Gershgorin-scaled per agent (see OptDistVC)
GAMMA_FRACTION = 0.05   # dual step as a fraction of the dual-ascent limit (see OptDistVC)
MERGE_BELOW = 1e-3      # pu: switches, the source, substation transformers and regulators


# ---------------------------------------------------------------------------------------------
# The linear volt/var model
# ---------------------------------------------------------------------------------------------

@dataclass
class VoltVarModel:
    """``v = sigma * (X q) + v_par`` on the agent phase nodes; ``X`` symmetric, ``Y = X^-1`` sparse.

    ``q`` and ``v`` are in per unit (``net.sbase`` per phase; ``v`` squared |V|). ``X`` and ``Y``
    act on the referred voltage ``v / sigma``.
    """
    network: Network
    nodes: pd.Index              # agent phase nodes (OpenDSS names), the order of every vector
    Y: sp.csr_matrix             # X^-1: sparse, neighbours only
    L: sp.csc_matrix             # referred branch-node incidence (kept flows x agents)
    K: sp.csr_matrix             # symmetric block-diagonal reactance term (kept flows)
    sigma: np.ndarray            # referral factor of every agent
    v_par: np.ndarray            # squared |V| with q = 0 (pu^2)
    q_min: np.ndarray            # pu, 0 where no inverter
    q_max: np.ndarray
    a: np.ndarray                # cost f_k(q) = a_k / 2 q_k^2
    vmin: np.ndarray             # |V| limits, pu
    vmax: np.ndarray
    agent: pd.Series             # every non-root phase node -> its agent node name ("" when fixed)
    inverters: pd.DataFrame      # node (as the user named it), agent, q_min, q_max, a
    injections: pd.DataFrame     # fixed injections (PV): node, s_pu
    load_scale: float = 1.0
    _lu: object = field(default=None, repr=False)
    _X: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.nodes)

    @property
    def X(self) -> np.ndarray:
        """Dense ``X = L^-1 K L^-T`` by sparse solves (n x n: fine up to a few thousand agents;
        the controller and the centralized problem never need it)."""
        if self._X is None:
            x = self.increment(np.eye(self.n))
            self._X = (x + x.T) / 2                      # symmetric by construction; drop round-off
        return self._X

    def increment(self, q: np.ndarray) -> np.ndarray:
        """``X q`` (``q``: a vector or columns) with two sparse solves against ``L``."""
        if self._lu is None:
            self._lu = spla.splu(self.L.tocsc())
        u = self._lu.solve(np.asarray(q, float), trans="T")
        return self._lu.solve(np.asarray(self.K @ u))

    def voltage(self, q: np.ndarray) -> np.ndarray:
        """Squared |V| the model predicts at the agents for injections ``q``."""
        return self.sigma * self.increment(q) + self.v_par

    @property
    def controllable(self) -> np.ndarray:
        return self.q_max > self.q_min

    def agent_of(self, nodes) -> np.ndarray:
        """Positions (in :attr:`nodes`) of the agents that represent OpenDSS ``nodes``; unknown and
        fixed nodes raise, naming them."""
        nodes = [str(x) for x in np.atleast_1d(nodes)]
        unknown = [x for x in nodes if x not in self.agent.index]
        if unknown:
            raise KeyError(f"nodes not in the volt/var model of {self.network.name}: {unknown}")
        fixed = [x for x in nodes if self.agent[x] == ""]
        if fixed:
            raise ValueError(f"nodes {fixed} are part of the fixed feeder head of {self.network.name} "
                             "(contracted into the source): no inverter can act there")
        return self.nodes.get_indexer(self.agent[nodes].to_numpy())

    def lindist3flow_error(self) -> float:
        """Largest |X_model - X_LinDist3Flow| relative to max |X_LinDist3Flow|, with X_LinDist3Flow
        the sensitivity of the full (non-symmetric, complex power split) LinDist3Flow with
        constant-power loads, taken column by column with injections at the agents."""
        r = radial_network(self.network)
        blk = lindist3flow_blocks(r)
        zero = sp.csr_matrix(blk.H.shape, dtype=complex)
        blk = dataclasses.replace(blk, H=zero, H_scalable=zero)
        pos = r.nodes.get_indexer(self.nodes)
        base = lindist3flow_powerflow(blk).v[pos]
        cols = []
        for k in range(self.n):                   # model check only: one linear solve per agent
            s = np.zeros(r.n, complex)
            s[pos[k]] = 1j
            cols.append(lindist3flow_powerflow(blk, s_der=s).v[pos] - base)
        ref = np.column_stack(cols)
        return float(np.abs(self.sigma[:, None] * self.X - ref).max() / np.abs(ref).max())


def volt_var_model(net: Network, inverters: pd.DataFrame | None = None,
                   injections: pd.DataFrame | None = None, vmin: float = 0.95, vmax: float = 1.05,
                   load_scale: float = 1.0, merge_below: float = MERGE_BELOW,
                   operating_point: str = "exact") -> VoltVarModel:
    """Build the three-phase volt/var model of ``net``.

    ``inverters``: DataFrame with columns ``node`` (OpenDSS node, e.g. ``"675.1"``), ``q_min``,
    ``q_max`` (pu on ``net.sbase``) and optionally ``a`` (cost, default 1); every other node gets
    ``q_min = q_max = 0``. ``injections``: fixed injections (PV active power), columns ``node`` and
    ``s_pu`` (complex, generator convention). ``v_par`` is the squared |V| with those injections
    and ``q = 0``, from the exact power flow (``operating_point="exact"``) or from LinDist3Flow
    (``"lindist3flow"``).
    """
    r = radial_network(net)
    blk = lindist3flow_blocks(r)
    fixed, rep = _contract(r, merge_below)
    free = np.setdiff1d(np.arange(r.n), r.root)
    is_agent = (~fixed) & (rep == np.arange(r.n))
    agents = np.flatnonzero(is_agent)
    col = np.full(r.n, -1)
    col[agents] = np.arange(len(agents))
    agent_col = np.where(fixed, -1, col[rep])                 # agent column of every node, -1 if fixed
    # flows: one per non-root node (blk.flow_node); keep those feeding an agent
    flow_of = np.full(r.n, -1)
    flow_of[blk.flow_node] = np.arange(blk.n_flows)
    kept = flow_of[agents]
    sigma_all = _referral(r, blk)
    L, K = _referred_blocks(r, blk, kept, agents, agent_col, sigma_all)
    Y = (L.T @ _block_inverse(r, blk, K, kept) @ L).tocsr()
    Y.data[np.abs(Y.data) < 1e-12 * np.abs(Y.data).max()] = 0.0
    Y.eliminate_zeros()
    names = r.nodes[agents]
    agent = pd.Series(np.where(agent_col[free] >= 0, np.asarray(names)[np.maximum(agent_col[free], 0)], ""),
                      index=r.nodes[free], name="agent")
    inv = _inverter_table(inverters, agent, names)
    inj = _injection_table(injections, net)
    n = len(agents)
    q_min, q_max, a = np.zeros(n), np.zeros(n), np.ones(n)
    pos = names.get_indexer(inv["agent"])
    np.add.at(q_min, pos, inv["q_min"].to_numpy())            # two inverters behind one agent add up
    np.add.at(q_max, pos, inv["q_max"].to_numpy())
    a[pos] = inv["a"].to_numpy()
    model = VoltVarModel(network=net, nodes=names, Y=Y, L=L, K=K, sigma=sigma_all[agents],
                         v_par=np.zeros(n), q_min=q_min, q_max=q_max, a=a,
                         vmin=np.full(n, float(vmin)), vmax=np.full(n, float(vmax)), agent=agent,
                         inverters=inv, injections=inj, load_scale=load_scale)
    model.v_par = _operating_point(model, operating_point)
    return model


def _contract(r, merge_below: float):
    """(fixed, rep): nodes that become part of the feeder head, and the node each node merges into."""
    fixed = np.zeros(r.n, bool)
    fixed[r.root] = True
    rep = np.arange(r.n)
    for br in r.branches:                                  # breadth first: parents come first
        if np.abs(br.Z).max() >= merge_below:
            continue
        nz = np.abs(br.N) > 1e-9
        if fixed[rep[br.parent]].all():
            fixed[br.child] = True
        elif (nz.sum(axis=1) == 1).all() and len(set(nz.argmax(axis=1))) == len(br.child):
            rep[br.child] = rep[br.parent[nz.argmax(axis=1)]]
    return fixed, rep


def _referral(r, blk) -> np.ndarray:
    """sigma: squared voltage the turns ratios alone give every node (no load, no drop, 1 at the
    sources); v / sigma is the referred squared voltage."""
    free = blk.flow_node
    L = (sp.csr_matrix((np.ones(len(free)), (np.arange(len(free)), free)), shape=blk.W.shape)
         - blk.W)
    sigma = np.ones(r.n)
    sigma[free] = spla.spsolve(L[:, free].tocsc(), -(L[:, r.root] @ np.ones(len(r.root))))
    return sigma


def _referred_blocks(r, blk, kept, agents, agent_col, sigma):
    """L (kept flows x agents) and the symmetric K (kept flows x kept flows), referred."""
    nk = len(kept)
    W = blk.W[kept].tocoo()                                   # parents' weights of each kept flow
    w = W.data * sigma[W.col] / sigma[agents[W.row]]          # referred: rows sum to one
    on = agent_col[W.col] >= 0                                # fixed parents go to v_par
    L = (sp.eye(nk, format="csr")
         - sp.csr_matrix((w[on], (W.row[on], agent_col[W.col[on]])), shape=(nk, nk))).tocsc()
    Cr = blk.C[kept][:, kept]
    K = sp.diags(1 / sigma[agents]) @ (-2 * Cr.imag)
    return L, ((K + K.T) / 2).tocsr()


def _block_inverse(r, blk, K, kept) -> sp.csr_matrix:
    """Inverse of the block-diagonal K, one small dense inverse per branch."""
    branch = r.in_branch[blk.flow_node[kept]]
    rows, cols, vals = [], [], []
    for b in np.unique(branch):
        idx = np.flatnonzero(branch == b)
        blk_inv = np.linalg.inv(K[idx][:, idx].toarray())
        rr, cc = np.meshgrid(idx, idx, indexing="ij")
        rows.append(rr.ravel()), cols.append(cc.ravel()), vals.append(blk_inv.ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=K.shape)


def _inverter_table(inverters, agent: pd.Series, names: pd.Index) -> pd.DataFrame:
    cols = ["node", "agent", "q_min", "q_max", "a"]
    if inverters is None or len(inverters) == 0:
        return pd.DataFrame(columns=cols)
    inv = pd.DataFrame(inverters).copy()
    missing = {"node", "q_min", "q_max"} - set(inv.columns)
    if missing:
        raise ValueError(f"inverter table lacks columns {sorted(missing)}")
    inv["node"] = inv["node"].astype(str)
    unknown = sorted(set(inv["node"]) - set(agent.index))
    if unknown:
        raise KeyError(f"inverter nodes not in the network's non-source phase nodes: {unknown}")
    head = sorted(inv.loc[agent[inv["node"]].to_numpy() == "", "node"])
    if head:
        raise ValueError(f"inverter nodes {head} are part of the fixed feeder head (contracted "
                         "into the source): no inverter can act there")
    bad = inv.loc[inv["q_min"] > inv["q_max"], "node"].tolist()
    if bad:
        raise ValueError(f"inverters with q_min > q_max at nodes {bad}")
    inv["agent"] = agent[inv["node"]].to_numpy()
    if "a" not in inv:
        inv["a"] = 1.0
    return inv[cols].reset_index(drop=True)


def _injection_table(injections, net: Network) -> pd.DataFrame:
    if injections is None or len(injections) == 0:
        return pd.DataFrame({"node": pd.Series([], dtype=str), "s_pu": pd.Series([], dtype=complex)})
    inj = pd.DataFrame(injections)[["node", "s_pu"]].copy()
    inj["node"] = inj["node"].astype(str)
    unknown = sorted(set(inj["node"]) - set(net.nodes))
    if unknown:
        raise KeyError(f"injection nodes not in {net.name}: {unknown}")
    return inj.reset_index(drop=True)


def _operating_point(model: VoltVarModel, how: str) -> np.ndarray:
    """Squared |V| at the agents with the fixed injections and q = 0."""
    if how == "exact":
        return ExactPlant(model).solve(np.zeros(model.n))
    if how == "lindist3flow":
        r = radial_network(model.network)
        s = np.zeros(r.n, complex)
        np.add.at(s, r.nodes.get_indexer(model.injections["node"]), model.injections["s_pu"].to_numpy())
        v = lindist3flow_powerflow(lindist3flow_blocks(r), model.load_scale, s_der=s).v
        return v[r.nodes.get_indexer(model.nodes)]
    raise ValueError(f"operating_point must be 'exact' or 'lindist3flow', not {how!r}")


class ExactPlant:
    """The exact power flow as the plant: inverters' q and the fixed injections as constant-power
    injections (:func:`with_injections`), warm-started from the previous step."""

    def __init__(self, model: VoltVarModel):
        self.model, self._v0 = model, None
        inv, inj = model.inverters, model.injections
        self.nodes = list(inj["node"]) + list(inv["node"])
        self.names = [f"pv.{x}" for x in inj["node"]] + [f"inverter.{x}" for x in inv["node"]]
        self.s_fixed = inj["s_pu"].to_numpy(complex)
        # an agent's q is shared by the inverters behind it in proportion to their ranges
        pos = model.nodes.get_indexer(inv["agent"])
        self.inv_pos = pos
        width = (inv["q_max"] - inv["q_min"]).to_numpy(float)
        total = np.zeros(model.n)
        np.add.at(total, pos, width)
        self.share = np.divide(width, total[pos], out=np.zeros_like(width), where=total[pos] > 0)
        self.measure_at = model.network.nodes.get_indexer(model.nodes)
        self.last = None

    def solve(self, q: np.ndarray) -> np.ndarray:
        """Squared |V| at the agents for agent injections ``q``."""
        s = np.concatenate([self.s_fixed, 1j * q[self.inv_pos] * self.share])
        net = with_injections(self.model.network, self.nodes, s, self.names) if self.nodes \
            else self.model.network
        opts = {"v0": self._v0} if self._v0 is not None else {}
        pf = solve_powerflow(net, load_scale=self.model.load_scale, **opts)
        self._v0, self.last = pf.V, pf
        return np.abs(pf.V[self.measure_at]) ** 2


# ---------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------

def soft_threshold(y, b1, b2):
    """ST_{b1}^{b2}(y) = max(min(y - b1, 0), y - b2): zero on [b1, b2], shifted outside."""
    return np.maximum(np.minimum(y - b1, 0.0), y - b2)


@dataclass
class Faults:
    """Communication faults: each message is dropped with probability ``drop`` and arrives
    ``delay`` steps late (an int, or ``(low, high)`` for a uniform random delay per message)."""
    drop: float = 0.0
    delay: int | tuple[int, int] = 0
    seed: int | None = 0

    @property
    def max_delay(self) -> int:
        return int(self.delay[1] if isinstance(self.delay, tuple) else self.delay)


def dual_step_bound(model: VoltVarModel, d: float) -> float:
    """``2 / lambda_max(H)``, ``H = X_I (diag(a_I) + d X_II)^-1 X_I^T`` (``I``: the inverters): the
    largest stable step of dual ascent on the voltage limits if the primal part were solved exactly
    at every step. ``X_I`` by sparse solves, one per inverter; no dense X."""
    inv = np.flatnonzero(model.controllable)
    if len(inv) == 0:
        return 1.0
    e = np.zeros((model.n, len(inv)))
    e[inv, np.arange(len(inv))] = 1.0
    B = model.increment(e)                                            # X[:, inv]
    small = np.diag(model.a[inv]) + d * B[inv]
    lam = np.linalg.eigvals(np.linalg.solve(small, B.T @ B)).real.max()
    return float(2.0 / lam)


class OptDistVC:
    """The review's OPTDIST-VC update, vectorized over all agents (one per phase node).

    Every step, agent ``k`` measures its squared voltage ``v_k`` and updates::

        lam_up_k <- [lam_up_k + gamma (v_k - vmax_k^2) / sigma_k]^+
        lam_lo_k <- [lam_lo_k + gamma (vmin_k^2 - v_k) / sigma_k]^+
        q_hat_k  <- q_hat_k - alpha_k [lam_up_k - lam_lo_k + d q_hat_k + sum_i Y_ki m_i]
        xi_k     <- xi_k + beta (ST(xi_k + c q_hat_k) - xi_k) / c

    then injects ``q_k = clip(q_hat_k, q_min_k, q_max_k)`` and sends ``m_k = f_k'(q_hat_k) +
    ST(xi_k + c q_hat_k)`` to the agents ``i`` with ``Y_ik != 0``. ``f_k(q) = a_k/2 q^2``; ST uses
    ``b1 = c q_min_k``, ``b2 = c q_max_k``; ``sigma_k`` refers the voltage residual to the model's
    units (a local constant near 1). Agents without an inverter (``q_min = q_max = 0``) take part
    like the others: their ST is the identity, and ``xi`` becomes the price of their ``q = 0``.

    Choices beyond the review (none changes the fixed point, which is the centralized optimum):

    * ``dual_first=True`` uses the multipliers just updated from the measurement in the same step
      (``False``: the previous ones, as the review lists the updates). Slightly faster on IEEE 13.
    * ``alpha=None`` gives each agent its own step ``STEP / ((1 + D)(a_k + c) sum_i |Y_ki|)``,
      ``D`` the largest message delay: local data only, and by Gershgorin it keeps the
      ``(q_hat, xi)`` dynamics stable whatever the set of saturated inverters; a uniform step
      that is stable everywhere is set by the stiffest node and is far slower.
    * ``beta=None`` gives ``c / (1 + D)``: an inverter inside its range forgets ``xi`` at once.
    * ``gamma=None`` gives ``GAMMA_FRACTION * 2 / lambda_max(H)`` (:func:`dual_step_bound`), a
      fraction of the dual-ascent limit. The dual step is what sets the number of steps; beyond a
      feeder-dependent fraction the multipliers outrun the slow diffusion of prices through the
      agents without inverters, wind up, and the loop settles into a limit cycle (IEEE 13
      tolerates 0.85; IEEE 123 with seed 0 0.1 but not 0.25, with seed 1 not 0.1). 0.05
      converged on five IEEE 123 seeds, in 14k to 80k+ steps; tune it per feeder.

    Received messages are what ``faults`` lets through: a dropped message leaves the receiver
    with the last value it got, a delayed one arrives late (the freshest one received is kept).
    """

    def __init__(self, model: VoltVarModel, alpha: float | np.ndarray | None = None,
                 beta: float | None = None, gamma: float | None = None, c: float = 1.0,
                 d: float = 0.1, faults: Faults | None = None, dual_first: bool = True):
        self.model, self.dual_first = model, dual_first
        self.faults = faults or Faults()
        y = model.Y.tocoo()
        off = y.row != y.col
        self.edge_to, self.edge_from, self.edge_y = y.row[off], y.col[off], y.data[off]
        self.y_diag = model.Y.diagonal()
        slow = 1.0 + self.faults.max_delay
        row_sum = np.asarray(abs(model.Y).sum(axis=1)).ravel()
        self.alpha = (np.asarray(alpha, float) if alpha is not None
                      else STEP / (slow * (model.a + c) * row_sum))
        self.beta = beta if beta is not None else c / slow
        self.gamma = gamma if gamma is not None else GAMMA_FRACTION * dual_step_bound(model, d)
        self.c, self.d = c, d
        self.rng = np.random.default_rng(self.faults.seed)
        self.reset()

    def reset(self):
        n, m = self.model.n, len(self.edge_y)
        self.q_hat, self.xi = np.zeros(n), np.zeros(n)
        self.lam_up, self.lam_lo = np.zeros(n), np.zeros(n)
        self.t = 0
        depth = self.faults.max_delay + 1
        self._sent = np.zeros((depth, n))                 # messages sent in the last `depth` steps
        self._sent[0] = self.message()
        self._recv = self._sent[0][self.edge_from].copy()  # what each edge's receiver holds
        self._recv_t = np.zeros(m, int)                    # send time of that value

    @property
    def q(self) -> np.ndarray:
        return np.clip(self.q_hat, self.model.q_min, self.model.q_max)

    def message(self) -> np.ndarray:
        md = self.model
        return md.a * self.q_hat + soft_threshold(self.xi + self.c * self.q_hat,
                                                  self.c * md.q_min, self.c * md.q_max)

    def _deliver(self):
        """Update what every receiver holds from neighbour messages sent so far."""
        m, f = len(self.edge_y), self.faults
        if isinstance(f.delay, tuple):
            delay = self.rng.integers(f.delay[0], f.delay[1] + 1, size=m)
        else:
            delay = np.full(m, int(f.delay))
        sent_t = self.t - delay
        ok = sent_t >= 0
        if f.drop > 0:
            ok &= self.rng.random(m) >= f.drop
        ok &= sent_t > self._recv_t                         # older than what it holds: ignored
        slot = sent_t[ok] % self._sent.shape[0]
        self._recv[ok] = self._sent[slot, self.edge_from[ok]]
        self._recv_t[ok] = sent_t[ok]

    def step(self, v_measured: np.ndarray) -> np.ndarray:
        """One control step from squared |V| measured at the agents; returns the new q (pu)."""
        md = self.model
        v = np.asarray(v_measured, float)
        self._deliver()
        own = self._sent[self.t % self._sent.shape[0]]
        coupling = self.y_diag * own + np.bincount(self.edge_to, self.edge_y * self._recv,
                                                   minlength=md.n)
        st = soft_threshold(self.xi + self.c * self.q_hat, self.c * md.q_min, self.c * md.q_max)
        lam_up = np.maximum(self.lam_up + self.gamma * (v - md.vmax**2) / md.sigma, 0.0)
        lam_lo = np.maximum(self.lam_lo + self.gamma * (md.vmin**2 - v) / md.sigma, 0.0)
        if self.dual_first:
            self.lam_up, self.lam_lo = lam_up, lam_lo
        q_hat = self.q_hat - self.alpha * (self.lam_up - self.lam_lo + self.d * self.q_hat + coupling)
        self.xi = self.xi + self.beta * (st - self.xi) / self.c
        self.lam_up, self.lam_lo = lam_up, lam_lo
        self.q_hat = q_hat
        self.t += 1
        self._sent[self.t % self._sent.shape[0]] = self.message()
        return self.q


# ---------------------------------------------------------------------------------------------
# Centralized reference, closed loop, scenario
# ---------------------------------------------------------------------------------------------

@dataclass
class CentralizedSolution:
    q: pd.Series                 # pu, by agent node
    v: pd.Series                 # |V| the model predicts, pu
    objective: float
    lam_up: pd.Series            # duals of the referred voltage limits (the controller's lam)
    lam_lo: pd.Series
    status: str


def objective(model: VoltVarModel, q: np.ndarray, d: float) -> float:
    """sum_k a_k/2 q_k^2 + d/2 q^T X q (X q by sparse solves)."""
    q = np.asarray(q, float)
    return float(0.5 * model.a @ q**2 + 0.5 * d * q @ model.increment(q))


def centralized_optimum(model: VoltVarModel, d: float = 0.1, solver: str = "clarabel") -> CentralizedSolution:
    """min sum a_k/2 q_k^2 + d/2 q^T X q  s.t.  vmin^2 <= sigma (X q) + v_par <= vmax^2,
    q_min <= q <= q_max, with CVXPY (Clarabel by default). Sparse: ``X q = L^-1 K u`` with
    ``L^T u = q``, so the dense X is never formed and ``q^T X q = u^T K u``."""
    import cvxpy as cp

    from dopfkit import solvers
    md, n = model, model.n
    q, u, w = cp.Variable(n, name="q"), cp.Variable(n, name="u"), cp.Variable(n, name="Xq")
    vmax_ref = (md.vmax**2 - md.v_par) / md.sigma
    vmin_ref = (md.vmin**2 - md.v_par) / md.sigma
    upper, lower = w <= vmax_ref, w >= vmin_ref
    cons = [md.L.T @ u == q, md.L @ w == md.K @ u, q >= md.q_min, q <= md.q_max, upper, lower]
    cost = 0.5 * cp.sum(cp.multiply(md.a, cp.square(q))) + 0.5 * d * cp.quad_form(u, cp.psd_wrap(md.K))
    prob = cp.Problem(cp.Minimize(cost), cons)
    prob.solve(solver=solvers.cvxpy_solver(solver))
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"centralized volt/var problem on {md.network.name} is {prob.status}: "
                           "the inverters' ranges cannot hold every voltage within "
                           f"[{md.vmin.min()}, {md.vmax.max()}] pu in the linear model")
    qv = np.asarray(q.value)
    idx = md.nodes
    return CentralizedSolution(
        q=pd.Series(qv, index=idx, name="q_pu"), v=pd.Series(np.sqrt(md.voltage(qv)), index=idx, name="vmag"),
        objective=objective(md, qv, d), lam_up=pd.Series(np.asarray(upper.dual_value), index=idx),
        lam_lo=pd.Series(np.asarray(lower.dual_value), index=idx), status=prob.status)


@dataclass
class ClosedLoopHistory:
    """Per step (rows) and agent (columns): what the controller injected and what it measured."""
    q: pd.DataFrame              # pu
    v: pd.DataFrame              # |V| measured, pu
    lam_up: pd.DataFrame
    lam_lo: pd.DataFrame
    objective: pd.Series
    violation: pd.Series         # largest |V| outside [vmin, vmax] over the agents, pu (0 if none)

    def steps_to(self, q_ref: np.ndarray, tol: float) -> int | None:
        """First step after which ||q - q_ref||_inf stays within ``tol``; None if never."""
        err = np.abs(self.q.to_numpy() - np.asarray(q_ref)[None, :]).max(axis=1)
        bad = np.flatnonzero(~(err <= tol))                # NaN (diverged) counts as bad
        if len(bad) == 0:
            return int(self.q.index[0])
        if bad[-1] == len(err) - 1:
            return None
        return int(self.q.index[bad[-1] + 1])


def run_closed_loop(controller: OptDistVC, plant: str = "linear", steps: int = 1000,
                    record_every: int = 1) -> ClosedLoopHistory:
    """Run ``steps`` control steps: each measures squared |V| at the agents from the plant
    (``"linear"``: the model; ``"exact"``: :func:`dopfkit.solve_powerflow` with the inverters' q and
    the fixed injections), then steps the controller. Row ``t`` holds the q injected before the
    ``t``-th measurement and that measurement; row 0 is the uncontrolled state."""
    md = controller.model
    if plant == "linear":
        measure = md.voltage
    elif plant == "exact":
        measure = ExactPlant(md).solve
    else:
        raise ValueError(f"plant must be 'linear' or 'exact', not {plant!r}")
    rows = {k: [] for k in ("q", "v", "lam_up", "lam_lo")}
    kept = []
    q = controller.q
    for t in range(steps + 1):
        v = measure(q)
        if t % record_every == 0 or t == steps:
            kept.append(t)
            for k, val in (("q", q), ("v", np.sqrt(np.maximum(v, 0))), ("lam_up", controller.lam_up),
                           ("lam_lo", controller.lam_lo)):
                rows[k].append(np.array(val))
        if t < steps:
            q = controller.step(v)
    frames = {k: pd.DataFrame(np.array(val), index=pd.Index(kept, name="step"), columns=md.nodes)
              for k, val in rows.items()}
    vm = frames["v"].to_numpy()
    viol = np.maximum(np.maximum(vm - md.vmax, md.vmin - vm), 0).max(axis=1)
    obj = [objective(md, qq, controller.d) for qq in frames["q"].to_numpy()]
    return ClosedLoopHistory(**frames, objective=pd.Series(obj, index=frames["q"].index, name="objective"),
                             violation=pd.Series(viol, index=frames["q"].index, name="violation_pu"))


def ieee123_overvoltage_case(seed: int = 0, n_pv: int = 20, pv_kw: float = 80.0,
                             s_ratio: float = 1.2, load_scale: float = 1.0, vmin: float = 0.95,
                             vmax: float = 1.05, net: Network | None = None) -> VoltVarModel:
    """IEEE 123 with PV at ``n_pv`` load phase nodes drawn with ``seed``: each injects ``pv_kw`` of
    active power (fixed) and has an inverter of ``s_ratio * pv_kw`` kVA whose reactive range is
    ``+-sqrt(s^2 - p^2)``. The PV pushes voltages above ``vmax``; the inverters must absorb."""
    import dopfkit as dk
    net = net or dk.load_feeder("ieee123")
    ld = net.loads
    wye = (ld.node_to < 0) & (ld.node_from >= 0)
    candidates = np.unique(net.nodes[ld.node_from[wye]])
    head = set(volt_var_model_head(net))
    candidates = np.array([x for x in candidates if x not in head])
    nodes = np.sort(np.random.default_rng(seed).choice(candidates, size=n_pv, replace=False))
    p = pv_kw * 1e3 / net.sbase
    q_lim = p * np.sqrt(s_ratio**2 - 1)
    inverters = pd.DataFrame({"node": nodes, "q_min": -q_lim, "q_max": q_lim})
    injections = pd.DataFrame({"node": nodes, "s_pu": np.full(n_pv, p, complex)})
    return volt_var_model(net, inverters, injections, vmin=vmin, vmax=vmax, load_scale=load_scale)


def volt_var_model_head(net: Network, merge_below: float = MERGE_BELOW) -> list[str]:
    """Phase nodes contracted into the source (the fixed feeder head)."""
    r = radial_network(net)
    fixed, _ = _contract(r, merge_below)
    fixed[r.root] = False
    return list(r.nodes[fixed])


IEEE13_PV_NODES = ("675.1", "675.2", "675.3", "680.1", "680.2", "680.3", "652.1", "611.3", "646.2", "634.1")


def ieee13_overvoltage_case(pv_kw: float = 250.0, q_max_kvar: float = 150.0, load_scale: float = 0.5,
                            vmin: float = 0.95, vmax: float = 1.05,
                            net: Network | None = None) -> VoltVarModel:
    """A small case for tests and exercises: IEEE 13 at half load with ``pv_kw`` of PV at each of
    :data:`IEEE13_PV_NODES` (up to 1.069 pu uncontrolled), each with an inverter of +-``q_max_kvar``.
    Three voltage limits bind at the optimum."""
    import dopfkit as dk
    net = net or dk.load_feeder("ieee13")
    nodes = list(IEEE13_PV_NODES)
    q = q_max_kvar * 1e3 / net.sbase
    inverters = pd.DataFrame({"node": nodes, "q_min": -q, "q_max": q})
    injections = pd.DataFrame({"node": nodes, "s_pu": np.full(len(nodes), pv_kw * 1e3 / net.sbase, complex)})
    return volt_var_model(net, inverters, injections, vmin=vmin, vmax=vmax, load_scale=load_scale)
