"""Engineering data model: the feeder as OpenDSS sees it, in OpenDSS units and names.

Every element keeps its OpenDSS name (``"line.650632"``, lower case) and, for each terminal, the bus
name and the bus nodes its conductors land on (node 0 is ground). Nothing here is per unit; the math
model (:mod:`dopfkit.network.math_model`) does that conversion in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dopfkit.network.primitives import shunt_pairs
from dopfkit.network.transformer import TransformerData

# OpenDSS load models 1, 2, 3, 5 as exponents of P and Q; model 4 takes its CVR factors
LOAD_EXPONENTS = {1: (0.0, 0.0), 2: (2.0, 2.0), 3: (0.0, 2.0), 5: (1.0, 1.0)}


@dataclass
class Element:
    name: str                      # "line.650632"
    buses: list[str]               # one bus name per terminal ("650")
    nodes: list[list[int]]         # conductor -> bus node, per terminal (0 = ground)

    @property
    def kind(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass
class Source(Element):
    """Thevenin source: internal voltage ``pu * kv_base`` behind a 3x3 impedance (ohm)."""
    kv_base: float = 0.0           # line-to-line kV
    pu: float = 1.0
    angle_deg: float = 0.0
    z: np.ndarray = field(default_factory=lambda: np.zeros((3, 3), complex))


@dataclass
class Line(Element):
    """Series impedance and shunt capacitance of the whole line (ohm and farad, all conductors)."""
    z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), complex))
    c: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    length: float = 0.0
    units: str = ""
    linecode: str = ""
    is_switch: bool = False
    open_conductors: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), bool))


@dataclass
class Capacitor(Element):
    """Shunt bank: terminal 1 on the bus, terminal 2 on the (usually grounded) neutral."""
    kvar: float = 0.0              # total in service (all steps closed)
    kv: float = 0.0
    delta: bool = False
    phases: int = 3

    def pairs(self) -> list[tuple[int, int]]:
        """Conductor pairs (index into the concatenated terminal nodes) that carry each phase."""
        if self.delta and self.phases > 1:
            return shunt_pairs(self.phases, True)
        return [(k, self.phases + k) for k in range(self.phases)]


@dataclass
class Load(Element):
    """A load or a fixed injection (generators, PV: negative ``kw``)."""
    phases: int = 1
    delta: bool = False
    kw: float = 0.0                # total, already multiplied by the snapshot's load multiplier
    kvar: float = 0.0
    kv: float = 0.0                # OpenDSS rating: line-line for 2- and 3-phase and delta
    model: int = 1                 # OpenDSS load model (1 PQ, 2 Z, 5 |I|, 8 ZIP)
    vminpu: float = 0.95
    vmaxpu: float = 1.05
    vlowpu: float = 0.5            # below it OpenDSS models PQ and |I| loads as impedances
    zipv: tuple[float, ...] = ()
    cvr: tuple[float, float] = (1.0, 2.0)  # model 4 exponents of P and Q (CVRwatts, CVRvars)
    fixed: bool = False            # OpenDSS status=fixed: load multipliers do not scale it
    phase_kva: tuple[complex, ...] = ()  # nominal kVA of each phase where they differ (DERs)

    def pairs(self) -> list[tuple[int, int]]:
        return shunt_pairs(self.phases, self.delta)

    def exponents(self) -> tuple[float, float]:
        """Voltage exponents (a, b) of P and Q inside the band: S(v) = P v**a + j Q v**b."""
        return self.cvr if self.model == 4 else LOAD_EXPONENTS.get(self.model, (0.0, 0.0))


@dataclass
class Shunt(Element):
    """Any other element given by its OpenDSS primitive admittance (siemens), e.g. reactors."""
    yprim: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), complex))


@dataclass
class Feeder:
    """The engineering model: everything needed to rebuild the snapshot OpenDSS solved."""
    name: str
    master: str
    frequency: float
    kv_base: dict[str, float]      # bus -> line-to-neutral kV base
    bus_nodes: list[str]           # OpenDSS node names in OpenDSS order ("650.1")
    bus_xy: dict[str, tuple[float, float]]
    sources: list[Source]
    lines: list[Line]
    transformers: list[TransformerData]
    capacitors: list[Capacitor]
    loads: list[Load]
    shunts: list[Shunt]
    report: ImportReport
    opendss_tolerance: float = 1e-10   # tolerance OpenDSS converged to on this snapshot

    def summary(self) -> dict[str, int]:
        return {"buses": len(self.kv_base), "nodes": len(self.bus_nodes), "lines": len(self.lines),
                "switches": sum(ln.is_switch for ln in self.lines),
                "transformers": len(self.transformers), "capacitors": len(self.capacitors),
                "loads": sum(ld.kw >= 0 for ld in self.loads),
                "injections": sum(ld.kw < 0 for ld in self.loads)}


from dopfkit.network.report import ImportReport  # noqa: E402  (type used above)
