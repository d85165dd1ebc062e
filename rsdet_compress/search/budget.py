"""Resource budgets of a search: "8x smaller weights", "BOPs / 50", as fractions of the float model.

``Budget.parse(["size=0.125", "bops=0.02"])`` -> every candidate must cost at
most 12.5% of the float model's weight storage and 2% of its BOPs;
``latency=0.33``: a third of the float model's latency (measured per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from rsdet_compress.compress.cost import Cost
from rsdet_compress.errors import UserError

#: budget name -> Cost attribute it bounds (and the per-layer key of ``Cost.per_layer``). ``latency`` is the
#: float model's latency on this machine's runtime, predicted from a measured table (search.latency_cost).
METRICS = {"size": "weight_bits", "bops": "bops", "flops": "flops", "latency": "latency_ms"}
PER_LAYER = {"size": "weight_bits", "bops": "bops", "flops": "macs", "latency": "latency_ms"}


@dataclass(frozen=True)
class Budget:
    """Upper bounds as fractions of the float model, e.g. ``{"size": 0.125}``; all must hold."""

    limits: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, specs: list[str] | str, source: str = "--budget") -> Budget:
        """``"size=0.125"`` (or a list of them; ``1/8`` and ``8x`` are accepted for 0.125)."""
        specs = [specs] if isinstance(specs, str) else list(specs)
        if not specs:
            raise UserError(f"{source}: give at least one budget, e.g. size=0.125 (8x smaller weights)")
        limits = {}
        for spec in specs:
            name, sep, value = spec.partition("=")
            name = name.strip().lower()
            if not sep or name not in METRICS:
                raise UserError(f"{source}: {spec!r}: expected NAME=FRACTION with NAME one of {', '.join(METRICS)}")
            limits[name] = _fraction(value.strip(), f"{source}: {spec!r}")
        return cls(tuple(sorted(limits.items())))

    def as_dict(self) -> dict[str, float]:
        return dict(self.limits)

    @property
    def primary(self) -> str:
        """The tightest-looking bound (smallest fraction): the resource the state reports on."""
        return min(self.limits, key=lambda kv: kv[1])[0]

    def usage(self, cost: Cost, ref: Cost) -> dict[str, float]:
        """Fraction of the float model used, per budget metric."""
        return {name: getattr(cost, METRICS[name]) / max(1, getattr(ref, METRICS[name])) for name, _ in self.limits}

    def met(self, cost: Cost, ref: Cost) -> bool:
        return all(getattr(cost, METRICS[n]) <= lim * getattr(ref, METRICS[n]) for n, lim in self.limits)

    def scaled(self, power: float) -> Budget:
        """Each fraction to ``power`` (two-stage search: ``0.5`` gives pruning half the compression in log space)."""
        return Budget(tuple((n, lim ** power) for n, lim in self.limits))

    def __str__(self) -> str:
        return ", ".join(f"{n} <= {lim:.4g} ({1 / lim:.3g}x smaller)" for n, lim in self.limits)


def _fraction(text: str, where: str) -> float:
    try:
        if text.endswith("x"):
            value = 1.0 / float(text[:-1])
        elif "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: not a fraction") from None
    if not 0.0 < value <= 1.0:
        raise UserError(f"{where}: the fraction must be in (0, 1], got {value:g}")
    return value
