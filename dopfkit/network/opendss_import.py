"""Read an OpenDSS case into the engineering model through opendssdirect.py.

The case is compiled and solved once in OpenDSS, with its controls active, so that regulator taps and
capacitor states are those of the snapshot a utility would see; dopfkit then freezes them. Every
element ends up in the import report: exact, approximated (and how), frozen, ignored, or an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import opendssdirect as dss

from dopfkit.network.engineering import Capacitor, Feeder, Line, Load, Shunt, Source
from dopfkit.network.primitives import phase_voltage_base, shunt_pairs
from dopfkit.network.report import APPROXIMATED, EXACT, FROZEN, IGNORED, FeederImportError, ImportReport
from dopfkit.network.transformer import read_transformer

# km per OpenDSS length unit code (none, mi, kft, km, m, ft, in, cm, mm)
KM_PER_UNIT = {0: 1.0, 1: 1.609344, 2: 0.3048, 3: 1.0, 4: 1e-3, 5: 0.3048e-3, 6: 0.0254e-3,
               7: 1e-5, 8: 1e-6}
UNIT_NAMES = {0: "none", 1: "mi", 2: "kft", 3: "km", 4: "m", 5: "ft", 6: "in", 7: "cm", 8: "mm"}

CONTROLS = {"regcontrol": "tap frozen at the snapshot solved by OpenDSS",
            "capcontrol": "capacitor state frozen at the snapshot solved by OpenDSS",
            "swtcontrol": "switch state frozen at the snapshot", "invcontrol": None}
NO_STEADY_STATE_EFFECT = {"energymeter": "measurement only", "monitor": "measurement only",
                          "fuse": "protection, closed in steady state",
                          "recloser": "protection, closed in steady state",
                          "relay": "protection, closed in steady state"}
SUPPORTED_LOAD_MODELS = {1: "constant PQ", 2: "constant Z", 3: "constant P, quadratic Q",
                         4: "CVR exponential", 5: "constant |I|", 8: "ZIP"}


def compile_case(master: str | Path) -> None:
    """Compile an OpenDSS master file into the (single, global) OpenDSS engine."""
    master = Path(master)
    if not master.is_file():
        raise FileNotFoundError(f"OpenDSS master file not found: {master}")
    dss.Text.Command("Clear")
    cwd = os.getcwd()                      # OpenDSS moves into the master's folder: move back
    try:
        dss.Text.Command(f'Compile "{master.resolve()}"')
    except Exception as exc:  # opendssdirect raises DSSException with OpenDSS's own message
        raise FeederImportError(f"OpenDSS could not compile {master}: {exc}") from exc
    finally:
        os.chdir(cwd)
    if not dss.Circuit.Name():
        raise FeederImportError(f"{master} defines no circuit (no 'New Circuit.' line)")


def solve_snapshot(master: str | Path, tolerance: float = 1e-10) -> float:
    """Solve with controls (taps, capacitors move), then again with controls frozen, tightly.

    Returns the tolerance OpenDSS reached: ``tolerance`` if it converges there, else the tightest
    of 1e-8 ... 1e-4 it does converge to (IEEE 9500's inverter models stall near 1e-5).
    """
    dss.Text.Command("Set Mode=Snapshot")
    dss.Text.Command("Set MaxIterations=100")
    dss.Text.Command("Set MaxControlIter=100")
    dss.Text.Command("Solve")
    if not dss.Solution.Converged():
        raise FeederImportError(f"OpenDSS did not converge on the snapshot of {master}")
    dss.Text.Command("Set ControlMode=Off")
    for tol in [tolerance] + [t for t in (1e-8, 1e-6, 1e-5, 1e-4) if t > tolerance]:
        dss.Text.Command(f"Set Tolerance={tol}")
        dss.Text.Command("Solve")
        if dss.Solution.Converged():
            return tol
    raise FeederImportError(f"OpenDSS did not converge on the snapshot of {master} with controls "
                            "frozen, even at tolerance 1e-4")


def _complex_matrix(flat) -> np.ndarray:
    a = np.asarray(flat, float)
    c = a[0::2] + 1j * a[1::2]
    k = int(round(np.sqrt(c.size)))
    return c.reshape(k, k)


def _terminals() -> tuple[list[str], list[list[int]]]:
    """Bus names and conductor nodes of the active element, per terminal."""
    buses = [b.split(".")[0].lower() for b in dss.CktElement.BusNames()]
    order = np.asarray(dss.CktElement.NodeOrder(), int).reshape(len(buses), -1)
    return buses, order.tolist()


def _open_conductors(nterm: int, ncond: int) -> np.ndarray:
    return np.array([[dss.CktElement.IsOpen(t + 1, c + 1) for c in range(ncond)]
                     for t in range(nterm)], bool)


def _matrix(values, n: int) -> np.ndarray:
    return np.asarray(values, float).reshape(n, n)


def _read_lines(report: ImportReport) -> list[Line]:
    lines = []
    for _ in _each(dss.Lines):
        name = "line." + dss.Lines.Name().lower()
        buses, nodes = _terminals()
        n = dss.Lines.Phases()
        length, unit = dss.Lines.Length(), dss.Lines.Units()
        r, x = _matrix(dss.Lines.RMatrix(), n), _matrix(dss.Lines.XMatrix(), n)
        c_nf = _matrix(dss.Lines.CMatrix(), n)
        open_ = _open_conductors(2, len(nodes[0]))
        if len(nodes[0]) != n:
            raise FeederImportError(f"{name}: {len(nodes[0])} conductors but {n} phases; lines "
                                    "with explicit neutral conductors are not supported")
        lines.append(Line(name, buses, nodes, z=(r + 1j * x) * length, c=c_nf * 1e-9 * length,
                          length=length * KM_PER_UNIT[unit], units=UNIT_NAMES[unit],
                          linecode=dss.Lines.LineCode().lower(), is_switch=dss.Lines.IsSwitch(),
                          open_conductors=open_))
        how = "3x3 series impedance and shunt capacitance"
        if open_.any():
            how += f"; open at terminal(s) {sorted(set(np.argwhere(open_)[:, 0] + 1))} (zero current)"
        report.add(name, EXACT, how)
    return lines


def _read_capacitors(report: ImportReport) -> list[Capacitor]:
    caps = []
    for _ in _each(dss.Capacitors):
        name = "capacitor." + dss.Capacitors.Name().lower()
        buses, nodes = _terminals()
        states = np.asarray(dss.Capacitors.States(), int)
        kvar = dss.Capacitors.kvar() * states.mean()
        r_xl = [_floats(dss.Properties.Value(p)) for p in ("R", "XL")]
        if any(any(v) for v in r_xl):
            raise FeederImportError(f"{name}: series R/XL in capacitors is not supported")
        caps.append(Capacitor(name, buses, nodes, kvar=kvar, kv=dss.Capacitors.kV(),
                              delta=dss.Capacitors.IsDelta(), phases=dss.CktElement.NumPhases()))
        report.add(name, FROZEN if states.size > 1 or dss.CktElement.HasVoltControl() else EXACT,
                   f"shunt susceptance, {int(states.sum())}/{states.size} steps in service")
    return caps


def _read_loads(report: ImportReport, master: str) -> list[Load]:
    loads, loadmult = [], dss.Solution.LoadMult()
    for _ in _each(dss.Loads):
        name = "load." + dss.Loads.Name().lower()
        model = dss.Loads.Model()
        if model not in SUPPORTED_LOAD_MODELS:
            raise FeederImportError(f"{name} in {master}: OpenDSS load model {model} is not "
                                    f"supported (supported: {SUPPORTED_LOAD_MODELS})")
        buses, nodes = _terminals()
        fixed = dss.Loads.Status() == 1                        # status=fixed ignores loadmult
        mult = 1.0 if fixed else loadmult
        loads.append(Load(name, buses, nodes, phases=dss.Loads.Phases(),
                          delta=dss.Loads.IsDelta(), kw=dss.Loads.kW() * mult,
                          kvar=dss.Loads.kvar() * mult, kv=dss.Loads.kV(), model=model,
                          vminpu=dss.Loads.Vminpu(), vmaxpu=dss.Loads.Vmaxpu(),
                          vlowpu=float(dss.Properties.Value("vlowpu")), zipv=tuple(dss.Loads.ZipV()),
                          cvr=(dss.Loads.CVRwatts(), dss.Loads.CVRvars()), fixed=fixed))
        report.add(name, EXACT, f"{SUPPORTED_LOAD_MODELS[model]} "
                                f"(constant Z outside [{dss.Loads.Vminpu():g}, {dss.Loads.Vmaxpu():g}] pu)"
                   if model == 1 else SUPPORTED_LOAD_MODELS[model])
    return loads


def _injection_from_solution(name: str) -> tuple[Load, str]:
    """A generator, PV system or storage unit frozen at the snapshot as OpenDSS's generator model 1.

    Constant P, Q inside [Vminpu, Vmaxpu], constant impedance outside: the nominal value is what
    each phase delivered in the snapshot, rescaled on phases that ran in impedance mode so that the
    impedance draws it at the snapshot's voltage (IEEE 9500's batteries, rated 12.47 kV on a 480 V
    bus, all do). A three-phase delta element's branch currents cannot be told apart from
    its terminals (a circulating current is invisible), so its phases share the total equally.
    Returns the element and how it was represented, for the import report.
    """
    buses, nodes = _terminals()
    phases, delta = dss.CktElement.NumPhases(), _property(name, "conn").lower().startswith("d")
    kv, vmin, vmax = (float(_property(name, p)) for p in ("kV", "Vminpu", "Vmaxpu"))
    v = np.asarray(dss.CktElement.Voltages(), float).reshape(-1, 2) @ [1, 1j]
    i = np.asarray(dss.CktElement.Currents(), float).reshape(-1, 2) @ [1, 1j]
    how = ("constant P, Q at the snapshot's output (impedance outside [Vminpu, Vmaxpu]); "
           "inverter controls not modelled")
    if name.startswith("generator.") and _property(name, "model").strip() == "3":
        # OpenDSS reports a PV-mode generator's vars after one more update than its voltages were
        # solved with (IEEE 9500's steam unit: 1 % of its current); the network saw the rest
        mismatch = _kcl_mismatch(buses[0], nodes[0])
        i[: len(mismatch)] -= mismatch
        dss.Circuit.SetActiveElement(name)
        how = ("PV-mode generator (model 3) frozen at the P, Q its bus received in the snapshot "
               f"(Kirchhoff's current law there; OpenDSS's report is off by "
               f"{np.abs(mismatch).max():.3g} A)")
    pairs = shunt_pairs(phases, delta)
    u = np.array([v[a] - (v[b] if b < len(v) else 0) for a, b in pairs])
    if delta and phases > 1:
        s_pair = np.full(len(pairs), (v[:phases] * np.conj(i[:phases])).sum() / len(pairs))
    else:
        s_pair = u * np.conj(i[[a for a, _ in pairs]])
    vpu = np.abs(u) / phase_voltage_base(kv, phases, delta)
    # outside the band the model is the impedance that draws the nominal power at the band's edge
    edge = np.where(vpu <= vmin, vmin, np.where(vpu > vmax, vmax, vpu))
    s_nom = s_pair * (edge / vpu) ** 2 / 1e3   # kVA
    total = s_nom.sum()
    return Load(name, buses, nodes, phases=phases, delta=delta, kw=total.real, kvar=total.imag,
                kv=kv, model=1, vminpu=vmin, vmaxpu=vmax, vlowpu=0.0, fixed=True,
                phase_kva=tuple(s_nom)), how


def node_currents() -> list[tuple[str, complex]]:
    """(``"bus.node"``, current in A drawn from that node) for every ungrounded conductor of the
    active element: what a Kirchhoff's-law check adds up."""
    buses, nodes = _terminals()
    current = np.asarray(dss.CktElement.Currents(), float).reshape(len(buses), -1, 2) @ [1, 1j]
    return [(f"{b}.{n}", c) for b, ns, cs in zip(buses, nodes, current)
            for n, c in zip(ns, cs) if n != 0]


