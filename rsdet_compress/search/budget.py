"""Resource budgets of a search: "8x smaller weights", "BOPs / 50", as fractions of the float model.

``Budget.parse(["size=0.125", "bops=0.02"])`` -> every candidate must cost at
most 12.5% of the float model's weight storage and 2% of its BOPs;
``latency=0.33``: a third of the float model's latency (measured per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from rsdet_compress.compress.cost import Cost
from rsdet_compress.compress.quant import FLOAT_BITS
from rsdet_compress.errors import UserError

#: budget name -> Cost attribute it bounds (and the per-layer key of ``Cost.per_layer``). ``latency`` is the
#: float model's latency on this machine's runtime, predicted from a measured table (search.latency_cost).
METRICS = {"size": "weight_bits", "bops": "bops", "flops": "flops", "latency": "latency_ms"}
PER_LAYER = {"size": "weight_bits", "bops": "bops", "flops": "macs", "latency": "latency_ms"}
#: how the two-stage search shares a budget between its pruning and its quantization stage
#: (:meth:`Budget.pruning_stage`); ``bits`` first, the default
STAGE_SPLITS = ("bits", "half")
#: weight bits the ``bits`` split expects the quantization stage to reach: the middle of the agents' 2-8-bit range
#: in log space, and the w4a8 of the uniform baseline every table compares against
STAGE_WEIGHT_BITS = 4


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
        """Each fraction to ``power`` (``0.5``: half the compression in log space)."""
        return Budget(tuple((n, lim ** power) for n, lim in self.limits))

    def pruning_stage(self, split: str, act_bits: int) -> Budget:
        """The budget of the two-stage search's first stage, which prunes with float weights.

        ``bits``: each limit times what quantization alone to :data:`STAGE_WEIGHT_BITS`-bit weights and
        ``act_bits``-bit activations gives (size 8x, BOPs 32x at a8, FLOPs nothing), so pruning takes
        only what quantization cannot: the classic prune-to-FLOPs, then quantize-to-size pipeline, and at
        ``bops=0.02`` a 1.6x FLOPs cut that the second stage's bit choice completes. Latency has no fixed
        bit ratio (int8 kernels gain per layer what they gain): half of it in log space.
        ``half``: half of every metric's compression in log space; at ``bops=0.02`` pruning alone must cut
        7x, and quantization at 8 bits then overshoots the budget whatever the second stage chooses.
        """
        if split == "half":
            return self.scaled(0.5)
        if split != "bits":
            raise UserError(f"unknown stage split {split!r}; choose one of {', '.join(STAGE_SPLITS)}")
        weights = FLOAT_BITS / STAGE_WEIGHT_BITS
        gain = {"size": weights, "bops": weights * FLOAT_BITS / act_bits, "flops": 1.0}
        return Budget(tuple((n, min(1.0, lim * gain[n]) if n in gain else lim ** 0.5) for n, lim in self.limits))

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
