"""Search agents: a plain dict registry, ``make_agent(name, ...)``."""
from __future__ import annotations

from rsdet_compress.errors import UserError

from .ddpg import AJPQAgent, DDPGConfig
from .pg import ABCPAgent, PGConfig

AGENTS = {"ajpq": AJPQAgent, "abcp": ABCPAgent}
CONFIGS = {"ajpq": DDPGConfig, "abcp": PGConfig}


def make_agent(name: str, state_dim: int, n_blocks: int = 0, seed: int = 0, **config):
    """Agent ``name`` for states of ``state_dim`` and ``n_blocks`` skippable blocks; ``config`` overrides defaults."""
    if name not in AGENTS:
        raise UserError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}")
    return AGENTS[name](state_dim, n_blocks, seed, CONFIGS[name](**config))


__all__ = ["AGENTS", "ABCPAgent", "AJPQAgent", "DDPGConfig", "PGConfig", "make_agent"]
