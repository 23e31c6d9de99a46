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
    return load_model(s, pairs, xp, ndim=np.ndim(u))(u)


def load_model(s, pairs, xp=np, ndim=None):
    """``load_currents`` as a function of ``u`` alone, for the iterations of one power flow: what
    does not depend on the voltages is computed once. ``ndim``: that of ``u`` (default: of ``s``)."""
    col = (slice(None),) + (None,) * ((np.ndim(s) if ndim is None else ndim) - 1)
    vb = xp.asarray(pairs.v_nom)[col]
    vmin, vmax, vlow = (xp.asarray(a)[col] * vb for a in (pairs.vmin, pairs.vmax, pairs.vlow))
    model = xp.asarray(pairs.model)[col]
    const_i = model == I_MODEL
    yeq = xp.conj(s) / vb**2                                 # admittance drawing s at vb
    # Every regime draws i = g u, g = yeq with its real and imaginary parts scaled by real functions
    # of |u|. Picking those factors on real arrays and forming one complex product at the end is
    # several times faster than picking among complex candidate currents (batched power flows spend
    # a good part of their time here). Below vmin: a blend from the nominal admittance at vlow to
    # the model's current at vmin; above vmax: the impedance (admittance for constant I) at vmax.
    i_at_vmin = xp.where(const_i, vb, vb**2 / vmin)          # in units of yeq
    slope = (i_at_vmin - vlow) / (vmin - vlow)
    f_high = xp.where(const_i, vb / vmax, (vb / vmax) ** 2)
    a, b = pairs.exponents.T                                 # S(v) = P v^a + j Q v^b in the band
    band_re = _inverse_power(a, col, xp)                     # g = yeq.real v^(a-2) + ...
    band_im = None if np.array_equal(a, b) else _inverse_power(b, col, xp)
    is_z = (model == Z_MODEL) if (pairs.model == Z_MODEL).any() else None
    zipv = xp.asarray(pairs.zipv)[col + (slice(None),)] if (pairs.model == ZIP_MODEL).any() else None

    def currents(u):
        mag = xp.maximum(xp.abs(u), 1e-300)
        f_mid = (vlow + slope * (mag - vlow)) / mag
        inv_v = vb / mag
        low, mid, high = mag <= vlow, mag <= vmin, mag > vmax

        def regime(f_band):
            f = xp.where(low, 1.0, xp.where(mid, f_mid, xp.where(high, f_high, f_band)))
            return f if is_z is None else xp.where(is_z, 1.0, f)

        f_re = regime(band_re(inv_v))
        if band_im is None:
            i = yeq * u * f_re
        else:
            i = (yeq.real * f_re + 1j * (yeq.imag * regime(band_im(inv_v)))) * u
        if zipv is not None:
            i = xp.where(model == ZIP_MODEL,
                         _zip_currents(u, s, yeq, vb, vmin, vmax, vlow, mag, u / mag, zipv, xp), i)
        return i
    return currents


def _inverse_power(exponent, col, xp):
    """``x -> x ** (2 - exponent)`` per pair; the usual exponents 0, 1, 2 by products (pow is slow)."""
    k = 2 - np.asarray(exponent, float)
    if (k == 2).all():
        return lambda x: x * x
    two, one = k == 2, k == 1
    if (two | one | (k == 0)).all():
        two, one = xp.asarray(two)[col], xp.asarray(one)[col]
        return lambda x: xp.where(two, x * x, xp.where(one, x, 1.0))
    k = xp.asarray(k)[col]
    return lambda x: x ** k


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
