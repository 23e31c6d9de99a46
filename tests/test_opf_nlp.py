"""The exact branch-flow NLP, checked against the exact (Z-bus) power flow with its set-points put back
in as injections: with no decisions the NLP's feasible set is one point, the power-flow solution."""
import numpy as np
import pytest

import dopfkit as dk
from dopfkit import solvers
from dopfkit.network.math_model import with_injections
from dopfkit.network.radial import radial_network
from dopfkit.opf import pv_sites, solve_opf
from dopfkit.opf.nlp import solve_nlp
from dopfkit.opf.problem import OPFInfeasibleError, OPFProblem, der_table

pytestmark = pytest.mark.skipif(not solvers.available()["ipopt"], reason="ipopt is not installed")

DERS_13 = ["675.1", "675.2", "675.3", "680.1", "680.2", "680.3"]
# IEEE 13's regulator taps are fixed (10, 8, 11 steps): rg60 sits at 1.056 pu whatever the DERs do,
# so a feasible band must reach above it
VMAX_13 = 1.06


@pytest.fixture(scope="module")
def nets():
    return {f: dk.load_feeder(f) for f in ("ieee13", "ieee37", "ieee123")}


def _vmag_error(sol, radial, pf):
    on = radial.net_index >= 0
    return np.abs(np.sqrt(sol.v[on]) - np.abs(pf.V[radial.net_index[on]]))


@pytest.mark.parametrize("feeder", ["ieee13", "ieee37", "ieee123"])
def test_without_ders_the_nlp_is_the_exact_power_flow(nets, feeder):
    """From a flat start (the warm start would begin at the answer). IEEE 37 is ungrounded: its
    phase-to-ground voltages hang on the regulators' anti-float shunts (8 % zero-sequence shift),
    which the transformers' primitives carry; IEEE 123's bus 610 has only symmetric ones, so its zero
    sequence is exactly zero, which the pinned pseudo-inverse gives."""
    net = nets[feeder]
    r = radial_network(net)
    prob = OPFProblem(net, der_table(net, [], 1.0), objective="substation_power", vmin=0.8, vmax=1.2)
    sol = solve_nlp(prob, warm_start=False)
    pf = dk.solve_powerflow(net)
    assert sol.status == "optimal" and sol.iterations > 0
    assert _vmag_error(sol, r, pf).max() <= 1e-6          # measured 7e-10, 2e-8, 7e-8
    assert sol.objective == pytest.approx(sol.s_root.real.sum(), rel=1e-9)


def test_line_to_line_ders_on_an_ungrounded_feeder(nets):
    """IEEE 37's PV sits across its delta loads' pairs; the NLP's optimum, pushed through the exact
    power flow as line-to-line injections, is the same operating point."""
    net = nets["ieee37"]
    ders = pv_sites(net)
    assert (ders["node_to"] >= 0).all() and ders["node_name"].str.count(r"\.").eq(2).all()
    res = solve_opf(net, formulation="nlp", objective="substation_power", ders=ders, vmin=0.9, vmax=1.1)
    assert res.check["max_ground_error_pu"] <= 1e-6                     # measured 1.6e-8
    assert res.check["substation_kw_model"] == pytest.approx(res.check["substation_kw_exact"], abs=1e-3)
    # behind the delta-delta substation bank every node floats: all but the source bus's three
    assert res.check["floating_nodes"] == net.n - net.nodes.str.startswith("sourcebus.").sum()
    assert res.setpoints["p_kw"].sum() > 300                            # the PV is used (357 kW)


def test_ungrounded_feeder_is_limited_line_to_line(nets):
    """On IEEE 37 every limit is a line-to-line voltage (a phase-to-ground one there rests on ppm
    admittances). With 1.03 pu the NLP's upper limit binds, and the exact power flow at its set-points
    keeps every line-to-line voltage of a load bus within 0.97-1.03 (it reaches 1.031 with 0.9-1.1)."""
    net = nets["ieee37"]
    ders = pv_sites(net, share=0.3)
    res = solve_opf(net, formulation="nlp", objective="substation_power", ders=ders, vmin=0.97, vmax=1.03)
    limits = res.problem.voltage_limits()
    load_buses = {x.rsplit(".", 1)[0] for x in net.nodes[net.loads.node_from]}
    assert limits.pair.all() and len(limits) == 3 * len(load_buses)     # every pair of a load bus
    r = res.problem.radial
    V = np.zeros(r.n, complex)
    V[r.net_index >= 0] = res.exact.V[r.net_index[r.net_index >= 0]]
    u = np.sqrt(limits.squared(V))
    assert u.max() <= 1.03 + 1e-6 and u.max() >= 1.03 - 1e-4          # binding
    assert u.min() >= 0.97 - 1e-6
    assert res.check["max_overvoltage_pu"] <= 1e-6 and res.check["max_undervoltage_pu"] <= 1e-6
    loose = solve_opf(net, formulation="nlp", objective="substation_power", ders=ders, vmin=0.9, vmax=1.1)
    assert loose.check["max_overvoltage_pu"] == 0 and loose.objective < res.objective


