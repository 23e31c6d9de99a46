"""Multi-period LinDist3Flow OPF with storage and PV (dopfkit.opf.multiperiod) and the SMART-DS day
shapes (dopfkit.profiles), on IEEE 13 with 24 hourly steps.

References are independent of the code under test: the raw profile files read with numpy, the closed-
form battery energy balance, the single-period LinDist3Flow solve (a square linear system), the exact
power flow with the set-points put in as injections, a second solver, and price arithmetic.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dopfkit
from dopfkit.feeders import profiles_dir
from dopfkit.network.math_model import with_injections
from dopfkit.network.radial import radial_network
from dopfkit.opf import pv_sites, solve_opf
from dopfkit.opf.lindist3flow import lindist3flow_blocks, lindist3flow_powerflow
from dopfkit.opf.multiperiod import solve_multiperiod, storage_table
from dopfkit.opf.problem import OPFInfeasibleError, der_table
from dopfkit.profiles import load_profile, pv_profile

DAY = 200                      # a July day: a clear PV shape and an evening load peak
VMIN, VMAX = 0.9, 1.1          # IEEE 13's regulator taps are fixed here: rg60 sits at 1.056 pu all day
PV_NODES = ["675.1", "675.2", "675.3"]
BESS_NODES = ["634.1", "634.2", "634.3"]
TOL_KW = 1e-4                  # solver tolerance on set-points, kW (1e-10 pu on the 1 MVA base)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def net():
    return dopfkit.load_feeder("ieee13")


@pytest.fixture(scope="module")
def shapes():
    return load_profile(DAY, 60), pv_profile(DAY, 60)


@pytest.fixture(scope="module")
def ders(net):
    return der_table(net, PV_NODES, s_rated_kva=300)


@pytest.fixture(scope="module")
def bess(net):
    # unequal efficiencies so a slip between eta_c and eta_d shows in the balance
    return storage_table(net, BESS_NODES, energy_kwh=400, power_kw=100, eta_charge=0.95, eta_discharge=0.92,
                         soc_min=0.1, soc_max=0.9, soc_init=0.5)


@pytest.fixture(scope="module")
def arbitrage(net, ders, bess, shapes):
    load, pv = shapes
    price = load.to_numpy()    # a tariff that follows the load: dear at the evening peak
    return solve_multiperiod(net, ders, bess, load, pv, objective="energy_cost", price=price, vmin=VMIN,
                             vmax=VMAX, solver="highs")


# ---------------------------------------------------------------------------------------- profiles
def _raw(name):
    return np.loadtxt(profiles_dir() / name)


def test_load_profile_matches_raw_file():
    ident = "1077"
    raw = _raw(f"res_kw_{ident}_pu.csv")[(DAY - 1) * 96:DAY * 96]
    quarter = load_profile(DAY, 15, "residential", id=ident)
    hourly = load_profile(DAY, 60, "residential", id=ident)
    np.testing.assert_allclose(quarter.to_numpy(), raw / raw.max(), rtol=1e-12)
    means = raw.reshape(24, 4).mean(axis=1)
    np.testing.assert_allclose(hourly.to_numpy(), means / means.max(), rtol=1e-12)
    assert list(hourly.index) == list(range(24)) and quarter.index[1] == 0.25
    assert hourly.max() == pytest.approx(1.0)


def test_aggregate_and_pv_profiles():
    agg = load_profile(DAY, 60, "commercial")              # mean of all commercial customers
    assert len(agg) == 24 and agg.max() == pytest.approx(1.0) and (agg > 0).all()
    raw = _raw("SFO_37.7452_-122.4074_25_180.csv")[(DAY - 1) * 96:DAY * 96].reshape(24, 4).mean(axis=1)
    pv = pv_profile(DAY, 60, tilt=25, azimuth=180)
    np.testing.assert_allclose(pv.to_numpy(), np.clip(raw, 0, 1), rtol=1e-12)
    assert pv.min() >= 0 and pv.max() <= 1 and pv.iloc[0] == 0 and pv.iloc[12] > 0.5   # night and noon


def test_profile_errors_name_file_and_folder():
    with pytest.raises(FileNotFoundError, match=r"res_kw_999_pu\.csv.*profiles"):
        load_profile(DAY, 60, id=999)
    with pytest.raises(FileNotFoundError, match=r"SFO_.*_5_180\.csv.*tilt, azimuth"):
        pv_profile(DAY, 60, tilt=5)
    with pytest.raises(ValueError, match="day of the year"):
        load_profile(366)


# ----------------------------------------------------------------------------------- battery model
def test_soc_trajectory_is_the_closed_form_energy_balance(arbitrage, bess):
    res = arbitrage
    cap = bess["energy"].to_numpy() * 1e3  # kWh (1 MVA base)
    eta_c, eta_d = bess["eta_charge"].to_numpy(), bess["eta_discharge"].to_numpy()
    pc, pdis = res.p_charge.to_numpy(), res.p_discharge.to_numpy()
    # SOC_k = SOC_0 + sum_{t<k} dt (eta_c p_ch - p_dis / eta_d) / E
    expected = 0.5 + np.vstack([np.zeros(3), np.cumsum(res.dt * (eta_c * pc - pdis / eta_d), axis=0) / cap])
    np.testing.assert_allclose(res.soc.to_numpy(), expected, atol=1e-8)
    assert (res.soc.to_numpy() >= 0.1 - 1e-9).all() and (res.soc.to_numpy() <= 0.9 + 1e-9).all()
    assert (res.soc.iloc[-1] >= 0.5 - 1e-9).all()                   # ends no emptier than it started
    assert len(res.soc) == 25 and res.soc.index[-1] == 24.0
    assert res.p_charge.abs().sum().sum() > 100                     # the battery is actually used


def test_set_points_within_ratings(arbitrage, ders, bess):
    res = arbitrage
    s_der = ders["s_rated"].to_numpy() * 1e3
    assert (np.hypot(res.p_der, res.q_der) <= s_der + TOL_KW).all().all()      # true circle: inner polygon
    assert (res.p_der <= res.p_avail + TOL_KW).all().all() and (res.p_der >= -TOL_KW).all().all()
    p_net = res.p_discharge - res.p_charge
    assert (np.hypot(p_net, res.q_storage) <= bess["s_rated"].to_numpy() * 1e3 + TOL_KW).all().all()
    assert res.vmag.min().min() >= VMIN - 1e-9 and res.vmag.max().max() <= VMAX + 1e-9
    assert res.simultaneous_kw < 1e-3                          # eta < 1 and a price: never both at once


# ----------------------------------------------------------------------------------- sign patterns
def test_battery_buys_low_and_sells_high(arbitrage, shapes):
    res, price = arbitrage, shapes[0].to_numpy()
    net_kw = (res.p_discharge - res.p_charge).sum(axis=1).to_numpy()
    cheap, dear = np.argmin(price), np.argmax(price)
    assert net_kw[cheap] < -1.0, "charges in the cheapest hour"
    assert net_kw[dear] > 1.0, "discharges in the dearest hour"
    # every kWh moved earns money: the mean price paid while charging is below that earned discharging
    charging, discharging = net_kw < -1e-3, net_kw > 1e-3
    bought = price[charging] @ -net_kw[charging] / -net_kw[charging].sum()
    sold = price[discharging] @ net_kw[discharging] / net_kw[discharging].sum()
    assert bought < sold
    # the tariff follows the load, so energy is moved from low-load hours into high-load hours
    assert shapes[0].to_numpy()[discharging].mean() > shapes[0].to_numpy()[charging].mean()


def test_peak_shaving_with_pv(net, ders, bess, shapes):
    load, pv = shapes
    kw = dict(vmin=VMIN, vmax=VMAX, solver="highs", objective="peak_demand")
    none = storage_table(net, BESS_NODES, energy_kwh=0, power_kw=0)
    base = solve_multiperiod(net, ders, none, load, pv, **kw)
    shaved = solve_multiperiod(net, ders, bess, load, pv, **kw)
    net_kw = (shaved.p_discharge - shaved.p_charge).sum(axis=1)
    assert shaved.p_substation.max() < base.p_substation.max() - 50      # 300 kW of battery shaves the peak
    assert net_kw[base.p_substation.idxmax()] > 1.0                       # by discharging at it
    # The peak objective leaves off-peak set-points free, so compare hours by the decision-free net
    # load (nominal load x shape - PV nameplate x PV shape): the battery charges in hours of low net
    # load (PV up, or night) and discharges only in hours of higher net load than any charging hour.
    nominal_kw = radial_network(net).loads["s_pu"].to_numpy().real.sum() * net.sbase / 1e3
    net_load = load * nominal_kw - pv * ders["p_avail"].sum() * net.sbase / 1e3
    charging, discharging = net_kw < -1.0, net_kw > 1.0
    assert charging.any() and net_load[charging].max() < net_load[discharging].min()
    assert net_kw[pv.idxmax()] <= 1e-3                                    # never discharges at solar noon
    assert shaved.simultaneous_kw < 1e-3                 # the throughput tie-breaker rules it out


# ------------------------------------------------------------------- against single-period paths
def test_no_storage_no_pv_reproduces_single_period_lindist3flow(net, shapes):
    load = shapes[0]
    empty = storage_table(net, BESS_NODES, energy_kwh=0, power_kw=0)
    res = solve_multiperiod(net, None, empty, load, None, vmin=0.8, vmax=1.2, solver="highs")
    blocks = lindist3flow_blocks(radial_network(net))
    for t, scale in enumerate(load.to_numpy()):
        ref = lindist3flow_powerflow(blocks, load_scale=scale)
        np.testing.assert_allclose(res.v[t], ref.v, atol=1e-8, err_msg=f"step {t}")
        assert res.p_substation.iloc[t] == pytest.approx(ref.s_root.real.sum() * 1e3, abs=1e-5)
    assert np.isnan(res.soc.to_numpy()).all()                       # zero-size batteries have no SOC


def test_ungrounded_feeder_steps_match_the_single_period_opf():
    """IEEE 37 is limited line to line; two identical steps must each be the single-period
    LinDist3Flow OPF (a second, independently assembled LP with the same limits)."""
    net37 = dopfkit.load_feeder("ieee37")
    ders = pv_sites(net37, share=0.3)
    single = solve_opf(net37, ders=ders, vmin=0.97, vmax=1.03, check=False)
    steps = pd.Series([1.0, 1.0])
    res = solve_multiperiod(net37, ders, None, steps, steps, objective="substation_energy", vmin=0.97,
                            vmax=1.03, limit_nodes="loads", solver="highs")
    p_single = single.solution.s_root.real.sum() * net37.sbase / 1e3
    np.testing.assert_allclose(res.p_substation.to_numpy(), p_single, rtol=1e-7)
    loose = solve_opf(net37, ders=ders, vmin=0.9, vmax=1.1, check=False)
    assert loose.objective < single.objective - 1e-4             # the line-to-line limits bind


def test_second_solver_agrees(net, ders, bess, shapes, arbitrage):
    load, pv = shapes
    other = solve_multiperiod(net, ders, bess, load, pv, objective="energy_cost", price=load.to_numpy(),
                              vmin=VMIN, vmax=VMAX, solver="clarabel")
    assert other.objective == pytest.approx(arbitrage.objective, rel=1e-6)


def test_setpoints_through_exact_power_flow(net, ders, bess, shapes, arbitrage):
    """The OPF's voltages against the exact power flow with its set-points as injections, at the hour of
    most PV and at the dearest hour. The bound is the model's own error level: LinDist3Flow with no
    DERs is 0.6 % off the exact solution at IEEE 13's nominal load (measured below); 1 % covers it."""
    load, pv = shapes
    res = arbitrage
    radial = radial_network(net)
    model = lindist3flow_powerflow(lindist3flow_blocks(radial), 1.0).vmag(radial)
    base_err = (model - dopfkit.solve_powerflow(net).vmag).dropna().abs().max()
    assert base_err < 0.01
    for t in (int(np.argmax(pv.to_numpy())), int(np.argmax(load.to_numpy()))):
        s = res.injections(t, ders, bess)
        exact = dopfkit.solve_powerflow(with_injections(net, s.index, s.to_numpy()), load_scale=load.iloc[t])
        err = (exact.vmag.reindex(res.vmag.columns) - res.vmag.iloc[t]).abs().max()
        print(f"hour {t}: max |V| error LinDist3Flow vs exact {err:.4f} pu (no DERs: {base_err:.4f})")
        assert err < 0.01


