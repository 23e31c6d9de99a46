"""Which optimization solvers this environment can use, and ready-made solver objects for them.

    >>> from dopfkit import solvers
    >>> solvers.available()            # {'ipopt': True, 'highs': True, ...}, cached
    >>> opt = solvers.pyomo_solver("ipopt")       # the ipopt executable, else cyipopt
    >>> prob.solve(solver=solvers.cvxpy_solver("clarabel"))

A missing solver raises :class:`SolverNotAvailableError` whose message is the install command.
Detection imports packages and looks for executables and libraries; it never solves anything.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import sys

KNOWN = ("ipopt", "highs", "scip", "clarabel", "scs", "cvxpy")

# Pyomo plugins per solver, in order of preference. 'ipopt' is the executable (conda-forge);
# 'cyipopt' is Ipopt from the cyipopt-wheels package, reached through PyNumero's ASL library.
_PYOMO_PLUGINS = {
    "ipopt": ("ipopt", "cyipopt"),
    "highs": ("appsi_highs", "highs"),
    "scip": ("scip_direct", "scip"),   # in-process pyscipopt first, then a `scip` executable
}
_CVXPY_NAMES = {"clarabel": "CLARABEL", "scs": "SCS", "highs": "HIGHS", "scip": "SCIP"}

# The versions pinned in pyproject.toml's `core` extra (tests/test_solvers.py checks they agree).
_PINS = {
    "highspy": "1.15.1",
    "pyscipopt": "6.3.0",
    "clarabel": "0.11.1",
    "scs": "3.3.1",
    "cvxpy": "1.9.3",
    "cyipopt-wheels": "1.7.0.dev0",
}
_CORE = "or everything at once: pip install -e '.[core]' (from the project checkout)"
_PYNUMERO_BUILD = (
    "python -m pyomo.contrib.pynumero.build -DASL_INCLUDE_DIR=/usr/include/ampl-netlib-solvers "
    "-DASL_LIBRARY=/usr/lib/x86_64-linux-gnu/libamplsolver.so"
)
_INSTALL = {
    "ipopt": (
        "make solvers (from the project checkout; Debian/Ubuntu), which runs\n"
        f"  pip install cyipopt-wheels=={_PINS['cyipopt-wheels']}\n"
        "  apt-get install libamplsolver-dev cmake g++\n"
        f"  PYOMO_CONFIG_DIR=.venv/pyomo {_PYNUMERO_BUILD}\n"
        "and exports PYOMO_CONFIG_DIR; or with conda: conda install -c conda-forge ipopt"
    ),
    "highs": f"pip install highspy=={_PINS['highspy']}",
    "scip": f"pip install pyscipopt=={_PINS['pyscipopt']} (conda: conda install -c conda-forge pyscipopt)",
    "clarabel": f"pip install clarabel=={_PINS['clarabel']}",
    "scs": f"pip install scs=={_PINS['scs']}",
    "cvxpy": f"pip install cvxpy=={_PINS['cvxpy']}",
}


class SolverNotAvailableError(RuntimeError):
    """A solver the code asked for is not usable here; the message says how to install it."""


# ------------------------------------------------------------------------------------------ detection
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a broken binary wheel
        return False


def _pynumero_library() -> str | None:
    """Path of PyNumero's ASL library if it is found and loads, else None."""
    try:
        from pyomo.contrib.pynumero.asl import AmplInterface

        if not AmplInterface.available():
            return None
        ctypes.CDLL(AmplInterface.libname)   # a stale build (missing libamplsolver) fails here
        return AmplInterface.libname
    except Exception:
        return None


def _plugin_usable(plugin: str) -> bool:
    try:
        import pyomo.environ as pyo

        if not pyo.SolverFactory(plugin).available(exception_flag=False):
            return False
    except Exception:  # unknown plugin in this Pyomo version, or its import failed
        return False
    # cyipopt's own check ignores the PyNumero library it cannot solve without
    return plugin != "cyipopt" or _pynumero_library() is not None


_ROUTES: dict[str, str | None] = {}


def _pyomo_route(name: str) -> str | None:
    """The first usable Pyomo plugin for ``name`` (cached), or None."""
    if name not in _ROUTES:
        _ROUTES[name] = next((p for p in _PYOMO_PLUGINS[name] if _plugin_usable(p)), None)
    return _ROUTES[name]