@pytest.fixture(scope="module")
def loss_opf(nets):
    net = nets["ieee13"]
    prob = OPFProblem(net, der_table(net, DERS_13, s_rated_kva=300, p_avail_kw=250), objective="losses",
                      vmin=0.95, vmax=VMAX_13)
    sol = solve_nlp(prob)
    pf = dk.solve_powerflow(with_injections(net, DERS_13, sol.p_der + 1j * sol.q_der))
    return net, prob, sol, pf


def test_loss_minimum_matches_the_power_flow_at_its_set_points(loss_opf):
    net, prob, sol, pf = loss_opf
    r = radial_network(net)
    assert sol.extra["loads_outside_band"] == []    # OpenDSS's load laws are the NLP's there
    assert _vmag_error(sol, r, pf).max() <= 1e-5
    losses_pu = pf.losses.real * 1e3 / net.sbase    # PowerFlowResult.losses is in kW
    assert sol.objective == pytest.approx(losses_pu, rel=1e-4)


def test_loss_minimum_respects_every_limit_in_the_power_flow(loss_opf):
    net, prob, sol, pf = loss_opf
    r = radial_network(net)
    vm = np.abs(pf.V[r.net_index[r.net_index >= 0]])
    assert vm.min() >= prob.vmin - 1e-6 and vm.max() <= prob.vmax + 1e-6
    d = prob.ders
    assert (sol.p_der >= -1e-6).all() and (sol.p_der <= d["p_avail"] + 1e-6).all()
    assert (np.hypot(sol.p_der, sol.q_der) <= d["s_rated"] + 1e-6).all()


def test_loss_minimum_beats_the_feeder_without_ders(loss_opf):
    """DERs off is a feasible point of this problem (no-DER voltages lie in the band), so its exact
    losses bound the optimum from above; the DERs serving load locally must cut them."""
    net, prob, sol, _ = loss_opf
    base = dk.solve_powerflow(net)
    assert np.abs(base.V).max() <= prob.vmax and np.abs(base.V[np.abs(base.V) > 0.5]).min() >= prob.vmin
    assert sol.objective < 0.9 * base.losses.real * 1e3 / net.sbase


def test_cold_start_reaches_the_same_optimum(loss_opf):
    _, prob, warm, _ = loss_opf
    cold = solve_nlp(prob, warm_start=False)
    assert cold.objective == pytest.approx(warm.objective, rel=1e-6)
    np.testing.assert_allclose(cold.v, warm.v, atol=1e-6)


def test_unreachable_voltage_band_names_the_voltage_family(nets):
    net = nets["ieee13"]
    prob = OPFProblem(net, der_table(net, DERS_13, s_rated_kva=30, p_avail_kw=20), objective="losses",
                      vmin=1.0, vmax=1.0)
    with pytest.raises(OPFInfeasibleError, match=r"family 'voltage_(upper|lower)'"):
        solve_nlp(prob)


def test_overload_beyond_collapse_blames_the_power_flow_equations(nets):
    net = nets["ieee13"]
    prob = OPFProblem(net, der_table(net, DERS_13, 30, 20), objective="losses", vmin=0.5, vmax=1.5,
                      load_scale=5.0)
    with pytest.raises(OPFInfeasibleError, match="power_balance"):
        solve_nlp(prob)


def test_zip_and_exponential_loads_follow_opendss_laws(nets):
    """IEEE 13 has constant P, I and Z loads only; turn some into ZIP (model 8, delta and wye) and
    CVR exponents (model 4) and the NLP must still land on the exact power flow's voltages."""
    mixed = _mixed_laws(nets["ieee13"])
    prob = OPFProblem(mixed, der_table(mixed, [], 1.0), objective="substation_power", vmin=0.8, vmax=1.2)
    sol = solve_nlp(prob)
    assert sol.extra["loads_outside_band"] == []
    assert _vmag_error(sol, radial_network(mixed), dk.solve_powerflow(mixed)).max() <= 1e-6


def _mixed_laws(net):
    """IEEE 13 with some loads turned into ZIP (model 8) and CVR exponents (model 4)."""
    import dataclasses

    lp = net.loads
    model, expo, zipv = lp.model.copy(), lp.exponents.copy(), lp.zipv.copy()
    is_zip = np.isin(lp.names, ["load.671", "load.634a", "load.652"])
    is_cvr = np.isin(lp.names, ["load.675a", "load.675b", "load.692"])
    model[is_zip], zipv[is_zip] = 8, [0.3, 0.3, 0.4, 0.2, 0.5, 0.3, 0.0]
    model[is_cvr], expo[is_cvr] = 4, [0.8, 3.0]
    return dataclasses.replace(net, loads=dataclasses.replace(lp, model=model, exponents=expo, zipv=zipv))


