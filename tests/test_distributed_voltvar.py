"""OPTDIST-VC (dopfkit.distributed.voltvar): the model's algebra, and the closed loop checked against
the centralized optimum (CVXPY + Clarabel) and the exact power flow."""
import numpy as np
import pandas as pd
import pytest

import dopfkit as dk
from dopfkit.distributed import voltvar as vv
from dopfkit.network.radial import radial_network

D = 0.1
GAMMA_13 = 1.0      # tuned for IEEE 13 (0.85 of its dual-ascent limit); the default is for any feeder


@pytest.fixture(scope="module")
def net13():
    return dk.load_feeder("ieee13")


@pytest.fixture(scope="module")
def case13(net13):
    return vv.ieee13_overvoltage_case(net=net13)


@pytest.fixture(scope="module")
def optimum13(case13):
    return vv.centralized_optimum(case13, d=D)


def _q_tol(model):
    return 1e-3 * float((model.q_max - model.q_min).max())


def test_soft_threshold_closed_form():
    y = np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 5.0])
    assert np.array_equal(vv.soft_threshold(y, -1.0, 2.0), [-2.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    assert np.array_equal(vv.soft_threshold(y, 0.0, 0.0), y)        # no inverter: the identity


def test_Y_is_sparse_inverse_of_X_and_joins_neighbours_only(case13, net13):
    m = case13
    X, Y = m.X, m.Y
    assert np.abs(X @ Y.toarray() - np.eye(m.n)).max() < 1e-9      # X by solves, Y by products
    assert np.allclose(X, X.T) and np.linalg.eigvalsh(X).min() > 0
    # every nonzero of Y joins two phases of one bus or of two buses a (kept) branch joins
    r = radial_network(net13)
    bus = lambda names: {x.rsplit(".", 1)[0] for x in names if x}  # noqa: E731
    agent = m.agent.reindex(r.nodes, fill_value="")
    pairs = set()
    for br in r.branches:
        for a in bus(agent.iloc[br.parent]):
            for b in bus(agent.iloc[br.child]):
                pairs |= {(a, b), (b, a)}
    yc = Y.tocoo()
    rows = m.nodes[yc.row].str.rsplit(".", n=1).str[0]
    cols = m.nodes[yc.col].str.rsplit(".", n=1).str[0]
    assert all(a == b or (a, b) in pairs for a, b in zip(rows, cols))
    assert Y.nnz < 0.3 * m.n**2


def test_model_matches_exact_powerflow_at_q0_and_lindist3flow_sensitivity(case13):
    m = case13
    pf = vv.ExactPlant(m).solve(np.zeros(m.n))
    assert np.abs(pf - m.v_par).max() < 1e-12
    # the symmetric (reactance) part of LinDist3Flow's coupling: measured 11% of max |X| on IEEE 13
    assert m.lindist3flow_error() < 0.15
    # a voltage change the exact flow sees, against the model's prediction
    q = np.where(m.controllable, -0.1, 0.0)
    dv_exact = vv.ExactPlant(m).solve(q) - m.v_par
    dv_model = m.voltage(q) - m.v_par
    assert np.abs(dv_model - dv_exact).max() < 0.2 * np.abs(dv_exact).max()


def test_exact_plant_matches_opendss_with_the_same_injections(case13, net13):
    """The plant of the closed loop, with its PV and some inverter vars, against OpenDSS solving the
    same injections as negative constant-power loads on the snapshot (taps and capacitors frozen
    where they settled), loads at the case's multiplier."""
    import opendssdirect as dss

    from dopfkit.feeders import feeder_master
    from dopfkit.opendss import current_voltages, opendss_voltages

    m = case13
    q = np.where(m.controllable, -0.05, 0.0)
    plant = vv.ExactPlant(m)
    v2 = plant.solve(q)
    opendss_voltages(feeder_master("ieee13"))          # the snapshot; leaves ControlMode=Off
    s_va = np.concatenate([plant.s_fixed, 1j * q[plant.inv_pos] * plant.share]) * net13.sbase
    for k, (node, s) in enumerate(zip(plant.nodes, s_va)):
        kv = net13.vbase[net13.nodes.get_loc(node)] / 1e3
        kw, kvar = -s.real / 1e3 / m.load_scale, -s.imag / 1e3 / m.load_scale   # LoadMult scales these too
        dss.Text.Command(f"New Load.injection{k} bus1={node} phases=1 conn=wye kV={kv} kW={kw} "
                         f"kvar={kvar} model=1 vminpu=0.5 vmaxpu=2")
    dss.Text.Command(f"Set LoadMult={m.load_scale}")
    dss.Text.Command("Solve")
    assert dss.Solution.Converged()
    v_dss = current_voltages()[m.nodes].to_numpy() / net13.vbase[net13.nodes.get_indexer(m.nodes)]
    assert len(plant.nodes) > 3 and np.abs(q).max() > 0
    assert np.abs(v2 - np.abs(v_dss) ** 2).max() < 1e-6


def test_merged_and_fixed_nodes(case13):
    m = case13
    assert m.agent["692.1"] == "671.1"                  # behind the 671-692 switch: same node
    assert (m.agent[["sourcebus.1", "650.1", "rg60.1"]] == "").all()   # the stiff feeder head
    assert m.agent_of(["692.3"])[0] == m.nodes.get_loc("671.3")
    with pytest.raises(ValueError, match="650.2"):
        m.agent_of(["650.2"])


def test_unknown_node_is_named(net13):
    inv = pd.DataFrame({"node": ["675.1", "999.1"], "q_min": -0.1, "q_max": 0.1})
    with pytest.raises(KeyError, match="999.1"):
        vv.volt_var_model(net13, inv)
    with pytest.raises(KeyError, match="777.2"):
        vv.volt_var_model(net13, injections=pd.DataFrame({"node": ["777.2"], "s_pu": [0.1 + 0j]}))
    with pytest.raises(ValueError, match="rg60.1"):
        vv.volt_var_model(net13, pd.DataFrame({"node": ["rg60.1"], "q_min": -0.1, "q_max": 0.1}))


def test_centralized_sparse_form_matches_dense_X(case13, optimum13):
    """The L/K form of the centralized problem against the plain one with the dense X."""
    import cvxpy as cp
    m = case13
    q = cp.Variable(m.n)
    v = cp.multiply(m.sigma, m.X @ q) + m.v_par
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(m.a, cp.square(q)))
                                  + 0.5 * D * cp.quad_form(q, cp.psd_wrap(m.X))),
                      [q >= m.q_min, q <= m.q_max, v <= m.vmax**2, v >= m.vmin**2])
    prob.solve(solver=cp.CLARABEL)
    assert np.abs(q.value - optimum13.q.to_numpy()).max() < 1e-6
    assert abs(prob.value - optimum13.objective) < 1e-7
    assert optimum13.v.max() == pytest.approx(1.05, abs=1e-6)      # the limits bind
    assert (optimum13.lam_up > 1e-4).sum() >= 2