def _kcl_mismatch(bus: str, conductor_nodes) -> np.ndarray:
    """Sum of the currents (A) every element at ``bus`` draws from each of the given nodes: zero in
    a consistent solution. Changes the active element."""
    index = {f"{bus}.{n}": k for k, n in enumerate(conductor_nodes) if n != 0}
    total = np.zeros(len(conductor_nodes), complex)
    dss.Circuit.SetActiveBus(bus)
    for element in list(dss.Bus.AllPCEatBus()) + list(dss.Bus.AllPDEatBus()):
        dss.Circuit.SetActiveElement(element)
        for node, c in node_currents():
            if node in index:
                total[index[node]] += c
    return total


def _floats(text: str) -> list[float]:
    """Numbers in an OpenDSS property value such as ``"[ 0 0]"``."""
    return [float(x) for x in text.strip("[]() ").replace(",", " ").split()]


def _property(element: str, prop: str) -> str:
    dss.Text.Command(f"? {element}.{prop}")
    return dss.Text.Result()


def _each(iface):
    """Iterate an opendssdirect class interface (First/Next), activating each element."""
    i = iface.First()
    while i > 0:
        yield i
        i = iface.Next()


def _read_buses() -> tuple[dict, dict]:
    kv, xy = {}, {}
    for bus in dss.Circuit.AllBusNames():
        dss.Circuit.SetActiveBus(bus)
        kv[bus.lower()] = dss.Bus.kVBase()
        if dss.Bus.Coorddefined():
            xy[bus.lower()] = (dss.Bus.X(), dss.Bus.Y())
    return kv, xy


