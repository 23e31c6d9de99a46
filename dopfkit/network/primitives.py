"""Primitive admittance matrices (siemens) of lines, capacitors and sources.

A primitive matrix relates the currents flowing *into* an element's conductors to the voltages of
the nodes they land on, terminal by terminal, in OpenDSS's conductor order. Assembling all of them
(:mod:`dopfkit.network.math_model`) gives the bus admittance matrix. Transformers live in
:mod:`dopfkit.network.transformer`.
"""
from __future__ import annotations

import numpy as np


def line_primitive(z: np.ndarray, c: np.ndarray, frequency: float) -> np.ndarray:
    """Pi model: series ``z`` (ohm) and shunt capacitance ``c`` (farad) split half to each end."""
    y = np.linalg.inv(z)
    ysh = 0.5j * 2 * np.pi * frequency * c
    return np.block([[y + ysh, -y], [-y, y + ysh]])


def lines_primitives(zs: np.ndarray, cs: np.ndarray, frequency: float) -> np.ndarray:
    """:func:`line_primitive` for a stack of same-size lines, in one batched inversion."""
    y = np.linalg.inv(zs)
    ysh = 0.5j * 2 * np.pi * frequency * cs
    return np.concatenate([np.concatenate([y + ysh, -y], axis=2),
                           np.concatenate([-y, y + ysh], axis=2)], axis=1)


EPSILON = 1e-12   # siemens OpenDSS keeps on diagonals so that an opened node never floats


def open_conductors(yprim: np.ndarray, is_open: np.ndarray) -> np.ndarray:
    """OpenDSS's rule for open conductors: their current is forced to zero.

    Each open conductor is Kron-reduced out of the primitive (one at a time, as OpenDSS does),
    its row and column zeroed with ``EPSILON`` left on its diagonal, and ``EPSILON`` added to every
    remaining diagonal so a switch opened at one end cannot leave a bus hanging.
    """
    opened = np.flatnonzero(is_open.ravel())
    if not opened.size:
        return yprim
    y = yprim.copy()
    kept = np.ones(len(y), bool)
    for k in opened:
        kept[k] = False
        ynn = y[k, k] if y[k, k] != 0 else EPSILON
        y[np.ix_(kept, kept)] -= np.outer(y[kept, k], y[k, kept]) / ynn
        y[k, :] = y[:, k] = 0
        y[k, k] = EPSILON
    y[kept, kept] += EPSILON
    return y


def shunt_pairs(phases: int, delta: bool) -> list[tuple[int, int]]:
    """Conductor pairs (from, to) that carry each phase of a shunt element.

    Wye: phase ``k`` to the neutral conductor (the element's last one). Delta: phase ``k`` to the
    next phase; a single-phase delta element sits between its two conductors.
    """
    if not delta:
        return [(k, phases) for k in range(phases)]
    if phases == 1:
        return [(0, 1)]
    if phases == 2:
        raise ValueError("two-phase delta elements are ambiguous; define them as two 1-phase loads")
    return [(k, (k + 1) % phases) for k in range(phases)]


def phase_voltage_base(kv: float, phases: int, delta: bool) -> float:
    """Volts across one phase of a load or capacitor rated ``kv`` (OpenDSS's convention)."""
    return kv * 1e3 if delta or phases == 1 else kv * 1e3 / np.sqrt(3)


def pairs_primitive(pairs: list[tuple[int, int]], y: np.ndarray | complex,
                    ncond: int) -> np.ndarray:
    """Primitive of admittances ``y`` (one per pair) each between conductors ``pairs[k]``."""
    i, j = np.asarray(pairs).T
    y = np.broadcast_to(y, i.shape)
    prim = np.zeros((ncond, ncond), complex)
    np.add.at(prim, (i, i), y)
    np.add.at(prim, (j, j), y)
    np.add.at(prim, (i, j), -y)
    np.add.at(prim, (j, i), -y)
    return prim


def capacitor_susceptance(kvar: float, kv: float, phases: int, delta: bool) -> float:
    """Susceptance (S) of one phase of a bank: ``Q_phase / V_phase**2``."""
    return kvar * 1e3 / phases / phase_voltage_base(kv, phases, delta) ** 2


def source_primitive(z: np.ndarray) -> np.ndarray:
    """Vsource: its series impedance between the bus (terminal 1) and the ideal EMF."""
    return np.linalg.inv(z)
