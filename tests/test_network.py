"""The network model against OpenDSS: element primitives, the import report, and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import opendssdirect as dss
import pandas as pd
import pytest

import dopfkit as dk
from dopfkit.network import FeederImportError
from dopfkit.network.math_model import _series_primitives, _shunt_primitives
from dopfkit.network.opendss_import import _complex_matrix, compile_case

FEEDERS = ["ieee13", "ieee37", "ieee123", "ieee8500"]


@pytest.fixture(scope="module", params=FEEDERS)
def net(request):
    return dk.load_feeder(request.param)


def _opendss_yprim(name: str) -> np.ndarray:
    dss.Circuit.SetActiveElement(name)
    return _complex_matrix(dss.CktElement.YPrim())


def test_every_primitive_matches_opendss(net):
    """Lines, switches, transformers and capacitors, rebuilt from their data, against OpenDSS's YPrim.
    The source and reactors are not rebuilt: the importer takes their impedance from OpenDSS's own
    YPrim (their entries here only check that it lands on the right nodes)."""
    dk.load_feeder(net.feeder.master)                      # OpenDSS holds this case again
    index = {n: i for i, n in enumerate(net.nodes)}
    ours = [(name, prim) for name, _, _, prim in _series_primitives(net.feeder, index)]
    ours += [(name, prim) for name, _, prim in _shunt_primitives(net.feeder, index)]
    worst = 0.0
    for name, prim in ours:
        ref = _opendss_yprim(name)
        if name.startswith("vsource"):                    # terminal 1 block: bus to the EMF
            ref = ref[: len(prim), : len(prim)]
        worst = max(worst, np.abs(prim - ref).max() / np.abs(ref).max())
    assert worst < 1e-9


def test_report_accounts_for_every_element(net):
    report = net.feeder.report.to_frame()
    dk.load_feeder(net.feeder.master)
    in_case = {e.lower() for e in dss.Circuit.AllElementNames()}
    assert in_case <= set(report.index)
    assert set(report["status"]) <= {"exact", "approximated", "frozen", "ignored"}
    # each status against what OpenDSS says of the element: controls and the capacitors they switch
    # are frozen at the snapshot, disabled elements ignored, the rest of these feeders exact
    switched = set()
    for name in dss.CapControls.AllNames() or []:
        dss.CapControls.Name(name)
        switched.add(f"capacitor.{dss.CapControls.Capacitor().lower()}")
    expected = {}
    for element in in_case:
        dss.Circuit.SetActiveElement(element)
        kind = element.split(".", 1)[0]
        expected[element] = ("ignored" if not dss.CktElement.Enabled() else
                             "frozen" if kind in ("regcontrol", "capcontrol") or element in switched else
                             "exact")
    expected = pd.Series(expected)
    pd.testing.assert_series_equal(report["status"].reindex(expected.index), expected, check_names=False)


def test_per_unit_matrix_is_symmetric_and_bases_are_opendss(net):
    """Reciprocal elements and symmetric scaling D Y D give a symmetric per-unit Y."""
    Y = net.Y
    assert abs(Y - Y.T).max() <= 1e-9 * abs(Y).max()
    compile_case(net.feeder.master)                       # OpenDSS's circuit is this feeder's again
    kv = {}
    for bus in dss.Circuit.AllBusNames():
        dss.Circuit.SetActiveBus(bus)
        kv[bus.lower()] = dss.Bus.kVBase()
    expected = np.array([kv[x.rsplit(".", 1)[0]] for x in net.nodes]) * 1e3
    np.testing.assert_allclose(net.vbase, expected, rtol=1e-12)


def test_center_tapped_service_transformers_are_three_winding():
    net = dk.load_feeder("ieee8500")
    split = [t for t in net.feeder.transformers if t.n_windings == 3]
    assert len(split) > 1000
    assert {w.nodes for w in split[0].windings[1:]} == {(1, 0), (0, 2)}


def _write_case(tmp_path, extra: str):
    master = tmp_path / "bad.dss"
    master.write_text("Clear\nNew Circuit.bad basekv=4.16 pu=1.0 phases=3 bus1=src\n"
                      "New Line.l1 bus1=src bus2=b phases=3 r1=0.1 x1=0.2 r0=0.3 x0=0.6 length=1\n"
                      f"{extra}\nSet voltagebases=[4.16]\nCalcVoltageBases\n")
    return master


def test_loading_a_feeder_keeps_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dk.load_feeder("ieee13")
    assert Path.cwd() == tmp_path


def test_unsupported_load_model_names_element_and_file(tmp_path):
    master = _write_case(tmp_path, "New Load.motor bus1=b phases=3 kv=4.16 kw=100 kvar=50 model=6")
    with pytest.raises(FeederImportError, match=r"load\.motor.*bad\.dss.*model 6"):
        dk.load_feeder(master)


def test_unsupported_element_class_is_an_error(tmp_path):
    master = _write_case(tmp_path, "New Isource.inj bus1=b amps=10")
    with pytest.raises(FeederImportError, match=r"Isource\.inj.*bad\.dss.*isource"):
        dk.load_feeder(master)


def test_malformed_case_and_missing_file(tmp_path):
    broken = tmp_path / "broken.dss"
    broken.write_text("New Line.l1 bus1=a bus2=b\n")          # no circuit
    with pytest.raises(FeederImportError, match="broken.dss"):
        dk.load_feeder(broken)
    with pytest.raises(FileNotFoundError, match="nowhere.dss"):
        dk.load_feeder(tmp_path / "nowhere.dss")


def test_pv_systems_are_reported_as_approximated(tmp_path):
    master = _write_case(tmp_path, "New Load.l bus1=b phases=3 kv=4.16 kw=300 kvar=100\n"
                                   "New Generator.g bus1=b phases=3 kv=4.16 kw=200 kvar=0 model=1")
    net = dk.load_feeder(master)
    report = net.feeder.report.to_frame()
    assert report.loc["generator.g", "status"] == "approximated"
    assert report.loc["load.l", "status"] == "exact"
