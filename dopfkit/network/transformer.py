"""Transformer primitive admittance matrices, computed from winding data.

OpenDSS models an ``n``-winding, ``p``-phase transformer as ``p`` identical
single-phase ``n``-winding units.  Each single-phase unit is built in three
steps (OpenDSS ``Transformer.pas``: ``CalcY_Terminal``, ``BuildYPrimComponent``,
``AddNeutralToY``):

1. *Short-circuit model on a one-volt base.*  The pairwise short-circuit
   impedances ``Z_ij = (R_i + R_j) + j X_ij`` (per unit on winding 1's
   per-phase VA base) give the ``(n-1) x (n-1)`` matrix ``ZB`` of the
   windings 2..n seen from winding 1 with winding 1 shorted.  Its inverse,
   pushed through the voltage-difference incidence ``A = [-1 | I]``, yields
   the ``n x n`` winding admittance ``Y_1V = A^T ZB^-1 A`` in siemens on a 1 V
   base (every winding has one "turn").  The no-load branch (%noloadloss
   conductance, %imag susceptance) is a separate ``n x n`` matrix with a
   single entry on winding 2, the winding assumed closest to the core.

2. *Terminal model.*  Each winding is a two-terminal coil; the coil voltage
   ``v_k = (V_k1 - V_k2) / (VBase_k * tap_k)`` in per-volt turns, so
   ``Y_term = B^T Y_1V B`` with ``B[k, 2k] = -B[k, 2k+1] = 1/(VBase_k tap_k)``
   (order ``2n``).  A tiny inductive admittance ("ppm_antifloat", 1 ppm of
   the winding's base admittance by default, split half on each coil end) is
   added to both coil ends so the system Y stays invertible even when a
   winding floats (e.g. delta-delta banks with no ground reference, IEEE 37).

3. *Placement in YPrim.*  Each terminal of the element has ``p + 1``
   conductors: ``p`` phases plus a neutral slot.  A wye coil of phase ``i``
   runs from conductor ``i`` to the neutral conductor ``p + 1``; a delta coil
   runs from conductor ``i`` to the next phase in sequence (direction set by
   the ANSI lag / lead rule), so the neutral slot of a delta winding stays
   empty.  Single-phase units simply use conductors 1 and 2 of every
   terminal.  The same ``Y_term`` is added once per phase.  Finally, for wye
   windings, the neutral conductor gets either the grounding admittance
   ``1/(Rneut + j Xneut)`` (``Rneut >= 0``; 1e6 S if solidly grounded) or, if
   the neutral is open (``Rneut < 0``, the default), another anti-float
   shunt.

YPrim is ordered terminal by terminal (winding 1 conductors, then winding 2,
...), which matches ``CktElement.NodeOrder()`` / ``CktElement.YPrim()``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "WindingData",
    "TransformerData",
    "read_transformer",
    "read_all_transformers",
    "transformer_primitive",
    "opendss_yprim",
]


@dataclass
class WindingData:
    """One winding as OpenDSS holds it (values in OpenDSS's input units)."""

    bus: str  # bus spec as connected, e.g. "x2804253a.0.2"
    nodes: tuple[int, ...]  # phases + 1 node numbers of this terminal (NodeOrder)
    conn: str  # "wye" or "delta"
    kv: float  # rated kV (line-line for 2-/3-phase, winding kV for 1-phase)
    kva: float  # rated kVA
    r_pct: float  # %R, on winding 1's kVA base
    tap: float = 1.0  # per-unit tap (present value, after RegControls moved it)
    rneut: float = -1.0  # neutral resistance, ohm; < 0 means open neutral
    xneut: float = 0.0  # neutral reactance, ohm (at base frequency)

    @property
    def bus_name(self) -> str:
        """Bus name without node suffixes."""
        return self.bus.split(".", 1)[0]


@dataclass
class TransformerData:
    """Everything needed to rebuild an OpenDSS transformer's YPrim."""

    name: str
    phases: int
    windings: list[WindingData]
    xsc_pct: tuple[float, ...]  # %X for pairs 12, 13, ..., 1n, 23, ... (n(n-1)/2)
    pct_imag: float = 0.0  # magnetizing current, % of winding-1 rated current
    pct_noloadloss: float = 0.0  # core loss, % of winding-1 kVA
    ppm_antifloat: float = 1.0  # anti-float shunt, parts per million
    hv_leads_lv: bool = False  # LeadLag=Lead (Euro); default ANSI: HV delta leads
    xr_const: bool = False  # scale R with frequency too (XRConst=yes)
    base_frequency: float = 60.0
    frequency: float = 60.0  # solution frequency the matrix is built for
    xhl: float = 7.0  # informational (percent); xsc_pct is what is used
    xht: float = 35.0
    xlt: float = 30.0
    enabled: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def n_windings(self) -> int:
        return len(self.windings)

    @property
    def n_conductors(self) -> int:
        """Conductors per terminal: the phases plus one neutral slot."""
        return self.phases + 1

    @property
    def node_order(self) -> list[int]:
        return [n for w in self.windings for n in w.nodes]


# ---------------------------------------------------------------------------
# Reading from opendssdirect
# ---------------------------------------------------------------------------

_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _prop(dss, name: str) -> str:
    return dss.Properties.Value(name)


def _floats(text: str) -> list[float]:
    return [float(x) for x in _NUM.findall(text)]


def _yes(text: str) -> bool:
    return text.strip().lower() in ("yes", "true", "y", "t", "1")


def read_transformer(dss, name: str) -> TransformerData:
    """Read transformer ``name`` from the live OpenDSS circuit.

    Call after ``Solve`` if regulators are present: the present taps (moved
    by RegControls) are what OpenDSS's YPrim uses.
    """
    dss.Transformers.Name(name)
    dss.Circuit.SetActiveElement("Transformer." + name)
    nph = int(dss.CktElement.NumPhases())
    nw = int(dss.Transformers.NumWindings())
    ncond = int(dss.CktElement.NumConductors())
    buses = list(dss.CktElement.BusNames())
    order = list(dss.CktElement.NodeOrder())
    windings = []
    for k in range(nw):
        dss.Transformers.Wdg(k + 1)
        windings.append(
            WindingData(
                bus=buses[k],
                nodes=tuple(int(n) for n in order[k * ncond : (k + 1) * ncond]),
                conn="delta" if dss.Transformers.IsDelta() else "wye",
                kv=float(dss.Transformers.kV()),
                kva=float(dss.Transformers.kVA()),
                r_pct=float(dss.Transformers.R()),
                tap=float(dss.Transformers.Tap()),
                rneut=float(dss.Transformers.Rneut()),
                xneut=float(dss.Transformers.Xneut()),
            )
        )
    # Properties not exposed by the Transformers interface come back as text
    # with round-trip (17 significant digit) precision.
    xsc = _floats(_prop(dss, "XSCArray"))
    if len(xsc) != nw * (nw - 1) // 2:
        raise ValueError(f"Transformer.{name}: unexpected Xscarray {xsc}")
    return TransformerData(
        name=name,
        phases=nph,
        windings=windings,
        xsc_pct=tuple(xsc),
        pct_imag=float(_prop(dss, "%IMag")),
        pct_noloadloss=float(_prop(dss, "%NoLoadLoss")),
        ppm_antifloat=float(_prop(dss, "ppm_Antifloat")),
        hv_leads_lv=_prop(dss, "LeadLag").strip().lower() in ("lead", "euro"),
        xr_const=_yes(_prop(dss, "XRConst")),
        base_frequency=float(_prop(dss, "BaseFreq")),
        frequency=float(dss.Solution.Frequency()),
        xhl=float(dss.Transformers.Xhl()),
        xht=float(dss.Transformers.Xht()),
        xlt=float(dss.Transformers.Xlt()),
        enabled=bool(dss.CktElement.Enabled()),
        extra={"xfmrcode": dss.Transformers.XfmrCode()},
    )


def read_all_transformers(dss) -> list[TransformerData]:
    """Every transformer of the active circuit, in OpenDSS's order."""
    return [read_transformer(dss, n) for n in dss.Transformers.AllNames()]


def opendss_yprim(dss, name: str) -> np.ndarray:
    """OpenDSS's own YPrim of ``Transformer.name`` as a complex square array."""
    dss.Circuit.SetActiveElement("Transformer." + name)
    y = np.asarray(dss.CktElement.YPrim(), dtype=float)
    y = y[0::2] + 1j * y[1::2]
    n = int(round(math.sqrt(y.size)))
    return y.reshape(n, n)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def winding_vbase(t: TransformerData) -> np.ndarray:
    """Coil voltage base of each winding in volts.

    A wye winding of a 2- or 3-phase bank is rated line-line, so its coil
    sees kV/sqrt(3); delta coils and single-phase windings see the rated kV.
    """
    kv = np.array([w.kv for w in t.windings])
    wye = np.array([w.conn == "wye" for w in t.windings])
    if t.phases in (2, 3):
        return np.where(wye, kv * (1000.0 / math.sqrt(3.0)), kv * 1000.0)
    return kv * 1000.0


def _va_per_phase(t: TransformerData) -> float:
    """All per-unit data are on winding 1's kVA, split over the phases."""
    return t.windings[0].kva * 1000.0 / t.phases


def short_circuit_matrix(t: TransformerData, fmult: float) -> np.ndarray:
    """ZB: windings 2..n against winding 1, ohms on a 1-volt base.

    Diagonal: Z_1k; off-diagonal: (Z_1i + Z_1j - Z_ij) / 2, the usual
    reduction of pairwise short-circuit tests to a common reference winding.
    """
    n = t.n_windings
    zbase = 1.0 / _va_per_phase(t)
    rmult = fmult if t.xr_const else 1.0
    r = np.array([w.r_pct for w in t.windings]) / 100.0
    x = np.zeros((n, n))
    iu, ju = np.triu_indices(n, 1)  # same pair order as OpenDSS's Xsc array
    x[iu, ju] = np.asarray(t.xsc_pct, dtype=float) / 100.0
    x = x + x.T
    zpair = (rmult * (r[:, None] + r[None, :]) + 1j * fmult * x) * zbase
    z1 = zpair[0, 1:]
    zb = 0.5 * (z1[:, None] + z1[None, :] - zpair[1:, 1:])
    np.fill_diagonal(zb, z1)
    return zb


def one_volt_admittance(t: TransformerData, fmult: float) -> tuple[np.ndarray, np.ndarray]:
    """Series and no-load winding admittances (n x n) on a 1-volt base.

    Series part: A^T ZB^-1 A with A = [-1 | I], i.e. the current that flows
    into each winding for unit turn voltages.  No-load part: core loss
    conductance and magnetizing susceptance lumped on winding 2.
    """
    n = t.n_windings
    zb = short_circuit_matrix(t, fmult)
    a = np.hstack([-np.ones((n - 1, 1)), np.eye(n - 1)])
    y1 = a.T @ np.linalg.inv(zb) @ a
    ynl = np.zeros((n, n), dtype=complex)
    s1 = _va_per_phase(t)  # 1 / Zbase on a 1-volt base
    ynl[1, 1] = s1 * (t.pct_noloadloss / 100.0 - 1j * t.pct_imag / 100.0 / fmult)
    return y1, ynl


def antifloat_admittance(t: TransformerData) -> np.ndarray:
    """Per-winding anti-float admittance Y_PPM (imaginary part, siemens).

    ppm of the winding's base admittance, halved because it goes on each of
    the winding's two coil ends.  Negative sign: a tiny inductive shunt.
    """
    vb = winding_vbase(t)
    return -(t.ppm_antifloat * 1e-6) / (vb**2 / _va_per_phase(t)) / 2.0


def terminal_admittance(t: TransformerData, fmult: float) -> tuple[np.ndarray, np.ndarray]:
    """Y_term (2n x 2n) for one phase: coil ends of every winding.

    The coil voltage is (V_start - V_end) / (VBase * tap), so the tap simply
    scales the winding's turns; a zero tap is replaced by 1e-4 as OpenDSS
    does (RegControls may try to force it).
    """
    n = t.n_windings
    tap = np.array([w.tap for w in t.windings])
    tap = np.where(tap == 0.0, 0.0001, tap)
    turns = 1.0 / (winding_vbase(t) * tap)
    b = np.zeros((n, 2 * n))
    b[np.arange(n), 2 * np.arange(n)] = turns
    b[np.arange(n), 2 * np.arange(n) + 1] = -turns
    y1, ynl = one_volt_admittance(t, fmult)
    yterm = b.T @ y1 @ b
    ytnl = b.T @ ynl @ b
    if t.ppm_antifloat != 0.0:
        yterm[np.diag_indices(2 * n)] += 1j * np.repeat(antifloat_admittance(t), 2)
    return yterm, ytnl


def delta_direction(t: TransformerData) -> int:
    """+1 / -1: which neighbouring phase a delta coil connects to.

    ANSI (LeadLag=Lag): in a wye-delta bank the LV side lags the HV side by
    30 degrees.  Only windings 1 and 2 decide, as in OpenDSS.
    """
    w1, w2 = t.windings[0], t.windings[1]
    if w1.conn == w2.conn:
        return 1
    hv = w1 if w1.kv >= w2.kv else w2
    if hv.conn == "wye":
        return -1 if t.hv_leads_lv else 1
    return 1 if t.hv_leads_lv else -1


def terminal_map(t: TransformerData) -> np.ndarray:
    """(phases, 2n) conductor index (0-based into YPrim) of each coil end."""
    p, n, nc = t.phases, t.n_windings, t.n_conductors
    tm = np.zeros((p, 2 * n), dtype=int)
    if p == 1:
        # a single-phase unit: coil between conductor 1 and 2 of each terminal
        tm[0, 0::2] = np.arange(n) * nc
        tm[0, 1::2] = np.arange(n) * nc + 1
        return tm
    d = delta_direction(t)
    for j, w in enumerate(t.windings):
        for i in range(1, p + 1):
            if w.conn == "wye":
                other = nc  # the neutral slot
            else:
                other = i + d
                if p > 2:
                    other = 1 if other > p else (p if other < 1 else other)
                elif other < 1:
                    other = 3  # 2-phase (open) delta closes on the 3rd slot
            tm[i - 1, 2 * j] = j * nc + i - 1
            tm[i - 1, 2 * j + 1] = j * nc + other - 1
    return tm


def _place(y: np.ndarray, yterm: np.ndarray, tm: np.ndarray) -> None:
    """Add yterm once per phase at the conductors in tm (OpenDSS AddElemSym).

    Walk the lower triangle; mirror entries off the YPrim diagonal only, so
    two coil ends landing on one conductor are not double counted.
    """
    ii, jj = np.tril_indices(yterm.shape[0])
    vals = yterm[ii, jj]
    r, c = tm[:, ii].ravel(), tm[:, jj].ravel()
    v = np.tile(vals, tm.shape[0])
    np.add.at(y, (r, c), v)
    off = r != c
    np.add.at(y, (c[off], r[off]), v[off])


def add_neutral(t: TransformerData, y: np.ndarray, fmult: float) -> None:
    """Ground (or anti-float) the neutral conductor of each wye winding.

    Rneut >= 0 grounds it (1e6 S when Rneut = Xneut = 0); the default open
    neutral (Rneut < 0) gets the anti-float shunt so it is never floating.
    Delta windings' neutral slots are left untouched.
    """
    yppm = antifloat_admittance(t)
    nc = t.n_conductors
    for k, w in enumerate(t.windings):
        if w.conn != "wye":
            continue
        j = (k + 1) * nc - 1
        if w.rneut >= 0:
            if w.rneut == 0 and w.xneut == 0:
                y[j, j] += 1.0e6
            else:
                y[j, j] += 1.0 / complex(w.rneut, w.xneut * fmult)
        elif t.ppm_antifloat != 0.0:
            y[j, j] += 1j * yppm[k]


def transformer_primitive(t: TransformerData, frequency: float | None = None) -> np.ndarray:
    """Complex YPrim (siemens) in OpenDSS terminal/conductor order.

    Order = n_windings * (phases + 1); matches ``CktElement.YPrim()``.
    """
    f = t.frequency if frequency is None else frequency
    fmult = f / t.base_frequency
    order = t.n_windings * t.n_conductors
    y = np.zeros((order, order), dtype=complex)
    yterm, ytnl = terminal_admittance(t, fmult)
    tm = terminal_map(t)
    _place(y, yterm, tm)  # series part (incl. coil-end anti-float)
    add_neutral(t, y, fmult)
    _place(y, ytnl, tm)  # no-load (shunt) part
    return y
