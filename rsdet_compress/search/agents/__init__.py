"""Search agents: a plain dict registry and ``make_agent(name, ...)``.

``ajpq``: hierarchical DDPG (layer controller -> sparsity, channel controller
-> bits given it); ``abcp``: REINFORCE over block skips and per-layer actions.
Both follow the episode loop of ``rsdet_compress.search.searchers``.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from rsdet_compress.errors import UserError

from .ddpg import AJPQAgent, DDPGConfig
from .pg import ABCPAgent, PGConfig

AGENTS: dict[str, type] = {"ajpq": AJPQAgent, "abcp": ABCPAgent}
CONFIGS: dict[str, type] = {"ajpq": DDPGConfig, "abcp": PGConfig}


def make_agent(name: str, state_dim: int, n_blocks: int = 0, seed: int = 0, **config: Any) -> AJPQAgent | ABCPAgent:
    """Agent ``name`` for ``state_dim``-long states and ``n_blocks`` skippable blocks; ``config`` overrides defaults."""
    if name not in AGENTS:
        raise UserError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}")
    known = {f.name for f in fields(CONFIGS[name])}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"agent {name!r}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return AGENTS[name](state_dim, n_blocks, seed, CONFIGS[name](**config))


__all__ = ["AGENTS", "CONFIGS", "ABCPAgent", "AJPQAgent", "DDPGConfig", "PGConfig", "make_agent"]
