"""Network model: OpenDSS case -> engineering model -> per-unit math model."""
from __future__ import annotations

from pathlib import Path

from dopfkit.network.engineering import Feeder
from dopfkit.network.math_model import Network, build_network
from dopfkit.network.opendss_import import read_feeder
from dopfkit.network.report import FeederImportError, ImportReport

__all__ = ["Feeder", "FeederImportError", "ImportReport", "Network", "build_network", "load_feeder",
           "read_feeder"]


def load_feeder(name_or_path: str | Path, sbase: float = 1e6) -> Network:
    """Load a feeder by name (``"ieee13"``) or master-file path into the math model.

    OpenDSS compiles and solves the case once (so regulator taps and capacitor states are the
    snapshot's); ``net.feeder`` is the engineering model and ``net.feeder.report`` says how each
    element was represented.
    """
    from dopfkit.feeders import FEEDERS, feeder_master
    master = feeder_master(name_or_path)
    name = str(name_or_path).lower() if str(name_or_path).lower() in FEEDERS else None
    return build_network(read_feeder(master, name=name), sbase=sbase)
