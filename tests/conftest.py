"""Shared pytest set-up for dopfkit's tests.

* Feeder data: when DOPFKIT_FEEDERS_DIR is unset and ``<repo>/../shared/feeders/ieee`` exists, point
  the variable at it (absolute path) before any test imports dopfkit.
* GPU: ``requires_gpu`` (``from conftest import requires_gpu``) and the markers ``@pytest.mark.gpu`` /
  ``@pytest.mark.requires_gpu`` skip a test unless cupy is installed and sees a CUDA device.
* MPI: ``@pytest.mark.mpi`` skips a test unless mpi4py can be imported.
* ``DOPFKIT_REQUIRE`` (comma-separated: ``mpi``, ``ipopt``, ``gpu``) turns those skips into an error
  that stops the run: CI builds MPI and Ipopt, and a lent GPU machine has a GPU, so there a missing
  component is a broken set-up, not a reason to skip.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED_FEEDERS = REPO_ROOT.parent / "shared" / "feeders" / "ieee"

if not os.environ.get("DOPFKIT_FEEDERS_DIR") and _SHARED_FEEDERS.is_dir():
    os.environ["DOPFKIT_FEEDERS_DIR"] = str(_SHARED_FEEDERS)


# one definition of 'a usable GPU' for the library and its tests
from dopfkit.backend import gpu_available  # noqa: E402


@functools.cache
def mpi_available() -> bool:
    if importlib.util.find_spec("mpi4py") is None:
        return False
    try:
        from mpi4py import MPI  # noqa: F401

        return True
    except Exception:
        return False


_GPU_REASON = "needs a CUDA GPU with cupy (pip install -e '.[gpu]'); none available here"
_MPI_REASON = "needs mpi4py and an MPI runtime (pip install -e '.[hpc]')"

#: Decorator for tests that need a GPU: ``@requires_gpu``.
requires_gpu = pytest.mark.requires_gpu


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_gpu: needs a CUDA GPU with cupy; skipped where none is available"
    )


def _required() -> set[str]:
    return {n.strip() for n in os.environ.get("DOPFKIT_REQUIRE", "").split(",") if n.strip()}


def _check_required() -> None:
    from dopfkit import solvers
    have = {"mpi": mpi_available, "gpu": gpu_available, "ipopt": lambda: solvers.available()["ipopt"]}
    names = sorted(_required())
    unknown = sorted(set(names) - set(have))
    if unknown:
        raise pytest.UsageError(f"DOPFKIT_REQUIRE names {unknown}; known: {sorted(have)}")
    missing = [n for n in names if not have[n]()]
    if missing:
        raise pytest.UsageError(f"DOPFKIT_REQUIRE={os.environ['DOPFKIT_REQUIRE']}: {missing} not available, "
                                "so the tests that need it would only be skipped")


def require_mpiexec(path: Path) -> None:
    """Skip without ``mpiexec`` beside the interpreter, unless DOPFKIT_REQUIRE names mpi."""
    if not path.exists():
        message = f"no mpiexec next to {path.parent / 'python'}"
        if "mpi" in _required():
            pytest.fail(message + " (DOPFKIT_REQUIRE names mpi)")
        pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_required()
    skip_gpu = pytest.mark.skip(reason=_GPU_REASON)
    skip_mpi = pytest.mark.skip(reason=_MPI_REASON)
    for item in items:
        wants_gpu = item.get_closest_marker("gpu") or item.get_closest_marker("requires_gpu")
        if wants_gpu and not gpu_available():
            item.add_marker(skip_gpu)
        if item.get_closest_marker("mpi") and not mpi_available():
            item.add_marker(skip_mpi)


@pytest.fixture(scope="session")
def feeders_dir() -> Path | None:
    """The local feeder directory (DOPFKIT_FEEDERS_DIR) or None when none is configured."""
    value = os.environ.get("DOPFKIT_FEEDERS_DIR")
    return Path(value) if value else None