def _cvxpy_has(constant: str) -> bool:
    try:
        import cvxpy as cp

        return constant in cp.installed_solvers()
    except Exception:
        return False


_DETECT = {
    "ipopt": lambda: _pyomo_route("ipopt") is not None,
    "highs": lambda: _imports("highspy"),
    "scip": lambda: _imports("pyscipopt") or _pyomo_route("scip") is not None,
    "clarabel": lambda: _cvxpy_has("CLARABEL"),
    "scs": lambda: _cvxpy_has("SCS"),
    "cvxpy": lambda: _imports("cvxpy"),
}
_CACHE: dict[str, bool] = {}


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in KNOWN:
        raise ValueError(f"unknown solver {name!r}; known solvers: {', '.join(KNOWN)}")
    return key


def _is_available(name: str) -> bool:
    if name not in _CACHE:
        _CACHE[name] = _DETECT[name]()
    return _CACHE[name]


# ----------------------------------------------------------------------------------------------- API
def available(refresh: bool = False) -> dict[str, bool]:
    """Which of :data:`KNOWN` are usable here: ``{"ipopt": True, "highs": True, ...}``.

    Results are cached for the process; ``refresh=True`` looks again (after installing something).
    """
    if refresh:
        _CACHE.clear()
        _ROUTES.clear()
    return {name: _is_available(name) for name in KNOWN}


def _ipopt_diagnosis() -> str:
    """What exactly is missing on the cyipopt route (the most common set-up here)."""
    if not _imports("cyipopt"):
        return "neither an `ipopt` executable on PATH nor the cyipopt package was found"
    config = os.environ.get("PYOMO_CONFIG_DIR", "(PYOMO_CONFIG_DIR unset)")
    return (f"cyipopt is installed, but PyNumero's ASL library (libpynumero_ASL.so) was not found or "
            f"does not load; Pyomo looks for it under {config}/lib")


def require(name: str) -> str:
    """Return the normalized name if the solver is usable, else raise with the install command."""
    key = _check_name(name)
    if _is_available(key):
        return key
    if key == "ipopt":  # pip alone cannot build PyNumero's library: no `.[core]` hint here
        why, also = _ipopt_diagnosis(), ""
    else:
        why, also = f"{key} is not installed in {sys.prefix}", f"\n{_CORE}"
    raise SolverNotAvailableError(f"solver {key!r} is not available: {why}.\n"
                                  f"Install it with: {_INSTALL[key]}{also}")


def pyomo_plugin(name: str) -> str:
    """The Pyomo ``SolverFactory`` name that ``pyomo_solver(name)`` uses (e.g. ``"cyipopt"``)."""
    key = _check_name(name)
    if key not in _PYOMO_PLUGINS:
        raise ValueError(f"{key!r} is not a Pyomo solver here; Pyomo solvers: {', '.join(_PYOMO_PLUGINS)} "
                         "(use cvxpy_solver for conic solvers)")
    require(key)
    plugin = _pyomo_route(key)
    if plugin is None:  # e.g. pyscipopt installed but no Pyomo interface to it in this Pyomo version
        raise SolverNotAvailableError(f"{key!r} is installed but no Pyomo interface to it works "
                                      f"(tried {', '.join(_PYOMO_PLUGINS[key])}); "
                                      "pyproject.toml pins pyomo==6.10.1")
    return plugin


def pyomo_solver(name: str):
    """A ready Pyomo solver object: ``pyomo_solver("ipopt").solve(model)``."""
    import pyomo.environ as pyo

    return pyo.SolverFactory(pyomo_plugin(name))


def cvxpy_solver(name: str) -> str:
    """The CVXPY solver constant for ``name``: ``problem.solve(solver=cvxpy_solver("clarabel"))``."""
    key = _check_name(name)
    if key not in _CVXPY_NAMES:
        raise ValueError(f"{key!r} is not a CVXPY solver here; CVXPY solvers: {', '.join(_CVXPY_NAMES)}")
    require("cvxpy")
    require(key)
    constant = _CVXPY_NAMES[key]
    if not _cvxpy_has(constant):   # installed, but CVXPY does not see it (version mismatch)
        raise SolverNotAvailableError(f"{key!r} is installed but CVXPY does not list it in "
                                      f"cvxpy.installed_solvers(); install: {_INSTALL[key]}\n{_CORE}")
    return constant
