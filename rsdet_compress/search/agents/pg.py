"""ABCP's policy-gradient agent: Bernoulli block skips + a Gaussian policy over per-layer actions, REINFORCE.

ABCP searches a mixed space: which blocks to skip (discrete, once per
episode) and per-layer compression (continuous). One episode is one sample
of both; its log-probability is

    log p = sum_j log Bernoulli(skip_j; sigmoid(logit_j)) + sum_t log N_[0,1](a_t; mu(s_t), std)

and one REINFORCE step minimises ``-(R - b) * log p`` with a moving-average
baseline ``b``. The continuous policy is a small MLP on the state (mean via a
sigmoid) with a learned state-independent log-std: the state says which
layer this is and how much budget is left (which depends on the skipped
blocks), so one net shares what it learns across layers and block choices,
where per-step means would ignore the blocks and the budget.

Actions are clipped to [0, 1]; the log-probability of a value on a bound is
the Gaussian mass beyond it (exact for a clipped Gaussian). The environment
may project actions (budget wall): we score the APPLIED action, which is an
approximation — the gradient then pulls the policy towards feasible actions.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .ddpg import ACTION_DIM, _clone, _mlp


@dataclass
class PGConfig:
    hidden: tuple[int, int] = (64, 64)  # on-policy, one sample per episode: a small net learns faster
    lr: float = 3e-3  # Adam; REINFORCE with one episode per step needs small, steady moves
    skip_prob_init: float = 0.15  # early episodes keep most blocks (ABCP starts from the full network)
    std_init: float = 0.25  # exploration over [0, 1] actions: broad at first
    std_min: float = 0.02  # floor: keeps log-probs finite and some exploration
    std_max: float = 0.5  # ceiling: beyond this the clipped Gaussian is mostly bound mass
    baseline_decay: float = 0.9  # moving-average reward baseline: b = d*b + (1-d)*R, ~10-episode memory
    warmup_episodes: int = 0  # uniform random actions (no learning) first; 0: REINFORCE is on-policy from the start
    init_w: float = 3e-3  # last layer near zero: means start at 0.5


def _clipped_normal_log_prob(a: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log-density of N(mu, std) clipped to [0, 1] at ``a``: point mass on the bounds, density inside."""
    dist = torch.distributions.Normal(mu, std)
    inside = dist.log_prob(a)
    low = torch.log(dist.cdf(torch.zeros_like(a)).clamp_min(1e-12))
    high = torch.log((1 - dist.cdf(torch.ones_like(a))).clamp_min(1e-12))
    return torch.where(a <= 0, low, torch.where(a >= 1, high, inside))


class GaussianPolicy(nn.Module):
    """``s -> mean in [0, 1]^3`` by an MLP + sigmoid, with a learned log-std per action."""

    def __init__(self, state_dim: int, hidden: Sequence[int], std: float, gen: torch.Generator, init_w: float) -> None:
        super().__init__()
        self.mean_net = _mlp(state_dim, hidden, ACTION_DIM, gen, init_w)
        self.log_std = nn.Parameter(torch.full((ACTION_DIM,), math.log(std)))

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.mean_net(s)), self.log_std


