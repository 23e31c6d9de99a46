"""Import report: what happened to every OpenDSS element, so nothing is dropped silently."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

EXACT, APPROXIMATED, FROZEN, IGNORED = "exact", "approximated", "frozen", "ignored"


class FeederImportError(ValueError):
    """Unsupported or malformed input; the message names the element and the file."""


@dataclass
class ImportReport:
    master: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, element: str, status: str, how: str) -> None:
        self.rows.append((element, status, how))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["element", "status", "how"]).set_index("element")

    def counts(self) -> pd.DataFrame:
        """Element counts by class and status (what a reader checks first)."""
        df = self.to_frame().reset_index()
        df["class"] = df["element"].str.split(".").str[0]
        return df.groupby(["class", "status"]).size().unstack(fill_value=0)

    def __str__(self) -> str:
        df = self.to_frame()
        lines = [f"Import report for {self.master}: {len(df)} elements"]
        lines += [f"  {k}: {v}" for k, v in df["status"].value_counts().items()]
        for status in (APPROXIMATED, FROZEN, IGNORED):
            sub = df[df["status"] == status].groupby("how").size()
            lines += [f"  {status}: {n} x {how}" for how, n in sub.items()]
        return "\n".join(lines)

    _repr_pretty_ = lambda self, p, cycle: p.text(str(self))  # noqa: E731