def test_loads_outside_their_band_follow_opendss_regimes(nets):
    """Narrow some loads' vminpu..vmaxpu to just around 1 pu: in their band at 1 pu, where the regime
    loop starts, but outside it at the solution, so OpenDSS's impedance regimes apply (below vminpu:
    constant power, current, ZIP and CVR loads; above vmaxpu: the same kinds). With no decisions the
    NLP must land on the exact power flow, which follows OpenDSS's regimes; with the regime loop cut
    to one round (every load kept in its regime at 1 pu) it does not."""
    import dataclasses

    net = _mixed_laws(nets["ieee13"])
    lp = net.loads
    # exact pair voltages: 671 0.98-1.01, 675a 0.977, 611 0.962, 652 0.976, 634a 0.988;
    # 645 1.020, 670b 1.033, 675b 1.043, 634b 1.009
    below = np.isin(lp.names, ["load.671", "load.675a", "load.611", "load.652", "load.634a"])
    above = np.isin(lp.names, ["load.645", "load.670b", "load.675b", "load.634b"])
    vmin, vmax = lp.vmin.copy(), lp.vmax.copy()
    vmin[below], vmax[above] = 0.999, 1.003
    narrow = dataclasses.replace(net, loads=dataclasses.replace(lp, vmin=vmin, vmax=vmax))
    prob = OPFProblem(narrow, der_table(narrow, [], 1.0), objective="substation_power", vmin=0.8, vmax=1.2)
    pf = dk.solve_powerflow(narrow)
    sol = solve_nlp(prob)
    assert set(sol.extra["loads_outside_band"]) == set(lp.names[below | above])
    assert sol.extra["load_regimes_settled"] and sol.extra["load_regime_rounds"] >= 2
    assert _vmag_error(sol, radial_network(narrow), pf).max() <= 1e-6
    assert _vmag_error(solve_nlp(prob, regime_rounds=1), radial_network(narrow), pf).max() > 1e-4


@pytest.mark.parametrize("feeder", ["ieee37", "ieee123"])
def test_bus_injection_form_reaches_the_branch_flow_optimum(nets, feeder):
    """Two statements of one model: eliminating the branch currents (``I = -K^-1 A V``, the nodal
    admittance form) must not move the optimum. IEEE 37 is ungrounded with line-to-line loads; IEEE
    123 has closed switches and the pinned floating secondary at bus 610, which keep their current."""
    net = nets[feeder]
    prob = OPFProblem(net, pv_sites(net, 0.1, 0), objective="substation_power", vmin=0.9, vmax=1.1)
    bf, bim = (solve_nlp(prob, form=f) for f in ("branch_flow", "bus_injection"))
    assert bim.objective == pytest.approx(bf.objective, rel=1e-9)
    assert np.abs(bim.extra["V"] - bf.extra["V"]).max() < 1e-6
    assert np.abs(bim.extra["I"] - bf.extra["I"]).max() < 1e-5
    kept = len(bim.extra["model"].branch_nodes)
    assert 0 < kept < len(prob.radial.nodes) // 4          # most currents are gone ...
    assert bf.extra["variables"] - bim.extra["variables"] == 2 * (len(bf.extra["model"].nonroot) - kept)
    with pytest.raises(ValueError, match="unknown NLP form 'polar'"):
        solve_nlp(prob, form="polar")


def _delivered_exactly(res):
    """The exact power flow's power delivered into each line's far node, as OPFResult.flows lists it."""
    bf = res.exact.branch_flows()
    far = bf[bf.terminal == 2].set_index("node")
    flows = res.flows
    lines = flows[flows.branch.str.startswith("line.") & flows.index.isin(far.index)]
    exact = far.loc[lines.index]
    assert (exact.element == lines.branch).all() and len(lines) > 20
    return lines, -exact.P_kW, -exact.Q_kvar


def test_flows_are_what_the_exact_power_flow_carries(nets):
    """OPFResult.flows against the exact power flow's own branch flows at the set-points (power into
    each line at its far terminal, negated); LinDist3Flow's lossless flows within the losses."""
    net = nets["ieee13"]
    ders = der_table(net, DERS_13, 300, 250)
    lines, p, q = _delivered_exactly(solve_opf(net, formulation="nlp", objective="losses", ders=ders,
                                               vmax=VMAX_13))
    assert np.abs(lines.p_kw - p).max() < 1e-3
    # OpenDSS counts the far half of a line's charging as the line's, the radial model as the bus's
    # shunt: 0.04 kvar on IEEE 13's longest line
    assert np.abs(lines.q_kvar - q).max() < 0.1
    lin = solve_opf(net, objective="losses", ders=ders, vmax=VMAX_13)
    lines, p, q = _delivered_exactly(lin)
    assert np.abs(lines.p_kw - p).max() < lin.exact.losses.real          # lossless: off by < losses
    assert np.abs(lines.p_kw - p).max() > 1.0                               # ... and off
