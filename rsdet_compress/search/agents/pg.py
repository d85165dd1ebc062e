"""ABCP's policy-gradient agent: Bernoulli block skips + per-layer Gaussian actions, trained by REINFORCE.

ABCP searches a mixed space: which blocks to skip (discrete, once per
episode) and per-layer compression (continuous). One episode is one sample
of both; its log-probability is

    log p = sum_j log Bernoulli(skip_j; sigmoid(logit_j)) + sum_t log N_[0,1](a_t; mean_t, std)

and one REINFORCE step per episode minimises ``-A * log p`` with the
advantage ``A = (R - b) / s``: ``b`` a moving-average baseline, ``s`` a
moving RMS of ``R - b`` (so the step size does not depend on the reward's
scale, e.g. mAP differences of 0.01).

Policy choice: per-step means (a T x 3 table, indexed by the step within the
episode) rather than an MLP on the state. REINFORCE gets one scalar per
episode; with 100-300 episodes the table is the smallest policy that can
express a per-layer allocation. On the synthetic test an MLP on the state
reached ~50% of the optimum in 300 episodes, the table ~92%. The cost: the
continuous actions do not react to the state (e.g. to the budget freed by
the skipped blocks); the block logits and the means are learned jointly.
Exploration std follows a schedule (a learned std collapsed within ~50
episodes and stalled the search).

Actions are clipped to [0, 1]; the log-probability of a value on a bound is
the Gaussian mass beyond it (exact for a clipped Gaussian). The environment
may project actions (budget wall): we score the APPLIED action, an
approximation that pulls the means towards feasible actions; scoring the
proposed action (exact REINFORCE) did worse on the synthetic test.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

ACTION_DIM = 3  # sparsity, mean-bit position, bit spread


@dataclass
class PGConfig:
    lr: float = 0.05  # Adam on the per-step means: a mean travels ~0.5 in ~50 consistent steps
    lr_blocks: float = 0.05  # Adam on the skip logits: a logit travels ~3 units within ~100 episodes
    skip_prob_init: float = 0.15  # early episodes keep most blocks (ABCP starts from the full network)
    std_init: float = 0.25  # exploration std over [0, 1] actions: broad at first
    std_decay: float = 0.995  # per episode: 0.25 -> 0.06 after 300 episodes
    std_min: float = 0.03  # floor: keeps log-probs finite and a little exploration
    baseline_decay: float = 0.9  # moving-average baseline and RMS: ~10-episode memory
    warmup_episodes: int = 0  # uniform random actions, no learning; 0: REINFORCE is on-policy from the start
    max_steps: int = 1024  # rows of the mean table; detectors here have < 300 compressible layers


def _clipped_normal_log_prob(a: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log-density of N(mu, std) clipped to [0, 1] at ``a``: point mass on the bounds, density inside."""
    dist = torch.distributions.Normal(mu, std)
    low = torch.log(dist.cdf(torch.zeros_like(a)).clamp_min(1e-12))
    high = torch.log((1 - dist.cdf(torch.ones_like(a))).clamp_min(1e-12))
    return torch.where(a <= 0, low, torch.where(a >= 1, high, dist.log_prob(a)))


