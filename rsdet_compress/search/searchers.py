"""Searchers: one interface, one result type, so every comparison spends the same candidate evaluations.

A searcher proposes one episode's policy (``propose``), and learns from its
evaluation (``observe`` -> the :class:`~rsdet_compress.search.env.Candidate`);
``run_episode`` does both in process. Split so that several proposals can be
evaluated at once by search workers (``search --workers K``): the agents then
update after each batch, as batched AMC/ABCP variants do, and with K = 1 the
sequence is exactly the in-process one. ``state_dict`` / ``load_state_dict``
make a searcher resumable after a crash. Registry: ``SEARCHERS``.

* ``ajpq``: the hierarchical DDPG agent (layer controller: sparsity; channel
  controller: bits over the kept channels), no block skipping.
* ``abcp``: policy gradient over block keep/skip plus the same per-layer actions.
* ``random``: random actions (uniform bits, sparsity scaled by a per-episode strength; block skips) through the same
  environment, so every candidate meets the same budget.
* ``two-stage``: first half of the episodes searches pruning only (float
  weights, under the share of the budget that ``--stage-split`` gives it:
  ``Budget.pruning_stage``), the second half searches bit-widths on the best
  pruned structure under the full budget.
* ``uniform``: uniform 8/6/5/4/3/2-bit weights, no pruning (at most 6 candidates).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rsdet_compress.compress.baselines import uniform_bits
from rsdet_compress.compress.policy import Policy
from rsdet_compress.errors import UserError
from rsdet_compress.search.agents import AGENTS, make_agent
from rsdet_compress.search.agents.exploration import fitted, warmup_action
from rsdet_compress.search.env import STATE_DIM, Candidate, CompressEnv, EnvConfig

#: (config, "prune": the two-stage pruning stage's share of the budget; None: the whole budget) -> env
EnvFactory = Callable[[EnvConfig, str | None], CompressEnv]


@dataclass
class Proposal:
    """One episode's policy before evaluation, and what its searcher learns from once it is scored."""

    episode: int
    policy: Policy
    env: CompressEnv
    #: the environment's episode number the candidate is logged under
    env_episode: int
    #: the agent that proposed it and its trajectory (states, applied actions) and block actions
    agent: object = None
    trajectory: list = field(default_factory=list)
    blocks: np.ndarray | None = None


def _propose(env: CompressEnv, agent, episode: int, action: np.ndarray | None = None) -> Proposal:
    """One AMC/HAQ episode up to its evaluation: walk the layers, bring the policy to the budget.

    ``action``: every layer gets this one instead of the agent's (no block skipped); the agent still learns from it.
    """
    blocks = agent.select_blocks(episode) if action is None else np.zeros(len(env.view.blocks), np.int64)
    s = env.reset(blocks)
    traj = []
    while True:
        a = agent.select_action(s, episode) if action is None else action
        s2, done, applied = env.step(a)
        traj.append((s, applied, s2, done))
        s = s2
        if done:
            break
    return Proposal(episode, env.final_policy(), env, env.episode, agent, traj, blocks)


#: bisection steps of :func:`uniform_action` over the sparsity range (0.8 / 2^8: finer than a channel of most groups)
UNIFORM_STEPS = 8


