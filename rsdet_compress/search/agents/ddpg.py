"""AJPQ's hierarchical DDPG agent: a layer controller picks sparsity, a channel controller picks bits given it.

Structure follows AMC/HAQ (mit-han-lab ``lib/rl/ddpg.py``): actor/critic MLPs
with target copies and soft updates, a replay buffer, uniform random warm-up
episodes, exploration noise whose sigma decays per episode (in logit space,
:func:`exploration.logit_normal`, where AMC/HAQ draw a truncated normal), and
an episodic reward (one candidate evaluation per episode) given to every
step and centred by a moving-average baseline. The AJPQ twist is the actor:

    a[0]   = actor_l(s)            layer controller: sparsity of this layer
    a[1:3] = actor_c(s, a[0])      channel controller: mean bits, bit spread

so the bit allocation is chosen knowing how much of the layer survives. The
channel controller is trained both at the actor's own sparsity and at the
sparsities actually applied (stored, after the environment's budget wall):
on the synthetic test this lifted the worst of 16 seeds from 0.62 to 0.85 of
the optimum (15 of 16 above 0.9, against 13).

Self-imitation. A search on a CPU affords tens of candidates, not AMC's
hundreds, and a critic fitted on a few episodes gives a poor gradient. So the
actor also imitates the best episode so far (its states and applied actions;
Oh et al., "Self-Imitation Learning", ICML 2018, for the on-policy case):
exploration noise then centres near the best known policy as soon as the
warm-up ends, and the critic's gradient moves it from there.

Critic target. Every transition carries the same final reward R (AMC/HAQ),
and we regress ``Q(s_t, a_t) -> R - b`` (``discount = 0``, the default): the
critic estimates the episode's outcome given this layer's decision, and the
actor climbs it. AMC/HAQ's update also has a bootstrap term
``discount * Q'(s', actor'(s'))`` through the target networks; it is kept
(``discount > 0``) but off, since with R on every step it adds R to itself
up to T times along the episode. The baseline ``b`` (moving average of R) is
subtracted when a batch is sampled, as AMC/HAQ's ``update_policy`` does, so
all transitions in a batch share one baseline.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rsdet_compress.search.env import ACTION_DIM

from .exploration import logit_normal, warmup_action
from .replay import ReplayBuffer


@dataclass
class DDPGConfig:
    hidden: tuple[int, int] = (300, 300)  # AMC/HAQ's: costs nothing next to a detector evaluation; 64-64
    # saturated its sigmoids and got stuck more often in development runs on the synthetic test
    lr_actor: float = 1e-4  # AMC/HAQ: the actor moves slower than the critic it climbs
    lr_critic: float = 1e-3  # AMC/HAQ
    tau: float = 0.01  # AMC/HAQ soft target update rate
    discount: float = 0.0  # every step already carries the final reward (see module docstring)
    batch_size: int = 64  # AMC/HAQ minibatch
    buffer_episodes: int = 50  # capacity in episodes (x T steps; AMC/HAQ keep 100-128). The critic regresses the
    # final reward, so episodes of old policies bias it: in development runs 50 reached 0.93-0.97 of the synthetic
    # optimum where 2000 reached 0.78-0.89
    warmup_episodes: int = 20  # uniform random episodes first (AMC/HAQ: 20-100 of 400-600); with 10 the critic
    # saw too little of the space and the search stalled more often in development runs
    sigma_init: float = 0.5  # AMC/HAQ initial truncated-normal std: broad exploration over [0, 1]
    sigma_decay: float = 0.99  # per post-warm-up episode (HAQ); 0.5 -> ~0.07 after 200 episodes
    baseline_decay: float = 0.9  # moving-average reward baseline: b = d*b + (1-d)*R, ~10-episode memory
    updates_per_episode: int | None = None  # gradient steps per episode; None = T, one per transition as AMC/HAQ
    init_w: float = 3e-3  # AMC/HAQ: last layers start near zero, so sigmoid actions start near 0.5
    warmup_strength: bool = True  # warm-up sparsity actions scaled by one uniform draw per episode (see
    # exploration.warmup_action): uniform per-layer actions prune ~40% everywhere, which no detector survives
    # without fine-tuning, so every warm-up reward was 0 and the critic learnt nothing on YOLOv8n
    init_sparsity: float = 0.1  # the layer controller's starting action (its last bias), as ABCP starts from the
    # (nearly) full network: at AMC's 0.5 every learning episode pruned ~40% per layer and the budget fill then
    # spent the rest on 8-bit weights; on SkyNet (16 candidates) those scored 0.00-0.21 mAP50 and lost to random
    elite_weight: float = 1.0  # self-imitation (see module docstring): actor loss += w * MSE to the best episode's
    # applied actions. Synthetic test, 16 episodes x 12 seeds (additive / multiplicative reward): 0.69 / 0.065 with
    # init_sparsity alone, 0.71 / 0.077 with w=1 (random: 0.67 / 0.026); 300 episodes: 0.91-0.95 of the optimum
    shared_noise: float = 0.0  # fraction of the (logit) noise variance drawn once per episode and shared by all its
    # layers, so episodes explore the global prune-vs-bits trade-off. Off by default: on the synthetic test (300
    # episodes, 3 seeds) 0.5 reached 0.87-0.89 of the optimum, 0 reached 0.93-0.97 (AMC/HAQ's truncated normal,
    # since removed: 0.91-0.95; its draws near the 0.1 start averaged ~0.2 sparsity at sigma 0.2, logit noise's
    # median stays at the actor's action)


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, gen: torch.Generator, init_w: float) -> nn.Sequential:
    """ReLU MLP initialised from ``gen`` (fan-in uniform, last layer +-init_w as AMC), never the global RNG."""
    dims = [n_in, *hidden, n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = torch.nn.utils.skip_init(nn.Linear, a, b)  # no default init: it would draw from the global RNG
        last = i == len(dims) - 2
        bound = init_w if last else 1.0 / math.sqrt(a)
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
        layers += [lin] if last else [lin, nn.ReLU()]
    return nn.Sequential(*layers)


class HierarchicalActor(nn.Module):
    """Layer controller ``s -> a0`` and channel controller ``(s, a0) -> (a1, a2)``, all sigmoids in [0, 1]."""

    def __init__(self, state_dim: int, hidden: Sequence[int], gen: torch.Generator, init_w: float) -> None:
        super().__init__()
        self.layer = _mlp(state_dim, hidden, 1, gen, init_w)
        self.channel = _mlp(state_dim + 1, hidden, ACTION_DIM - 1, gen, init_w)

    def sparsity(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layer(s))

    def bits(self, s: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.channel(torch.cat([s, a0], -1)))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        a0 = self.sparsity(s)
        return torch.cat([a0, self.bits(s, a0)], -1)


class Critic(nn.Module):
    """``Q(s, a)``: one MLP on the concatenated state and full action (AMC adds two input layers; same thing)."""

    def __init__(self, state_dim: int, hidden: Sequence[int], gen: torch.Generator, init_w: float) -> None:
        super().__init__()
        self.net = _mlp(state_dim + ACTION_DIM, hidden, 1, gen, init_w)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], -1)).squeeze(-1)


class AJPQAgent:
    """Hierarchical DDPG over (sparsity, mean bits, bit spread) per layer; never skips blocks."""

    def __init__(self, state_dim: int, n_blocks: int = 0, seed: int = 0, config: DDPGConfig | None = None) -> None:
        self.state_dim, self.n_blocks, self.seed = int(state_dim), int(n_blocks), int(seed)
        self.config = cfg = config or DDPGConfig()
        noise_seed, replay_seed = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.default_rng(noise_seed)  # warm-up actions and exploration noise
        self._replay_seed = replay_seed  # seeds the buffer's sampler when the first episode allocates it
        self.torch_gen = torch.Generator().manual_seed(seed)  # network initialisation
        self.actor = HierarchicalActor(state_dim, cfg.hidden, self.torch_gen, cfg.init_w)
        with torch.no_grad():
            p = min(max(cfg.init_sparsity, 1e-3), 1 - 1e-3)
            self.actor.layer[-1].bias.add_(math.log(p / (1 - p)))
        self.critic = Critic(state_dim, cfg.hidden, self.torch_gen, cfg.init_w)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic)
        self.buffer: ReplayBuffer | None = None  # allocated on the first episode, once T is known
        self.baseline: float | None = None  # moving average of episode rewards
        self.sigma = cfg.sigma_init  # exploration std of the next post-warm-up episode
        self.episodes_seen = 0
        self.steps_per_episode = 0  # T, from the last observed episode
        self.strength = 1.0  # the current warm-up episode's pruning strength
        self.elite: tuple[float, np.ndarray, np.ndarray] | None = None  # (reward, states, applied actions)
        self.shared = np.zeros(ACTION_DIM)  # the current learning episode's shared noise (cfg.shared_noise)
        self.worst: float | None = None  # lowest episode reward: the best episode is imitated only when it beats it

    # -- acting ------------------------------------------------------------------------------
    def select_blocks(self, episode: int) -> np.ndarray:
        """AJPQ compresses every block: all zeros (1 would mean skip). Draws the warm-up episode's strength, or
        a learning episode's shared noise."""
        cfg = self.config
        if episode < cfg.warmup_episodes:
            self.strength = float(self.rng.random()) if cfg.warmup_strength else 1.0
        elif cfg.shared_noise > 0:
            self.shared = self.rng.standard_normal(ACTION_DIM)
        return np.zeros(self.n_blocks, np.int64)

    def select_action(self, state: np.ndarray, episode: int) -> np.ndarray:
        """Uniform random during warm-up; else the hierarchical actor with exploration noise, in [0, 1]^3."""
        if episode < self.config.warmup_episodes:
            return warmup_action(self.rng, self.strength)
        s = torch.as_tensor(np.asarray(state, np.float32)).unsqueeze(0)
        with torch.no_grad():
            a0 = self._noisy(self.actor.sparsity(s).numpy(), 0)
            mu_c = self.actor.bits(s, torch.as_tensor(a0, dtype=torch.float32).unsqueeze(0)).numpy()
        a12 = self._noisy(mu_c, 1)
        return np.concatenate([a0, a12]).astype(np.float32)

    def _noisy(self, mu: np.ndarray, first: int) -> np.ndarray:
        """Logit-space exploration noise around ``mu`` (action dimensions ``first``...)."""
        return logit_normal(mu, self.sigma, self.rng, self.shared[first:], self.config.shared_noise)

    def greedy_action(self, state: np.ndarray) -> np.ndarray:
        """The actor's action without noise (for a final deterministic rollout)."""
        with torch.no_grad():
            return self.actor(torch.as_tensor(np.asarray(state, np.float32)).unsqueeze(0))[0].numpy()

    # -- learning ----------------------------------------------------------------------------
    def observe(self, traj: Sequence[tuple], blocks: np.ndarray, reward: float) -> None:
        """Store the episode's (s, applied a, s', done) with its final reward; update baseline and sigma."""
        cfg = self.config
        if self.buffer is None:
            self.buffer = ReplayBuffer(cfg.buffer_episodes * len(traj), self.state_dim, ACTION_DIM, self._replay_seed)
        for s, a, s2, done in traj:
            self.buffer.add(s, a, reward, s2, done)
        r = float(reward)
        self.worst = r if self.worst is None else min(self.worst, r)
        if self.elite is None or r > self.elite[0]:
            self.elite = (r, np.stack([t[0] for t in traj]).astype(np.float32),
                          np.stack([t[1] for t in traj]).astype(np.float32))
        decay = cfg.baseline_decay
        self.baseline = r if self.baseline is None else decay * self.baseline + (1 - decay) * r
        if self.episodes_seen >= cfg.warmup_episodes:
            self.sigma *= cfg.sigma_decay
        self.episodes_seen += 1
        self.steps_per_episode = len(traj)

    def update_policy(self) -> dict[str, float]:
        """Minibatch critic/actor steps and soft target updates, once warm-up is over; returns mean losses."""
        cfg = self.config
        if self.buffer is None or self.episodes_seen < cfg.warmup_episodes:
            return {}
        n = cfg.updates_per_episode or self.steps_per_episode
        lc = la = 0.0
        for _ in range(n):
            b = {k: torch.as_tensor(v) for k, v in self.buffer.sample(cfg.batch_size).items()}
            target = b["rewards"] - float(self.baseline or 0.0)
            if cfg.discount > 0:
                with torch.no_grad():
                    q2 = self.critic_target(b["next_states"], self.actor_target(b["next_states"]))
                target = target + cfg.discount * (1 - b["dones"]) * q2
            critic_loss = nn.functional.mse_loss(self.critic(b["states"], b["actions"]), target)
            self.critic_opt.zero_grad()
            critic_loss.backward()
            self.critic_opt.step()
            # Both controllers climb Q at the actor's own sparsity; the channel controller also at the sparsities
            # actually applied (the wall may have changed them): bits given sparsity, whatever chose it.
            a0 = b["actions"][:, :1]
            actor_loss = -(self.critic(b["states"], self.actor(b["states"])).mean()
                           + self.critic(b["states"], torch.cat([a0, self.actor.bits(b["states"], a0)], -1)).mean())
            if cfg.elite_weight > 0 and self.elite is not None and self.elite[0] > self.worst:
                # equal rewards (e.g. every warm-up candidate at mAP 0) say nothing: imitating the first of them
                # pulled a YOLOv8n search (flops 1/2) to 45-67% sparsity, where every candidate scored 0
                actor_loss = actor_loss + cfg.elite_weight * self._imitation_loss()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            self._soft_update()
            lc += critic_loss.item()
            la += actor_loss.item()
        return {"critic_loss": lc / n, "actor_loss": la / n}

    def _imitation_loss(self) -> torch.Tensor:
        """MSE of both controllers to the best episode's applied actions (the channel one given its sparsity)."""
        s, a = (torch.as_tensor(x) for x in self.elite[1:])
        a0 = a[:, :1]
        return (nn.functional.mse_loss(self.actor.sparsity(s), a0)
                + nn.functional.mse_loss(self.actor.bits(s, a0), a[:, 1:]))

    def _soft_update(self) -> None:
        tau = self.config.tau
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1 - tau).add_(p, alpha=tau)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything for a bit-exact resume (copies, not views): nets, optimisers, replay, baseline, sigma, RNGs."""
        nets = {k: _clone(getattr(self, k).state_dict()) for k in ("actor", "actor_target", "critic", "critic_target")}
        return {
            "agent": "ajpq", "config": asdict(self.config), "state_dim": self.state_dim, "n_blocks": self.n_blocks,
            **nets,
            "actor_opt": copy.deepcopy(self.actor_opt.state_dict()),
            "critic_opt": copy.deepcopy(self.critic_opt.state_dict()),
            "replay": None if self.buffer is None else self.buffer.state_dict(),
            "replay_seed": (self._replay_seed.entropy, list(self._replay_seed.spawn_key)),  # buffer not built yet
            "baseline": self.baseline, "sigma": self.sigma,
            "elite": None if self.elite is None else (self.elite[0], self.elite[1].copy(), self.elite[2].copy()),
            "episodes_seen": self.episodes_seen, "steps_per_episode": self.steps_per_episode,
            "strength": self.strength, "shared": self.shared.tolist(), "worst": self.worst,
            "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` (the agent must have been built with the same state_dim and config)."""
        if d.get("agent") != "ajpq" or int(d["state_dim"]) != self.state_dim:
            raise ValueError(f"not an AJPQ state for state_dim={self.state_dim}")
        for k in ("actor", "actor_target", "critic", "critic_target"):
            getattr(self, k).load_state_dict(d[k])
        self.actor_opt.load_state_dict(copy.deepcopy(d["actor_opt"]))
        self.critic_opt.load_state_dict(copy.deepcopy(d["critic_opt"]))
        entropy, spawn_key = d["replay_seed"]
        self._replay_seed = np.random.SeedSequence(entropy, spawn_key=tuple(spawn_key))
        self.buffer = None
        if d["replay"] is not None:
            self.buffer = ReplayBuffer(int(d["replay"]["capacity"]), self.state_dim, ACTION_DIM)
            self.buffer.load_state_dict(d["replay"])
        self.baseline = d["baseline"]
        self.sigma = float(d["sigma"])
        e = d.get("elite")
        self.elite = None if e is None else (float(e[0]), np.array(e[1]), np.array(e[2]))
        self.episodes_seen, self.steps_per_episode = int(d["episodes_seen"]), int(d["steps_per_episode"])
        self.strength = float(d.get("strength", 1.0))
        self.shared = np.array(d.get("shared", [0.0] * ACTION_DIM), np.float64)
        self.worst = d.get("worst", None if self.elite is None else self.elite[0] - 1.0)  # older states: imitate
        self.rng.bit_generator.state = d["rng"]
        self.torch_gen.set_state(d["torch_gen"])


def _clone(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}
