"""Reports of a greedy flip search."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class LayerReport:
    """What the search did in one layer during one pass."""

    name: str
    pass_index: int
    candidates: int  # candidates (groups) available in the layer
    tried: int  # candidate evaluations (assignments, for exhaustive search)
    accepted: int  # accepted candidates (groups / assignments)
    flipped: int  # individual weights flipped
    loss_before: float
    loss_after: float
    seconds: float
    stop_reason: str  # "done" | "max_candidates" | "max_seconds" | "time_budget" (not started)
    flips: list = dataclasses.field(default_factory=list, repr=False)  # flat kernel indices
    holdout_before: float | None = None  # mean holdout loss before / after the layer's search
    holdout_after: float | None = None
    reverted: bool = False  # the holdout check undid this layer's flips
    temperature: float | None = None  # of the probe loss during this search (calibrate)


@dataclasses.dataclass
class GreedyReport:
    """Result of :func:`greedy_flip`. Losses are mean per-example probe losses."""

    method: str
    probe_size: int
    tried: int
    accepted: int
    flipped: int
    loss_before: float
    loss_after: float
    seconds: float
    layers: list
    holdout_size: int = 0

    @property
    def reverted(self) -> int:
        """Layer searches undone by the holdout check."""
        return sum(lr.reverted for lr in self.layers)

    def summary(self) -> str:
        """One line: what was tried and kept, the probe loss before and after, the time."""
        kept = f"accepted {self.accepted:,} ({self.flipped:,} weights)"
        if self.holdout_size:
            kept += f", {self.reverted} of {len(self.layers)} layer searches reverted on the holdout"
        return (f"greedy flip search: {len(self.layers)} layer searches, tried {self.tried:,}, "
                f"{kept}; probe loss {self.loss_before:.4f} -> {self.loss_after:.4f} "
                f"({self.probe_size:,} examples), {self.seconds:.1f} s")

    def as_logs(self, prefix: str = "greedy/") -> dict:
        """Flat ``{name: float}`` for Keras logs / History / TensorBoard."""
        logs = {
            f"{prefix}loss_before": self.loss_before,
            f"{prefix}loss_after": self.loss_after,
            f"{prefix}tried": float(self.tried),
            f"{prefix}accepted": float(self.accepted),
            f"{prefix}flipped": float(self.flipped),
            f"{prefix}seconds": self.seconds,
        }
        for lr in self.layers:
            key = f"{prefix}{lr.name}"
            logs[f"{key}/accepted"] = logs.get(f"{key}/accepted", 0.0) + lr.accepted
            logs[f"{key}/tried"] = logs.get(f"{key}/tried", 0.0) + lr.tried
            logs[f"{key}/loss_after"] = lr.loss_after
        return logs
