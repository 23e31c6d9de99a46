"""The elementwise steps of one ADMM iteration, written once for numpy and CuPy.

Every step is a function ``step(xp, *arrays)`` of plain array operations. :class:`ElementwiseSteps`
binds them to an array module: on numpy, and on CuPy with ``fuse=False``, a step runs as written, one
array operation (one kernel on a GPU) after another; on CuPy with ``fuse=True``, :func:`cupy.fuse`
traces it once per argument types and compiles it into a single kernel, so that the four to eight
operations of a step cost one launch and one pass over memory. That is the only place the two
backends differ, so the numpy tests check the arithmetic that the fused kernels run.

What cupy.fuse accepts shapes how the steps are written: elementwise operations and ufuncs, in-place
writes as ``out[...] = ...``, at most one reduction (a full ``sum``) and Python control flow only on
arguments that are ``None`` or not (an optional scale or reflection), never on array values, and
scalars passed as numpy scalars of the arrays' dtype (a Python float inside a fused kernel can promote
float32 arithmetic to float64; a numpy float32 cannot).
"""
from __future__ import annotations

import functools

import numpy as np


def consensus_terms(xp, out, x, lam, rho):
    """``out = rho x - lam``, per copy: what the global update sums per column."""
    out[...] = rho * x - lam


def clamped_average(xp, s, c, rho, n, q, lower, upper):
    """The global update's last step: ``clip((s - c) / (rho n + q), lower, upper)``."""
    z = (s - c) / (rho * n + q)
    return xp.minimum(xp.maximum(z, lower), upper)


def over_relaxed(xp, w, x, relax, complement):
    """``relax w + (1 - relax) x``, with ``complement = 1 - relax`` computed by the caller."""
    return relax * w + complement * x


def local_target(xp, w, lam, c, rho):
    """The point each local projection maps: ``w + (lam - c) / rho``."""
    return w + (lam - c) / rho


def dual_update(xp, lam, rho, w, x_new):
    return lam + rho * (w - x_new)


def squared_distance(xp, a, b, scale):
    """``sum(((a - b) / scale)^2)`` (no division where ``scale`` is None)."""
    d = a - b
    if scale is not None:
        d = d / scale
    return xp.sum(d * d)


def halpern_pair(xp, s, t, scale, reflect, stretch):
    """One half (copies, or multipliers over rho: ``scale``) of Halpern's current point and of its
    image under the ADMM map reflected as ``stretch T - reflect I`` (``stretch = 1 + reflect``)."""
    if scale is not None:
        s, t = s / scale, t / scale
    if reflect is not None:
        t = stretch * t - reflect * s
    return s, t


def halpern_control(xp, r2, k, r_anchor, r_prev, sufficient, necessary, grow):
    """Halpern's restart test and step count, in place on float64 device scalars: restart when the
    residual has fallen to ``sufficient`` times its value at the anchor, or to ``necessary`` times
    and stopped falling, or grown to ``grow`` times. Returns the restart flag and the weights of the
    step that follows, ``(k + 1) / (k + 2)`` and ``k + 2``."""
    r = xp.sqrt(r2.astype(r_prev.dtype))
    restart = (r <= sufficient * r_anchor) | (r >= grow * r_anchor) | \
        ((r <= necessary * r_anchor) & (r > r_prev))
    k0 = xp.where(restart, 0.0, k)
    r_anchor[...] = xp.where(restart, r, r_anchor)
    r_prev[...] = r
    k[...] = k0 + 1.0
    return restart, (k0 + 1.0) / (k0 + 2.0), k0 + 2.0


def halpern_point(xp, anchor, restart, s, t, scale, weight, count):
    """Halpern's step for one half of the point (:func:`halpern_pair`): ``weight t + anchor / count``,
    the anchor moved to the current point ``s`` first where ``restart``; back in the half's own units
    (times ``scale``)."""
    anchor[...] = xp.where(restart, s, anchor)
    out = weight.astype(t.dtype) * t + anchor / count.astype(t.dtype)
    if scale is not None:
        out = out * scale
    return out


STEPS = (consensus_terms, clamped_average, over_relaxed, local_target, dual_update, squared_distance,
         halpern_pair, halpern_control, halpern_point)


class ElementwiseSteps:
    """The functions of :data:`STEPS` as methods bound to an array module (``steps.dual_update(lam,
    rho, w, x_new)``), each compiled by :func:`cupy.fuse` into one kernel where ``fuse`` and the
    module is CuPy."""

    def __init__(self, xp, fuse: bool = False):
        self.xp, self.fused = xp, bool(fuse) and xp is not np
        for step in STEPS:
            setattr(self, step.__name__, _fused(step) if self.fused else functools.partial(step, xp))


@functools.cache
def _fused(step):
    """One :func:`cupy.fuse` object per step, shared by every solver, so each kernel compiles once."""
    import cupy
    return cupy.fuse(kernel_name=f"admm_{step.__name__}")(functools.partial(step, cupy))