def test_loss_estimate_against_exact_losses(net, ders, bess, shapes):
    """The "losses" objective estimates Re(I^H Z I) at 1 pu; the exact power flow at its set-points gives
    the true series losses. Constant-power currents scale as 1/|V|, so with the exact voltages between
    v_lo and v_hi the estimate over the true losses lies between v_lo^2 and v_hi^2 (measured: 4.0 %
    above, with the voltages between 0.998 and 1.056 pu)."""
    load, pv = shapes
    res = solve_multiperiod(net, ders, bess, load, pv, objective="losses", vmin=VMIN, vmax=VMAX)
    exact, v_lo, v_hi = 0.0, np.inf, 0.0
    for t in range(len(load)):
        s = res.injections(t, ders, bess)
        pf = dopfkit.solve_powerflow(with_injections(net, s.index, s.to_numpy()), load_scale=load.iloc[t])
        exact += res.dt * pf.losses.real
        v_lo, v_hi = min(v_lo, pf.vmag.min()), max(v_hi, pf.vmag.max())
    print(f"estimate / exact {res.objective / exact:.4f}, voltages {v_lo:.4f} to {v_hi:.4f} pu")
    assert v_lo**2 < res.objective / exact < v_hi**2


def test_infeasible_voltage_limits_are_named(net, shapes):
    # the exact power flow puts regulator rg60's output above 1.05 pu at any load: no set-point helps
    assert dopfkit.solve_powerflow(net, load_scale=0.5).vmag.max() > 1.05
    with pytest.raises(OPFInfeasibleError, match=r"voltage limits.*rg60"):
        solve_multiperiod(net, None, None, shapes[0], vmin=0.95, vmax=1.05, solver="highs")