class ABCPAgent:
    """REINFORCE over block skips (Bernoulli logits) and per-layer (sparsity, mean bits, bit spread)."""

    config_cls = PGConfig

    def __init__(self, state_dim: int, n_blocks: int, seed: int = 0, config: PGConfig | None = None) -> None:
        self.state_dim, self.n_blocks, self.seed = int(state_dim), int(n_blocks), int(seed)
        self.config = cfg = config or PGConfig()
        self.rng = np.random.default_rng(np.random.SeedSequence(seed))  # block and action sampling
        self.torch_gen = torch.Generator().manual_seed(seed)  # unused by the maths; kept for a uniform resume contract
        self.mean_logits = nn.Parameter(torch.zeros(cfg.max_steps, ACTION_DIM))  # sigmoid(0) = 0.5: centre of [0, 1]
        p = cfg.skip_prob_init
        self.skip_logits = nn.Parameter(torch.full((n_blocks,), math.log(p / (1 - p))))
        self.opt = torch.optim.Adam([{"params": [self.mean_logits], "lr": cfg.lr},
                                     {"params": [self.skip_logits], "lr": cfg.lr_blocks}])
        self.baseline: float | None = None
        self.adv_rms: float | None = None  # moving RMS of R - baseline
        self.std = cfg.std_init  # exploration std of the current episode
        self.episodes_seen = 0
        self.step = 0  # step within the current episode (row of the mean table)
        self.pending: dict[str, Any] | None = None  # last observed episode, consumed by update_policy

    def skip_probs(self) -> np.ndarray:
        """Current probability of skipping each block."""
        with torch.no_grad():
            return torch.sigmoid(self.skip_logits).numpy().astype(np.float64)

    def means(self, n_steps: int) -> np.ndarray:
        """Per-step action means, shape (n_steps, 3)."""
        with torch.no_grad():
            return torch.sigmoid(self.mean_logits[:n_steps]).numpy()

    def select_blocks(self, episode: int) -> np.ndarray:
        """Start an episode: sample block skips (1 = skip) from independent Bernoullis."""
        self.step = 0
        return (self.rng.random(self.n_blocks) < self.skip_probs()).astype(np.int64)

    def select_action(self, state: np.ndarray, episode: int) -> np.ndarray:
        """Uniform random during warm-up; else a clipped Gaussian sample around this step's mean."""
        t, self.step = self.step, self.step + 1
        if t >= self.config.max_steps:
            raise ValueError(f"episode longer than PGConfig.max_steps={self.config.max_steps}")
        if episode < self.config.warmup_episodes:
            return self.rng.random(ACTION_DIM).astype(np.float32)
        a = self.means(t + 1)[t] + self.std * self.rng.standard_normal(ACTION_DIM)
        return np.clip(a, 0.0, 1.0).astype(np.float32)

    def greedy_action(self, state: np.ndarray, step: int) -> np.ndarray:
        """The mean action of step ``step`` (for a final deterministic rollout)."""
        return self.means(step + 1)[step].copy()

    def observe(self, traj: Sequence[tuple], blocks: np.ndarray, reward: float) -> None:
        """Keep the episode (applied actions, blocks, advantage) for the next update; update baseline and std."""
        cfg, r = self.config, float(reward)
        adv = 0.0 if self.baseline is None else r - self.baseline
        self.adv_rms = abs(adv) if not self.adv_rms else math.sqrt(
            cfg.baseline_decay * self.adv_rms ** 2 + (1 - cfg.baseline_decay) * adv * adv)
        if self.episodes_seen >= cfg.warmup_episodes:
            self.pending = {
                "actions": np.stack([np.asarray(a, np.float32) for _, a, _, _ in traj]),
                "blocks": np.asarray(blocks, np.float32).reshape(self.n_blocks),
                "advantage": adv / self.adv_rms if self.adv_rms > 0 else 0.0,
                "std": self.std,
            }
            self.std = max(cfg.std_min, self.std * cfg.std_decay)
        self.baseline = r if self.baseline is None else cfg.baseline_decay * self.baseline + (1 - cfg.baseline_decay) * r
        self.episodes_seen += 1
        self.step = 0

    def update_policy(self) -> dict[str, float]:
        """One REINFORCE step on the last observed episode: minimise ``-A * log p(episode)``."""
        if self.pending is None:
            return {}
        ep, self.pending = self.pending, None
        actions = torch.as_tensor(ep["actions"])
        mu = torch.sigmoid(self.mean_logits[: len(actions)])
        logp_actions = _clipped_normal_log_prob(actions, mu, torch.tensor(ep["std"])).sum()
        logp_blocks = -nn.functional.binary_cross_entropy_with_logits(
            self.skip_logits, torch.as_tensor(ep["blocks"]), reduction="sum")
        loss = -ep["advantage"] * (logp_blocks + logp_actions)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"pg_loss": loss.item(), "advantage": ep["advantage"]}

    def state_dict(self) -> dict[str, Any]:
        """Everything for a bit-exact resume (copies): means, skip logits, optimiser, baseline, std, RNGs."""
        return {
            "agent": "abcp", "config": asdict(self.config), "state_dim": self.state_dim, "n_blocks": self.n_blocks,
            "mean_logits": self.mean_logits.detach().clone(), "skip_logits": self.skip_logits.detach().clone(),
            "opt": copy.deepcopy(self.opt.state_dict()), "baseline": self.baseline, "adv_rms": self.adv_rms,
            "std": self.std, "episodes_seen": self.episodes_seen, "step": self.step,
            "pending": copy.deepcopy(self.pending),
            "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` (same state_dim, n_blocks and config)."""
        if d.get("agent") != "abcp" or int(d["state_dim"]) != self.state_dim or int(d["n_blocks"]) != self.n_blocks:
            raise ValueError(f"not an ABCP state for state_dim={self.state_dim}, n_blocks={self.n_blocks}")
        with torch.no_grad():
            self.mean_logits.copy_(d["mean_logits"])
            self.skip_logits.copy_(d["skip_logits"])
        self.opt.load_state_dict(copy.deepcopy(d["opt"]))
        self.baseline, self.adv_rms, self.std = d["baseline"], d["adv_rms"], float(d["std"])
        self.episodes_seen, self.step = int(d["episodes_seen"]), int(d["step"])
        self.pending = copy.deepcopy(d["pending"])
        self.rng.bit_generator.state = d["rng"]
        self.torch_gen.set_state(d["torch_gen"])
