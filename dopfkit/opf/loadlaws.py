"""OpenDSS's load laws as functions of the squared pair voltage, for the optimization models.

A load pair draws ``S = S_nom F(x)`` with ``x = (|u| / v_nom)^2`` (``u``: the voltage across the pair,
``v_nom``: its rating). Inside its ``vminpu..vmaxpu`` band ``F(x) = x^(e/2)`` for models 1-5
(exponent ``e``: 0 constant power, 1 constant current, 2 constant impedance, model 4's CVR factors)
and ``F(x) = z x + i sqrt(x) + p`` for ZIP (model 8). Outside it OpenDSS turns the load into an
impedance, and below ``vminpu`` blends it towards the nominal admittance at ``vlowpu``
(:mod:`dopfkit.powerflow.loads`, which the exact power flow uses); in ``v = sqrt(x)`` every regime is
again a polynomial (:func:`regime_terms`). The nonlinear OPF uses the polynomials as they are; the
linear and conic models use their tangent at an operating point (:func:`linearized_loads`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from dopfkit.powerflow.loads import I_MODEL, Z_MODEL, ZIP_MODEL

BAND, ABOVE, BELOW, LOW = "band", "above", "below", "low"     # a load's regime (OpenDSS's names)


def load_laws(ld: pd.DataFrame, regimes=None) -> list[tuple[list, list]]:
    """(terms of P, terms of Q) per load pair: [(coefficient, exponent of v), ...]; ``regimes``
    (one per pair, default all ``"band"``) picks OpenDSS's law inside or outside the band."""
    regimes = [BAND] * len(ld) if regimes is None else regimes
    return [regime_terms(row, regime) for row, regime in zip(ld.itertuples(), regimes)]


def regime_terms(row, regime: str) -> tuple[list, list]:
    """S / S_nom as sum c v^e in each regime, ``v`` = pair voltage / rated. Outside the band a load
    draws ``i = y_eq u f(v)`` (dopfkit.powerflow.loads), so ``S = v^2 f(v)``: above ``vmax``
    ``f = 1/vmax^2`` (``1/vmax`` for constant current); between ``vlow`` and ``vmin`` the current's
    magnitude is linear in ``v``, ``v f = vlow + slope (v - vlow)``; below ``vlow``, ``f = 1``."""
    if row.model == ZIP_MODEL:
        if regime == BAND:
            return [(row.zp, 2), (row.ip, 1), (row.pp, 0)], [(row.zq, 2), (row.iq, 1), (row.pq, 0)]
        # Z share unchanged; the P share behaves like model 1, the I share like model 5
        power, current = _outside(row, regime, const_i=False), _outside(row, regime, const_i=True)
        return ([(row.zp, 2)] + [(row.pp * c, e) for c, e in power] + [(row.ip * c, e) for c, e in current],
                [(row.zq, 2)] + [(row.pq * c, e) for c, e in power] + [(row.iq * c, e) for c, e in current])
    if regime == BAND or row.model == Z_MODEL:
        return [(1.0, row.exp_p)], [(1.0, row.exp_q)]
    terms = _outside(row, regime, const_i=row.model == I_MODEL)
    return terms, terms


def _outside(row, regime: str, const_i: bool) -> list:
    if regime == ABOVE:
        return [(1 / row.vmax if const_i else 1 / row.vmax ** 2, 2)]
    if regime == LOW:
        return [(1.0, 2)]
    slope = ((1.0 if const_i else 1 / row.vmin) - row.vlow) / (row.vmin - row.vlow)
    return [(slope, 2), (row.vlow * (1 - slope), 1)]                # v (vlow + slope (v - vlow))


def pair_regimes(ld: pd.DataFrame, v: np.ndarray) -> np.ndarray:
    """The regime of every load pair at pair voltages ``v`` (per unit of each pair's rating)."""
    regime = np.select([v <= ld["vlow"], v <= ld["vmin"], v > ld["vmax"]], [LOW, BELOW, ABOVE], BAND)
    return np.where(ld["model"].to_numpy() == Z_MODEL, BAND, regime).astype(object)


def load_regimes(radial, V: np.ndarray) -> np.ndarray:
    """The regime of every load pair at node voltages ``V`` (radial numbering), as OpenDSS picks it."""
    ld = radial.loads
    f, t = ld["node_from"].to_numpy(int), ld["node_to"].to_numpy(int)
    g_t = np.where(t >= 0, ld["vbase_to"].to_numpy(), 0.0)
    w = ld["vbase_from"].to_numpy() * V[f] - g_t * V[np.maximum(t, 0)]
    return pair_regimes(ld, np.abs(w) / ld["v_nom"].to_numpy())


def linearized_loads(ld: pd.DataFrame, x0: np.ndarray, regimes: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(s0, s1)`` per pair: its power ``S_nom F(x)`` (per unit, complex) ~ ``s0 + s1 x`` near the
    squared pair voltage ``x0`` (per unit of the rating): the tangent of OpenDSS's law in the regime
    ``x0`` falls in, or in ``regimes`` (one per pair) where given. At ``x0 = 1`` inside the band this
    is the usual ``F ~ 1 + e/2 (x - 1)``; a load whose rating does not match its bus (IEEE 9500's
    batteries, rated 12.47 kV on 480 V buses) is linearized where it really operates, not at its
    rating."""
    x0 = np.maximum(np.asarray(x0, float), 1e-12)
    laws = load_laws(ld, pair_regimes(ld, np.sqrt(x0)) if regimes is None else regimes)
    f = np.zeros((len(ld), 2))
    df = np.zeros((len(ld), 2))
    for k, (x, terms_pq) in enumerate(zip(x0, laws)):
        for j, terms in enumerate(terms_pq):
            f[k, j] = sum(c * x ** (e / 2) for c, e in terms)
            df[k, j] = sum(c * e / 2 * x ** (e / 2 - 1) for c, e in terms if e)
    s = ld["s_pu"].to_numpy()
    s1 = s.real * df[:, 0] + 1j * s.imag * df[:, 1]
    s0 = s.real * f[:, 0] + 1j * s.imag * f[:, 1] - s1 * x0
    return s0, s1
