"""Exploration that fits the search: warm-up actions with a per-episode strength, schedules fitted to the episodes.

Why a strength. Per-layer actions drawn uniformly in [0, 1] prune about 40%
of every channel group (and random policies measured 21-31x smaller under an
8x budget). A detector does not survive that without fine-tuning: on the
airbus YOLOv8n every such candidate scored mAP50 0.00-0.006, so the reward
carried no signal. Drawing one strength ``p ~ U(0, 1)`` per episode and
scaling that episode's sparsity actions by it spreads episodes from "almost
no pruning" to "prune hard", so rewards differ and an agent can learn which
way to go. Bit actions stay uniform; the environment's budget wall and HAQ
tightening still make every episode meet the budget.

Why fitted schedules. AMC/HAQ decay exploration over 400-600 episodes; a
CPU search runs tens. ``fitted(name, episodes)`` shortens the warm-up to a
quarter of the episodes (at most the default 20) and decays the noise so it
reaches ~0.05 (DDPG sigma) or the floor (ABCP std) by the last episode. A
short DDPG search (under 100 learning episodes) starts its noise at 0.2, not
0.5: the warm-up already explored broadly, and N(0.1, 0.5) truncated to
[0, 1] has mean 0.39, so the actor's low-sparsity start and its imitation of
the best episode were drowned (YOLOv8n, 24 candidates: learning episodes
went back to ~37% sparsity at 8 bits and scored 0.00-0.06 mAP50).
"""
from __future__ import annotations

import numpy as np

ACTION_DIM = 3


def warmup_action(rng: np.random.Generator, strength: float) -> np.ndarray:
    """Uniform action in [0, 1]^3 with its sparsity scaled by the episode's ``strength``."""
    a = rng.random(ACTION_DIM)
    a[0] *= strength
    return a.astype(np.float32)


def fitted(name: str, episodes: int) -> dict:
    """Config overrides for agent ``name`` so its exploration schedule spans ``episodes`` candidate evaluations."""
    episodes = max(1, int(episodes))
    if name == "ajpq":
        warmup = min(20, max(2, episodes // 4))
        learn = max(1, episodes - warmup)
        sigma = 0.5 if learn >= 100 else 0.2
        return {"warmup_episodes": warmup, "sigma_init": sigma, "sigma_decay": min(0.99, (0.05 / sigma) ** (1.0 / learn))}
    if name == "abcp":
        return {"std_decay": min(0.995, (0.03 / 0.25) ** (1.0 / episodes))}
    return {}