def test_bad_inputs(net, ders, shapes):
    with pytest.raises(ValueError, match="soc_min <= soc_init"):
        storage_table(net, BESS_NODES, 100, 50, soc_init=0.95)
    with pytest.raises(ValueError, match="needs price"):
        solve_multiperiod(net, ders, None, shapes[0], shapes[1], objective="energy_cost")
    with pytest.raises(ValueError, match="pv_shape"):
        solve_multiperiod(net, ders, None, shapes[0], None)


def test_limits_at_load_nodes_only(net, ders):
    """rg60 (no load) sits above 1.05 pu, so with limits on every node the day is infeasible (above);
    with limits where the customers are it is feasible, the limited nodes are those of the single-period
    OPFProblem, and every one of them is within its limits."""
    from dopfkit.opf import OPFProblem
    res = solve_multiperiod(net, ders, None, np.ones(2), np.ones(2), objective="substation_energy",
                            vmin=0.95, vmax=1.05, dt_hours=1.0, solver="highs", limit_nodes="loads")
    lo, hi = OPFProblem(net, ders, vmin=0.95, vmax=1.05, limit_nodes="loads").voltage_bounds()
    radial = radial_network(net)
    limited = np.isfinite(hi) & (lo < hi)                               # the source nodes are fixed
    names = radial.nodes[limited]
    v = res.vmag[names]
    assert (v.to_numpy() >= 0.95 - 1e-7).all() and (v.to_numpy() <= 1.05 + 1e-7).all()
    assert res.vmag.iloc[0].max() > 1.05                                # rg60, not a customer node
    assert res.vmag.iloc[0].idxmax().startswith("rg60")
    with pytest.raises(ValueError, match="limit_nodes"):
        solve_multiperiod(net, None, None, np.ones(1), dt_hours=1.0, limit_nodes="some")
