"""Three-phase power flow: Z-bus fixed point (general, batched) and backward-forward sweep."""
from dopfkit.powerflow.result import PowerFlowError, PowerFlowResult
from dopfkit.powerflow.zbus import ZBusSolver, solve_powerflow

__all__ = ["PowerFlowError", "PowerFlowResult", "ZBusSolver", "solve_powerflow"]
