"""dopfkit: distribution optimal power flow, the library behind the book."""
from dopfkit import feeders, solvers
from dopfkit.network import Network, load_feeder
from dopfkit.powerflow import PowerFlowError, solve_powerflow

__version__ = "0.1.0"
__all__ = ["Network", "PowerFlowError", "feeders", "load_feeder", "solve_powerflow", "solvers"]