def read_feeder(master: str | Path, name: str | None = None) -> Feeder:
    """Compile, solve once, and read the whole case into a :class:`Feeder`."""
    master = str(master)
    compile_case(master)
    opendss_tolerance = solve_snapshot(master)
    report = ImportReport(master)
    kv_base, bus_xy = _read_buses()
    missing = [b for b, v in kv_base.items() if v <= 0]
    if missing:
        raise FeederImportError(f"{master}: buses without a voltage base {missing[:10]} "
                                "(add them to 'Set voltagebases' and 'CalcVoltageBases')")

    sources, transformers, shunts, others = [], [], [], []
    for element in dss.Circuit.AllElementNames():
        ename = element.lower()
        kind = ename.split(".")[0]
        dss.Circuit.SetActiveElement(element)
        if not dss.CktElement.Enabled():               # class iterators skip these: report here
            report.add(ename, IGNORED, "disabled in the case")
        elif kind in ("line", "load", "capacitor"):
            continue                                   # read below, class by class
        elif kind == "vsource":
            buses, nodes = _terminals()
            y = _complex_matrix(dss.CktElement.YPrim())
            n = len(nodes[0])
            sources.append(Source(ename, buses[:1], nodes[:1], kv_base=dss.Vsources.BasekV(),
                                  pu=dss.Vsources.PU(), angle_deg=dss.Vsources.AngleDeg(),
                                  z=np.linalg.inv(y[:n, :n])))
            report.add(ename, EXACT, "Thevenin equivalent: voltage behind its 3x3 impedance")
        elif kind == "transformer":
            transformers.append(read_transformer(dss, ename.split(".", 1)[1]))
            report.add(ename, EXACT, "winding model with the snapshot's taps")
        elif kind in ("generator", "pvsystem", "storage"):
            injection, how = _injection_from_solution(ename)
            others.append(injection)
            report.add(ename, APPROXIMATED, how)
        elif kind == "reactor":
            buses, nodes = _terminals()
            shunts.append(Shunt(ename, buses, nodes, yprim=_complex_matrix(dss.CktElement.YPrim())))
            report.add(ename, EXACT, "OpenDSS primitive admittance")
        elif kind in CONTROLS and CONTROLS[kind]:
            report.add(ename, FROZEN, CONTROLS[kind])
        elif kind in NO_STEADY_STATE_EFFECT:
            report.add(ename, IGNORED, NO_STEADY_STATE_EFFECT[kind])
        else:
            raise FeederImportError(f"{element} in {master}: element class '{kind}' is not "
                                    "supported by dopfkit's importer")
    lines = _read_lines(report)
    capacitors = _read_capacitors(report)
    loads = _read_loads(report, master) + others
    if not sources:
        raise FeederImportError(f"{master}: no enabled Vsource")
    return Feeder(name=name or Path(master).stem.lower(), master=master,
                  frequency=dss.Solution.Frequency(), kv_base=kv_base,
                  bus_nodes=[n.lower() for n in dss.Circuit.AllNodeNames()], bus_xy=bus_xy,
                  sources=sources, lines=lines,
                  transformers=transformers, capacitors=capacitors, loads=loads, shunts=shunts,
                  report=report, opendss_tolerance=opendss_tolerance)
