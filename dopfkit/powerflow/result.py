"""Power-flow results indexed by OpenDSS node and element names."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dopfkit.network.math_model import GROUND, Network


class PowerFlowError(RuntimeError):
    """The iteration did not converge; the message carries the residual history."""

    def __init__(self, feeder: str, history: list[float], tol: float):
        self.history = history
        tail = ", ".join(f"{h:.2e}" for h in history[-8:])
        super().__init__(f"power flow on {feeder} did not converge to {tol:g} pu in "
                         f"{len(history)} iterations; last max |dV| (pu): {tail}")


@dataclass
class PowerFlowResult:
    network: Network
    V: np.ndarray                    # complex pu, (nodes,) or (nodes, scenarios)
    iterations: int
    history: list[float]
    converged: bool
    method: str
    load_scale: object = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        return self.V.ndim == 2

    @property
    def voltages(self) -> pd.Series | pd.DataFrame:
        """Complex per-unit node voltages indexed by ``"bus.node"`` (scenarios as columns)."""
        if self.batched:
            return pd.DataFrame(self.V, index=self.network.nodes)
        return pd.Series(self.V, index=self.network.nodes, name="V_pu")

    @property
    def vmag(self) -> pd.Series | pd.DataFrame:
        return self.voltages.abs()

    def _conductor_voltages(self) -> np.ndarray:
        """Volts on every branch conductor of a snapshot (0 on ground)."""
        node, vbase = self.network.branches.conductor_node, self.network.vbase
        on = node != GROUND
        v = np.zeros(node.shape, complex)
        v[on] = self.V[node[on]] * vbase[node[on]]
        return v

    def branch_flows(self) -> pd.DataFrame:
        """Current (A) and power (kW, kvar) into every conductor of every series element."""
        if self.batched:
            raise ValueError("branch_flows() is for a single snapshot; index the batch first")
        br = self.network.branches
        v = self._conductor_voltages()
        i = br.Y @ v
        s = v * np.conj(i) / 1e3
        nodes = np.where(br.conductor_node == GROUND, "ground",
                         np.asarray(self.network.nodes)[br.conductor_node])
        return pd.DataFrame({"element": np.asarray(br.names)[br.conductor_element],
                             "terminal": br.conductor_terminal + 1, "node": nodes,
                             "I_A": i, "P_kW": s.real, "Q_kvar": s.imag})

    def element_losses(self) -> pd.Series:
        """Complex losses (kW + j kvar) of each series element: the sum of its terminal powers."""
        f = self.branch_flows()
        return (f["P_kW"] + 1j * f["Q_kvar"]).groupby(f["element"], sort=False).sum()

    @property
    def losses(self) -> complex:
        """Total series losses, kW + j kvar."""
        return complex(self.element_losses().sum())

    def scenario(self, k: int) -> PowerFlowResult:
        """One column of a batch as a single-snapshot result."""
        return PowerFlowResult(self.network, self.V[:, k], self.iterations, self.history,
                               self.converged, self.method)
