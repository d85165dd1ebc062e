"""How a wall-clock cap on block reconstruction is shared out over the units being fitted."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FitBudget:
    """A wall-clock budget for the fitting steps, shared out over the units by their step cost.

    Each unit's steps get its cost's share of what is left, after reserving what the later units will
    spend outside their steps (caching outputs, least squares, range searches) at the rate the units
    done so far spent it; so every unit gets about the same fraction of its steps, and the time an
    early finisher leaves goes to the units after it.
    """

    seconds: float
    costs: list[float]  # seconds of one fitting step of every unit (reconstruct.step_seconds)
    start: float
    outside: float = 0.0  # seconds the units done spent outside their steps
    spent: float = 0.0  # their step cost

    def deadline(self, pos: int, unit_start: float, now: float) -> float:
        """When unit ``pos``, begun at ``unit_start``, stops its steps (they start ``now``)."""
        later = sum(self.costs[pos + 1:])
        # seconds outside the steps per second of step cost: the units done, and this one's so far
        rate = (self.outside + now - unit_start) / max(self.spent + self.costs[pos], 1e-9)
        left = self.seconds - (now - self.start) - rate * later
        return now + max(0.0, left) * self.costs[pos] / max(self.costs[pos] + later, 1e-9)

    def done(self, pos: int, seconds: float, fitting: float) -> None:
        """Unit ``pos`` took ``seconds``, ``fitting`` of them in its steps."""
        self.outside += seconds - fitting
        self.spent += self.costs[pos]