def test_linear_plant_converges_to_centralized_optimum(case13, optimum13):
    m = case13
    h = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13), "linear", steps=2000)
    assert np.abs(h.q.iloc[-1] - optimum13.q).max() < _q_tol(m)
    assert h.objective.iloc[-1] == pytest.approx(optimum13.objective, rel=1e-3)
    assert h.violation.iloc[-1] < 1e-5
    assert h.v.iloc[0].max() > 1.06                                # it started well above the limit
    assert np.abs(h.lam_up.iloc[-1] - optimum13.lam_up).max() < 1e-2 * optimum13.lam_up.max()


def test_default_steps_converge_too(case13, optimum13):
    """The feeder-independent defaults (gamma from the dual-ascent limit) are slower but converge."""
    h = vv.run_closed_loop(vv.OptDistVC(case13, d=D), "linear", steps=30000, record_every=50)
    assert np.abs(h.q.iloc[-1] - optimum13.q).max() < _q_tol(case13)


def test_exact_plant_meets_limits_near_linear_optimum(case13, optimum13):
    """The exact power flow as the plant: feedback holds the true voltages at the limit although
    the model is off (symmetric coupling, loads' voltage dependence). Measured after 2000 steps:
    violation 6e-5 pu, q within 6.5e-3 pu (2% of the range) of the linear model's optimum."""
    m = case13
    h = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13), "exact", steps=2000, record_every=10)
    v_end = h.v.iloc[-1]
    assert h.violation.iloc[-1] < 2e-4
    assert v_end.max() > 1.05 - 1e-3                              # binding, not conservative
    gap = np.abs(h.q.iloc[-1] - optimum13.q).max()
    assert gap < 0.05 * float((m.q_max - m.q_min).max())           # model mismatch, a few percent
    assert gap > _q_tol(m)                                         # ... and not zero: it is there


def test_dropped_messages_converge_more_slowly(case13, optimum13):
    m = case13
    tol = _q_tol(m)
    clean = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13), "linear", steps=3000)
    lossy = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13, faults=vv.Faults(drop=0.2, seed=3)),
                               "linear", steps=3000)
    assert np.abs(lossy.q.iloc[-1] - optimum13.q).max() < tol
    assert lossy.steps_to(optimum13.q, tol) >= clean.steps_to(optimum13.q, tol)
    # all messages lost: neighbours never hear each other, and the loop cannot find the optimum
    deaf = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13, faults=vv.Faults(drop=1.0)),
                              "linear", steps=1000)
    assert np.abs(deaf.q.iloc[-1] - optimum13.q).max() > 10 * tol


@pytest.mark.parametrize("delay", [2, (0, 4)])
def test_delayed_messages_converge(case13, optimum13, delay):
    m = case13
    faults = vv.Faults(delay=delay, drop=0.2, seed=5)
    h = vv.run_closed_loop(vv.OptDistVC(m, d=D, gamma=GAMMA_13, faults=faults), "linear", steps=10000,
                           record_every=10)
    assert np.abs(h.q.iloc[-1] - optimum13.q).max() < _q_tol(m)


def test_ieee123_case_has_overvoltage_and_a_feasible_optimum():
    m = vv.ieee123_overvoltage_case(seed=0)
    assert np.sqrt(m.v_par).max() > 1.07 and m.controllable.sum() == 20
    sol = vv.centralized_optimum(m, d=D)
    assert sol.v.max() == pytest.approx(1.05, abs=1e-6)
