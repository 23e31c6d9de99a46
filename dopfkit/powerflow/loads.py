"""OpenDSS's static load models, vectorized over load phases and scenarios.

Each pair draws current ``i`` (A) from its ``from`` node to its ``to`` node given the voltage ``u``
(V) across it. Inside the band ``vmin < |u|/v_nom <= vmax`` models 1-5 are one exponential law,
``S(v) = P v^a + j Q v^b`` with ``v = |u| / v_nom`` (model 1: a = b = 0; 2: 2, 2; 3: 0, 2;
4: the CVR factors; 5: 1, 1). Outside the band OpenDSS turns them into impedances, and below
``vmin`` blends linearly towards the nominal admittance at ``vlow`` so a collapsing voltage cannot
make the iteration diverge. We follow it to the letter: the acceptance test is agreement with
OpenDSS to 1e-6 pu.
"""
from __future__ import annotations

import numpy as np

Z_MODEL, I_MODEL, ZIP_MODEL = 2, 5, 8


def load_currents(u, s, pairs, xp=np):
    """Currents (A) of all pairs for voltages ``u`` (V) and nominal powers ``s`` (VA per pair).

    ``u`` and ``s`` have shape (pairs,) or (pairs, scenarios); ``pairs`` holds the model data.
    """
    col = (slice(None),) + (None,) * (u.ndim - 1)          # broadcast pair data over scenarios
    vb = xp.asarray(pairs.v_nom)[col]
    vmin, vmax, vlow = (xp.asarray(a)[col] * vb for a in (pairs.vmin, pairs.vmax, pairs.vlow))
    model = xp.asarray(pairs.model)[col]
    a, b = (xp.asarray(pairs.exponents[:, k])[col] for k in (0, 1))
    mag = xp.maximum(xp.abs(u), 1e-300)
    unit, v = u / mag, mag / vb
    yeq = xp.conj(s) / vb**2                                 # admittance drawing s at vb
    const_i = model == I_MODEL
    # below vmin: blend from the nominal admittance at vlow to the model's current at vmin
    ilow = yeq * vlow
    i_at_vmin = xp.where(const_i, yeq * vb, yeq * vb**2 / vmin)
    i_mid = (ilow + (i_at_vmin - ilow) / (vmin - vlow) * (mag - vlow)) * unit
    i_high = yeq * u / xp.where(const_i, vmax / vb, (vmax / vb) ** 2)
    i_band = xp.conj((s.real * v**a + 1j * s.imag * v**b) / u)
    i = xp.where(mag <= vlow, yeq * u,
                 xp.where(mag <= vmin, i_mid, xp.where(mag > vmax, i_high, i_band)))
    i = xp.where(model == Z_MODEL, yeq * u, i)
    if (pairs.model == ZIP_MODEL).any():
        zipv = xp.asarray(pairs.zipv)[col + (slice(None),)]
        i = xp.where(model == ZIP_MODEL,
                     _zip_currents(u, s, yeq, vb, vmin, vmax, vlow, mag, unit, zipv, xp), i)
    return i


def _zip_currents(u, s, yeq, vb, vmin, vmax, vlow, mag, unit, zipv, xp):
    """OpenDSS model 8: Z, I and P shares for P and Q separately, with the same limits."""
    zp, ip, pp, zq, iq, pq, cutoff = (zipv[..., k] for k in range(7))
    ilow = yeq * vlow
    y95 = (ilow + (yeq * vb**2 / vmin - ilow) / (vmin - vlow) * (mag - vlow)) / mag
    y95i = (ilow + (yeq * vb - ilow) / (vmin - vlow) * (mag - vlow)) / mag
    re_im = lambda y, p, q: y.real * p + 1j * y.imag * q    # noqa: E731
    i_z = re_im(yeq, zp, zq) * u
    in_band = i_z + xp.conj((s.real * ip + 1j * s.imag * iq) / (unit * vb)) \
        + xp.conj((s.real * pp + 1j * s.imag * pq) / u)
    below = i_z + re_im(y95, pp, pq) * u + re_im(y95i, ip, iq) * u
    above = i_z + re_im(yeq / (vmax / vb) ** 2, pp, pq) * u + re_im(yeq / (vmax / vb), ip, iq) * u
    i = xp.where(mag <= vmin, below, xp.where(mag > vmax, above, in_band))
    x = 500.0 * (mag / vb - cutoff)                          # smooth low-voltage drop-out
    i = xp.where(cutoff > 0, i * 0.5 * (1 + xp.tanh(x)), i)
    return xp.where(mag <= vlow, yeq * u, i)