class ABCPAgent:
    """REINFORCE over block skips (Bernoulli logits) and per-layer (sparsity, mean bits, bit spread)."""

    config_cls = PGConfig

    def __init__(self, state_dim: int, n_blocks: int, seed: int = 0, config: PGConfig | None = None) -> None:
        self.state_dim, self.n_blocks, self.seed = int(state_dim), int(n_blocks), int(seed)
        self.config = cfg = config or PGConfig()
        self.rng = np.random.default_rng(np.random.SeedSequence(seed))  # block and action sampling
        self.torch_gen = torch.Generator().manual_seed(seed)  # network initialisation
        self.policy = GaussianPolicy(state_dim, cfg.hidden, cfg.std_init, self.torch_gen, cfg.init_w)
        p = cfg.skip_prob_init
        self.skip_logits = nn.Parameter(torch.full((n_blocks,), math.log(p / (1 - p))))
        self.opt = torch.optim.Adam([*self.policy.parameters(), self.skip_logits], lr=cfg.lr)
        self.baseline: float | None = None
        self.episodes_seen = 0
        self.pending: dict[str, Any] | None = None  # last observed episode, consumed by update_policy

    def _std(self) -> torch.Tensor:
        c = self.config
        return self.policy.log_std.clamp(math.log(c.std_min), math.log(c.std_max)).exp()

    def skip_probs(self) -> np.ndarray:
        """Current probability of skipping each block."""
        with torch.no_grad():
            return torch.sigmoid(self.skip_logits).numpy().astype(np.float64)

    def select_blocks(self, episode: int) -> np.ndarray:
        """Sample block skips (1 = skip) from independent Bernoullis."""
        return (self.rng.random(self.n_blocks) < self.skip_probs()).astype(np.int64)

    def select_action(self, state: np.ndarray, episode: int) -> np.ndarray:
        """Uniform random during warm-up; else a clipped Gaussian sample around the policy mean."""
        if episode < self.config.warmup_episodes:
            return self.rng.random(ACTION_DIM).astype(np.float32)
        with torch.no_grad():
            mu, _ = self.policy(torch.as_tensor(np.asarray(state, np.float32)))
            std = self._std()
        a = mu.numpy() + std.numpy() * self.rng.standard_normal(ACTION_DIM)
        return np.clip(a, 0.0, 1.0).astype(np.float32)

    def greedy_action(self, state: np.ndarray) -> np.ndarray:
        """The policy mean (for a final deterministic rollout)."""
        with torch.no_grad():
            return self.policy(torch.as_tensor(np.asarray(state, np.float32)))[0].numpy()

    def observe(self, traj: Sequence[tuple], blocks: np.ndarray, reward: float) -> None:
        """Keep the episode (states, applied actions, blocks, advantage) for the next update; update the baseline."""
        cfg, r = self.config, float(reward)
        advantage = 0.0 if self.baseline is None else r - self.baseline
        if self.episodes_seen >= cfg.warmup_episodes:
            self.pending = {
                "states": np.stack([np.asarray(s, np.float32) for s, _, _, _ in traj]),
                "actions": np.stack([np.asarray(a, np.float32) for _, a, _, _ in traj]),
                "blocks": np.asarray(blocks, np.float32).reshape(self.n_blocks),
                "advantage": advantage,
            }
        self.baseline = r if self.baseline is None else cfg.baseline_decay * self.baseline + (1 - cfg.baseline_decay) * r
        self.episodes_seen += 1

    def update_policy(self) -> dict[str, float]:
        """One REINFORCE step on the last observed episode: minimise ``-(R - b) * log p(episode)``."""
        if self.pending is None:
            return {}
        ep, self.pending = self.pending, None
        mu, _ = self.policy(torch.as_tensor(ep["states"]))
        logp_actions = _clipped_normal_log_prob(torch.as_tensor(ep["actions"]), mu, self._std()).sum()
        blocks = torch.as_tensor(ep["blocks"])
        logp_blocks = -nn.functional.binary_cross_entropy_with_logits(self.skip_logits, blocks, reduction="sum")
        loss = -ep["advantage"] * (logp_blocks + logp_actions)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"pg_loss": loss.item(), "advantage": ep["advantage"]}

    def state_dict(self) -> dict[str, Any]:
        """Everything for a bit-exact resume (copies): policy, skip logits, optimiser, baseline, pending episode, RNGs."""
        return {
            "agent": "abcp", "config": asdict(self.config), "state_dim": self.state_dim, "n_blocks": self.n_blocks,
            "policy": _clone(self.policy.state_dict()), "skip_logits": self.skip_logits.detach().clone(),
            "opt": copy.deepcopy(self.opt.state_dict()), "baseline": self.baseline,
            "episodes_seen": self.episodes_seen, "pending": copy.deepcopy(self.pending),
            "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` (same state_dim, n_blocks and config)."""
        if d.get("agent") != "abcp" or int(d["state_dim"]) != self.state_dim or int(d["n_blocks"]) != self.n_blocks:
            raise ValueError(f"not an ABCP state for state_dim={self.state_dim}, n_blocks={self.n_blocks}")
        self.policy.load_state_dict(d["policy"])
        with torch.no_grad():
            self.skip_logits.copy_(d["skip_logits"])
        self.opt.load_state_dict(copy.deepcopy(d["opt"]))
        self.baseline = d["baseline"]
        self.episodes_seen = int(d["episodes_seen"])
        self.pending = copy.deepcopy(d["pending"])
        self.rng.bit_generator.state = d["rng"]
        self.torch_gen.set_state(d["torch_gen"])
