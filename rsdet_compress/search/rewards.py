"""Rewards: small pure functions of a candidate's accuracy and cost (named, never ``eval``-ed).

Every function takes ``acc`` (the reward metric, e.g. COCO mAP@0.5, in 0..1)
and ``usage`` (fraction of the float model used per budget metric, e.g.
``{"size": 0.12}``) and returns a float to maximise. Budgets are enforced by
the environment (every candidate meets them), so the default is accuracy only.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from rsdet_compress.errors import UserError

RewardFn = Callable[[float, dict], float]


def accuracy(acc: float, usage: dict[str, float]) -> float:
    """Accuracy under a hard budget (HAQ): the environment already guarantees the budget."""
    return acc


def accuracy_log_cost(acc: float, usage: dict[str, float], per_halving: float = 0.01) -> float:
    """AMC-style accuracy x log-cost trade-off: ``per_halving`` accuracy points per halving of each resource.

    Within the hard budget, a candidate that halves its size again is worth
    1 mAP point more (by default); AMC's ``-error * log(FLOPs)`` in relative form.
    """
    return acc + per_halving * sum(-math.log2(max(u, 1e-9)) for u in usage.values()) / max(1, len(usage))


def accuracy_minus_cost(acc: float, usage: dict[str, float], weight: float = 0.1) -> float:
    """Accuracy minus a small penalty per unit of budget used (prefers smaller models at a tie)."""
    return acc - weight * sum(usage.values()) / max(1, len(usage))


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "accuracy_log_cost": accuracy_log_cost,
    "accuracy_minus_cost": accuracy_minus_cost,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