def uniform_action(env: CompressEnv) -> np.ndarray | None:
    """The one action that, given to every layer, is uniform pruning at 8-bit weights just inside the budget.

    The least sparsity whose episode the budget wall leaves untouched (bisection; cost estimates only, no
    evaluation). None when even the largest sparsity needs the wall (then no uniform policy fits the budget).
    The environment's episode counter is left as it was.
    """
    episode = env.episode

    def fits(sparsity: float) -> bool:
        env.reset()
        action, done = np.array([sparsity, 1.0, 0.0]), False
        while not done:
            _, done, _ = env.step(action)
        return env.walled == 0

    try:
        lo, hi = 0.0, env.cfg.max_sparsity
        if fits(lo):
            return np.array([lo, 1.0, 0.0], np.float32)
        if not fits(hi):
            return None
        for _ in range(UNIFORM_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return np.array([hi, 1.0, 0.0], np.float32)
    finally:
        env.episode = episode


class Searcher:
    """What every searcher shares: scoring a proposal, letting its agent learn, the in-process episode."""

    def propose(self, episode: int) -> Proposal:
        raise NotImplementedError

    def observe(self, prop: Proposal, metrics: dict) -> Candidate:
        """The candidate ``metrics`` (measured anywhere) make of ``prop``; its agent learns from the reward."""
        cand = prop.env.score(prop.policy, prop.env_episode, metrics)
        prop.env.candidate = cand
        if prop.agent is not None:
            prop.agent.observe(prop.trajectory, prop.blocks, cand.reward)
            prop.agent.update_policy()
        return cand

    def batch_end(self, episode: int, workers: int, episodes: int) -> int:
        """End of the batch starting at ``episode``: proposals in one batch cannot depend on each other."""
        return min(episode + workers, episodes)

    def run_episode(self, episode: int) -> Candidate:
        prop = self.propose(episode)
        return self.observe(prop, prop.env.evaluate_fn(prop.policy))


class AgentSearcher(Searcher):
    """A learning agent (``ajpq`` or ``abcp``) in the joint environment.

    With ``uniform_start`` its first episode is uniform pruning at 8-bit weights at the budget
    (:func:`uniform_action`) instead of a random warm-up draw: the simplest policy a user would try
    is then always a candidate, so the search's best is never below it by the search's own
    reward, and the agent learns from it (replay, and imitation while it is the best episode).
    On airbus YOLOv8n at ``latency=0.36`` (OpenVINO), 24 candidates without it found nothing
    better than uniform w8a8p50 (kept x8, the same predicted latency): 0.391 against 0.399 by the
    fast reward, 0.459 against 0.471 test mAP50 after ``recover``.
    """

    def __init__(self, name: str, make_env: EnvFactory, episodes: int, seed: int, env_cfg: EnvConfig,
                 uniform_start: bool = True):
        self.name, self.uniform_start = name, uniform_start
        self.uniform_episode: int | None = None  # the episode uniform_action proposed, if any
        self.env = make_env(env_cfg, None)
        self.agent = make_agent(name, STATE_DIM, len(self.env.view.blocks), seed, **fitted(name, episodes))

    def propose(self, episode: int) -> Proposal:
        action = uniform_action(self.env) if self.uniform_start and episode == 0 else None
        if action is not None:
            self.uniform_episode = episode
        return _propose(self.env, self.agent, episode, action)

    def stage(self, episode: int) -> str:
        """What a candidate's record says proposed it: the agent, or ``uniform-start``."""
        return "uniform-start" if episode == self.uniform_episode else self.name

    def state_dict(self) -> dict:
        return {"agent": self.agent.state_dict(), "env_episode": self.env.episode}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        self.env.episode = state["env_episode"]


class RandomSearcher(Searcher):
    """Valid random policies under the same budget (the environment's wall projects every action)."""

    def __init__(self, name: str, make_env: EnvFactory, episodes: int, seed: int, env_cfg: EnvConfig,
                 skip_prob: float = 0.1):
        self.name, self.skip_prob = name, skip_prob
        self.env = make_env(env_cfg, None)
        self.rng = np.random.default_rng(seed)

    def propose(self, episode: int) -> Proposal:
        self.env.reset(self.rng.random(len(self.env.view.blocks)) < self.skip_prob)
        strength = float(self.rng.random())  # the episode's pruning strength, as in the agents' warm-up
        done = False
        while not done:
            _, done, _ = self.env.step(warmup_action(self.rng, strength))
        return Proposal(episode, self.env.final_policy(), self.env, self.env.episode)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "env_episode": self.env.episode}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.env.episode = state["env_episode"]


class TwoStageSearcher(Searcher):
    """Prune first (AJPQ agent, float weights), then quantize the best pruned structure (a fresh agent)."""

    def __init__(self, name: str, make_env: EnvFactory, episodes: int, seed: int, env_cfg: EnvConfig):
        self.name, self.make_env, self.seed, self.env_cfg = name, make_env, seed, env_cfg
        self.switch, self.episodes = max(1, episodes // 2), episodes
        self.prune_env = make_env(EnvConfig(**{**vars(env_cfg), "mode": "prune"}), "prune")
        self.prune_agent = make_agent("ajpq", STATE_DIM, 0, seed, **fitted("ajpq", self.switch))
        self.best_prune: tuple[float, dict] | None = None
        self.quant_env = self.quant_agent = None

    def _start_quant(self) -> None:
        groups = self.best_prune[1] if self.best_prune else {}
        self.quant_env = self.make_env(EnvConfig(**{**vars(self.env_cfg), "mode": "quant", "fixed_groups": groups}),
                                       None)
        self.quant_env.episode = self.switch - 1
        self.quant_agent = make_agent("ajpq", STATE_DIM, 0, self.seed + 1,
                                      **fitted("ajpq", self.episodes - self.switch))

    def stage(self, episode: int) -> str:
        return "prune" if episode < self.switch else "quant"

    def propose(self, episode: int) -> Proposal:
        if episode < self.switch:
            self.prune_env.episode = episode - 1
            return _propose(self.prune_env, self.prune_agent, episode)
        if self.quant_env is None:
            self._start_quant()
        self.quant_env.episode = episode - 1
        return _propose(self.quant_env, self.quant_agent, episode)

    def observe(self, prop: Proposal, metrics: dict) -> Candidate:
        cand = super().observe(prop, metrics)
        if prop.episode < self.switch and (self.best_prune is None or cand.reward > self.best_prune[0]):
            self.best_prune = (cand.reward, cand.policy.groups)
        return cand

    def batch_end(self, episode: int, workers: int, episodes: int) -> int:
        """The quantization stage starts from the best pruned structure: never in one batch with pruning."""
        end = super().batch_end(episode, workers, episodes)
        return min(end, self.switch) if episode < self.switch else end

    def state_dict(self) -> dict:
        return {"prune_agent": self.prune_agent.state_dict(), "best_prune": self.best_prune,
                "quant_agent": self.quant_agent.state_dict() if self.quant_agent else None}

    def load_state_dict(self, state: dict) -> None:
        self.prune_agent.load_state_dict(state["prune_agent"])
        self.best_prune = state["best_prune"]
        if state["quant_agent"] is not None:
            self._start_quant()
            self.quant_agent.load_state_dict(state["quant_agent"])


class UniformSearcher(Searcher):
    """Uniform n-bit weights (activations at the search's act bits), no pruning: the simplest baseline."""

    LADDER = (8, 6, 5, 4, 3, 2)

    def __init__(self, name: str, make_env: EnvFactory, episodes: int, seed: int, env_cfg: EnvConfig):
        self.name = name
        self.env = make_env(env_cfg, None)
        self.act_bits = env_cfg.act_bits

    def propose(self, episode: int) -> Proposal:
        bits = self.LADDER[episode % len(self.LADDER)]
        self.env.episode = episode
        return Proposal(episode, uniform_bits(self.env.view, bits, self.act_bits), self.env, episode)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


#: every ``--agent`` name: the learning agents of :data:`agents.AGENTS`, then the baselines
SEARCHERS = {**dict.fromkeys(AGENTS, AgentSearcher), "random": RandomSearcher,
             "two-stage": TwoStageSearcher, "uniform": UniformSearcher}


def make_searcher(name: str, make_env: EnvFactory, episodes: int, seed: int, env_cfg: EnvConfig,
                  uniform_start: bool = True):
    """Searcher ``name``; ``uniform_start`` is for the learning agents (see :class:`AgentSearcher`)."""
    if name not in SEARCHERS:
        raise UserError(f"unknown agent {name!r}; choose one of {', '.join(SEARCHERS)}")
    if name == "uniform" and episodes > len(UniformSearcher.LADDER):
        n = len(UniformSearcher.LADDER)
        raise UserError(f"agent 'uniform' has {n} candidates; use --episodes <= {n}")
    options = {"uniform_start": uniform_start} if SEARCHERS[name] is AgentSearcher else {}
    return SEARCHERS[name](name, make_env, episodes, seed, env_cfg, **options)
