"""Search agents on a synthetic budgeted environment with a known optimum; determinism; exact resume."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rsdet_compress.errors import UserError
from rsdet_compress.search.agents import AGENTS, ABCPAgent, AJPQAgent, DDPGConfig, PGConfig, make_agent
from rsdet_compress.search.agents.exploration import logit_normal
from rsdet_compress.search.agents.replay import ReplayBuffer
from rsdet_compress.search.statefile import load_state, save_state

torch.set_num_threads(1)

# Eight layers that differ in value W, cost C and importance skew SKEW (the best bit spread), and four
# blocks: 0 and 2 are cheap and valuable (keep), 1 and 3 costly and nearly useless (worth skipping).
W = np.array([1.0, 0.3, 0.8, 0.5, 1.2, 0.2, 0.6, 0.9])
C = np.array([0.5, 2.0, 1.0, 3.0, 0.8, 2.5, 1.5, 0.6])
SKEW = np.array([0.2, 0.8, 0.5, 0.1, 0.9, 0.4, 0.6, 0.3])
BLOCK_VALUE = np.array([0.5, 0.05, 0.4, 0.08])
BLOCK_COST = np.array([1.0, 3.0, 0.5, 2.5])
KEEP_MIN, BITS_MIN, BITS_MAX = 0.1, 2.0, 8.0
STATE_DIM = 9


def keep(a0):
    return 1 - (1 - KEEP_MIN) * a0


def bits(a1):
    return BITS_MIN + (BITS_MAX - BITS_MIN) * a1


def layer_value(t, k, b, a2):
    """Concave in kept fraction and bits (so the optimum is interior), best at spread = SKEW[t]."""
    return W[t] * np.sqrt(k) * (1 - np.exp(-(b - 1) / 1.5)) * (1 - 2 * (a2 - SKEW[t]) ** 2)


def layer_cost(t, k, b):
    return C[t] * k * b / BITS_MAX


MIN_COST = C * KEEP_MIN * BITS_MIN / BITS_MAX


class BudgetEnv:
    """reward = (sum of layer values + kept block values) / max; cost <= budget held by an AMC-style wall.

    The wall caps each layer's cost so that every later layer can still afford its cheapest action:
    it first prunes more, then lowers bits. ``n_blocks=0``: no blocks, the layers share ``budget``.
    """

    def __init__(self, n_blocks: int, budget: float):
        self.n_blocks, self.budget, self.T = n_blocks, budget, len(W)
        self.scale = W.sum() + BLOCK_VALUE[:n_blocks].sum()

    def reset(self, blocks) -> np.ndarray:
        kept = 1 - np.asarray(blocks, dtype=float)
        self.block_cost = float(kept @ BLOCK_COST[:self.n_blocks])
        self.value = float(kept @ BLOCK_VALUE[:self.n_blocks])
        self.t, self.used, self.prev = 0, 0.0, np.zeros(2)
        return self._state()

    def _room(self) -> float:
        return self.budget - self.block_cost - self.used - MIN_COST[self.t + 1:].sum()

    def _state(self) -> np.ndarray:
        t = min(self.t, self.T - 1)
        return np.array([t / (self.T - 1), W[t] / W.max(), C[t] / C.max(), SKEW[t], self.used / self.budget,
                         np.clip(self._room() / self.budget, 0, 1), self.block_cost / self.budget, *self.prev],
                        np.float32)

    def step(self, a):
        a, t, room = np.clip(np.asarray(a, np.float64), 0, 1), self.t, self._room()
        k, b = keep(a[0]), bits(a[1])
        if layer_cost(t, k, b) > room:  # the wall: prune more, then fewer bits
            k = max(KEEP_MIN, room * BITS_MAX / (C[t] * b))
            b = min(b, max(BITS_MIN, room * BITS_MAX / (C[t] * k)))
        applied = np.array([(1 - k) / (1 - KEEP_MIN), (b - BITS_MIN) / (BITS_MAX - BITS_MIN), a[2]], np.float32)
        self.used += layer_cost(t, k, b)
        self.value += layer_value(t, k, b, a[2])
        self.prev, self.t = applied[:2], t + 1
        return self._state(), self.t == self.T, applied

    def finish(self) -> float:
        assert self.used + self.block_cost <= self.budget + 1e-9
        return self.value / self.scale


def layers_optimum(budget: float, n: int = 201) -> float:
    """Best total layer value under ``budget`` (spread at SKEW) and its kept fractions: Lagrangian on a grid."""
    k, b = np.linspace(KEEP_MIN, 1, n)[:, None], np.linspace(BITS_MIN, BITS_MAX, n)[None, :]
    vals = [layer_value(t, k, b, SKEW[t]).ravel() for t in range(len(W))]
    costs = [layer_cost(t, k, b).ravel() for t in range(len(W))]

    def solve(lam):
        best = [np.argmax(v - lam * c) for v, c in zip(vals, costs)]
        return sum(v[i] for v, i in zip(vals, best)), sum(c[i] for c, i in zip(costs, best))

    lo, hi = 0.0, 100.0
    for _ in range(60):  # smallest price of cost whose choice fits the budget
        lo, hi = (lo, (lo + hi) / 2) if solve((lo + hi) / 2)[1] <= budget else ((lo + hi) / 2, hi)
    value = solve(hi)[0]
    dual = min(lam * budget + sum((v - lam * c).max() for v, c in zip(vals, costs))
               for lam in np.linspace(lo * 0.9, hi * 1.1, 41))
    assert value <= dual <= value * 1.002  # the grid optimum is the true optimum to 0.2%
    return value, np.array([k.ravel()[np.argmax(v - hi * c) // n] for v, c in zip(vals, costs)])


def optimum(env: BudgetEnv) -> tuple[float, tuple]:
    """Best reward over all block choices, and the best choice."""
    best = (-1.0, ())
    for skip in itertools.product([0, 1], repeat=env.n_blocks):
        kept = 1 - np.array(skip, dtype=float)
        v = layers_optimum(env.budget - kept @ BLOCK_COST[:env.n_blocks])[0] + kept @ BLOCK_VALUE[:env.n_blocks]
        best = max(best, (v / env.scale, skip))
    return best


def run(agent, env, episodes: int, start: int = 0) -> tuple[list[float], np.ndarray]:
    """The searcher's episode loop; returns the rewards and every proposed action."""
    rewards, actions = [], []
    for episode in range(start, start + episodes):
        blocks = agent.select_blocks(episode)
        s, traj = env.reset(blocks), []
        while True:
            a = agent.select_action(s, episode)
            actions.append(a)
            s2, done, applied = env.step(a)
            traj.append((s, applied, s2, done))
            s = s2
            if done:
                break
        rewards.append(env.finish())
        agent.observe(traj, blocks, rewards[-1])
        agent.update_policy()
    return rewards, np.array(actions)


def random_search(env, episodes: int, seed: int = 0) -> list[float]:
    rng, rewards = np.random.default_rng(seed), []
    for _ in range(episodes):
        env.reset((rng.random(env.n_blocks) < 0.2).astype(int))
        while not env.step(rng.random(3))[1]:
            pass
        rewards.append(env.finish())
    return rewards


def assert_same(a, b, where="state"):
    """Recursive bitwise equality of nested dicts/lists of tensors, arrays and scalars."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


AJPQ_ENV, ABCP_ENV = (0, 2.0), (4, 9.0)  # (blocks, budget): the layers get 2.0 of 11.9 either way before skips


def ajpq(seed=0, **cfg):
    return AJPQAgent(STATE_DIM, seed=seed, config=DDPGConfig(**cfg))


def abcp(seed=0, **cfg):
    return ABCPAgent(STATE_DIM, 4, seed=seed, config=PGConfig(**cfg))


# ---------------------------------------------------------------------------------- the synthetic optimum
def test_synthetic_optimum_is_uneven_and_far_above_random():
    env = BudgetEnv(*AJPQ_ENV)
    best, _ = optimum(env)
    kept = layers_optimum(AJPQ_ENV[1])[1]
    assert kept.min() <= 0.15 and kept.max() >= 0.95  # some layers almost gone, some whole: not "all 0/1"
    assert max(random_search(env, 300)) < 0.7 * best
    best4, skip = optimum(BudgetEnv(*ABCP_ENV))
    assert skip == (0, 1, 0, 1)  # skip the costly useless blocks, keep the cheap valuable ones
    assert max(random_search(BudgetEnv(*ABCP_ENV), 300)) < 0.8 * best4


def test_ajpq_reaches_90_percent_of_the_optimum():
    env = BudgetEnv(*AJPQ_ENV)
    best, _ = optimum(env)
    rewards, actions = run(ajpq(seed=0), env, 300)
    assert max(rewards) > 0.9 * best
    assert np.mean(rewards[-20:]) > 0.85 * best  # the policy, not one lucky episode
    assert actions.min() >= 0 and actions.max() <= 1


def test_abcp_reaches_90_percent_of_the_optimum_and_skips_the_right_blocks():
    env = BudgetEnv(*ABCP_ENV)
    best, _ = optimum(env)
    agent = abcp(seed=0)
    rewards, actions = run(agent, env, 300)
    assert max(rewards) > 0.9 * best
    assert np.mean(rewards[-20:]) > 0.85 * best
    p = agent.skip_probs()
    assert p[1] > 0.9 and p[3] > 0.9 and p[0] < 0.1 and p[2] < 0.1
    assert actions.min() >= 0 and actions.max() <= 1


# ---------------------------------------------------------------------------------- determinism and resume
@pytest.mark.parametrize("make,env_args", [(lambda s: ajpq(s, warmup_episodes=3), AJPQ_ENV),
                                           (abcp, ABCP_ENV)], ids=["ajpq", "abcp"])
def test_same_seed_same_actions(make, env_args):
    runs = [run(make(seed), BudgetEnv(*env_args), 15)[1] for seed in (7, 7, 8)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("first", [6, 0], ids=["after6", "before-any"])  # 0: before the replay buffer exists
@pytest.mark.parametrize("make,env_args", [(lambda s: ajpq(s, warmup_episodes=3, buffer_episodes=5), AJPQ_ENV),
                                           (abcp, ABCP_ENV)], ids=["ajpq", "abcp"])
def test_resume_is_exact(make, env_args, first, tmp_path):
    """`first` episodes, checkpoint, 4 more == a fresh agent (other seed) loaded from the checkpoint, 4 more."""
    env = BudgetEnv(*env_args)
    agent = make(0)
    run(agent, env, first)
    state = agent.state_dict()
    save_state(tmp_path / "agent.pt", state)  # the search checkpoint's format: plain data, no pickled objects
    _, want = run(agent, env, 4, start=first)  # the buffer (5 episodes) wraps: overwriting is resumed too
    for source in ("file", "memory"):  # in memory: the dict must be a copy, not views the agent kept training
        resumed = make(123)
        resumed.load_state_dict(load_state(tmp_path / "agent.pt") if source == "file" else state)
        _, got = run(resumed, env, 4, start=first)
        assert np.array_equal(got, want), source
        # bitwise: networks and target networks, optimiser moments, replay buffer, baseline, sigma, RNG states
        assert_same(agent.state_dict(), resumed.state_dict(), source)


def test_agents_leave_the_global_rngs_alone():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    run(ajpq(0, warmup_episodes=2), BudgetEnv(*AJPQ_ENV), 4)
    run(abcp(0), BudgetEnv(*ABCP_ENV), 4)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert_same(np.random.get_state(), np_state)


# ---------------------------------------------------------------------------------- exploration and bounds
def test_ajpq_warmup_is_random_then_noise_decays_around_the_actor():
    agent, env = ajpq(0, warmup_episodes=20, sigma_init=0.5, sigma_decay=0.9), BudgetEnv(*AJPQ_ENV)
    used, warm = [], []  # sigma each episode explores with; the warm-up episodes' actions
    for episode in range(25):
        used.append(agent.sigma)
        warm.append(run(agent, env, 1, start=episode)[1])
    per_episode = np.stack([w[:, 0].mean() for w in warm[:20]])
    warm = np.concatenate(warm[:20])
    assert warm.min() >= 0 and warm.max() <= 1
    u = np.sort(warm[:, 1:].ravel())  # bit actions: 20 episodes x 8 layers x 2 = 320 uniform draws
    assert np.abs(u - (np.arange(1, u.size + 1) - 0.5) / u.size).max() < 0.08  # Kolmogorov-Smirnov vs U(0, 1)
    # sparsity: uniform x the episode's strength ~ U(0, 1): mean 1/4, and episodes differ (mild to hard pruning)
    assert abs(warm[:, 0].mean() - 0.25) < 0.08 and per_episode.max() - per_episode.min() > 0.3
    assert used[:21] == [0.5] * 21  # untouched by warm-up; the first learned episode explores with sigma_init
    np.testing.assert_allclose(used[20:], 0.5 * 0.9 ** np.arange(5))  # then x0.9 per episode
    s = env.reset([])
    mu = agent.greedy_action(s)
    agent.sigma = 0.02
    draws = np.stack([agent.select_action(s, 30) for _ in range(200)])
    np.testing.assert_allclose(draws[:, 0].mean(), mu[0], atol=0.01)  # noise is centred on the layer controller


@pytest.mark.parametrize("make", [lambda: ajpq(0, warmup_episodes=0), lambda: abcp(0)], ids=["ajpq", "abcp"])
def test_actions_stay_in_the_unit_box_for_any_state(make):
    agent, rng = make(), np.random.default_rng(0)
    states = [np.zeros(STATE_DIM), np.ones(STATE_DIM), *rng.random((50, STATE_DIM))]
    acts = np.stack([agent.select_action(np.asarray(s, np.float32), 0) for s in states])
    assert acts.shape == (52, 3) and acts.dtype == np.float32
    assert acts.min() >= 0 and acts.max() <= 1


@pytest.mark.parametrize("make", [lambda: ajpq(0, warmup_episodes=0), lambda: abcp(0)], ids=["ajpq", "abcp"])
def test_agents_learn_from_the_applied_not_the_proposed_action(make):
    """The wall projects greedy proposals; what the agents store is what the environment applied."""
    agent, env = make(), BudgetEnv(*AJPQ_ENV)
    s, traj, proposed = env.reset([]), [], []
    while True:
        a = np.array([0.0, 1.0, 0.5], np.float32)  # keep everything at 8 bits: far over budget
        s2, done, applied = env.step(a)
        traj.append((s, applied, s2, done))
        proposed.append(a)
        s = s2
        if done:
            break
    applied = np.stack([t[1] for t in traj])
    assert not np.allclose(applied, np.stack(proposed))  # the wall did act
    agent.observe(traj, np.zeros(agent.n_blocks), env.finish())
    stored = agent.buffer.actions[: len(traj)] if isinstance(agent, AJPQAgent) else agent.pending["actions"]
    assert np.array_equal(stored, applied)


# ---------------------------------------------------------------------------------- replay and registry
def test_replay_buffer_wraps_samples_reproducibly_and_round_trips():
    buf = ReplayBuffer(4, state_dim=2, action_dim=3, seed=1)
    for i in range(6):
        buf.add(np.full(2, i), np.full(3, i / 10), float(i), np.full(2, i + 1), i == 5)
    assert len(buf) == 4 and sorted(buf.rewards) == [2, 3, 4, 5]  # the two oldest were overwritten
    copy = ReplayBuffer(4, state_dim=2, action_dim=3, seed=99)
    copy.load_state_dict(buf.state_dict())
    a, b = buf.sample(8), copy.sample(8)  # 8 > 4: with replacement
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert set(a["rewards"]) <= {2, 3, 4, 5}
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(5, 2, 3).load_state_dict(buf.state_dict())


def test_make_agent_registry_and_errors():
    assert set(AGENTS) == {"ajpq", "abcp"}
    agent = make_agent("ajpq", STATE_DIM, 0, 3, warmup_episodes=5)
    assert isinstance(agent, AJPQAgent) and agent.config.warmup_episodes == 5
    assert np.array_equal(agent.select_blocks(0), np.zeros(0))
    assert isinstance(make_agent("abcp", STATE_DIM, 4, 0), ABCPAgent)
    with pytest.raises(UserError, match="unknown agent 'ppo'; choose one of ajpq, abcp"):
        make_agent("ppo", STATE_DIM, 0, 0)
    with pytest.raises(UserError, match="unknown setting.*warmup"):
        make_agent("abcp", STATE_DIM, 4, 0, warmup=3)


def test_ajpq_starts_near_low_sparsity_and_imitates_its_best_episode():
    """Short searches: the layer controller starts at init_sparsity; after warm-up the actor moves towards the
    best episode's applied actions (self-imitation), and faster with it than on the critic alone."""
    env = BudgetEnv(*AJPQ_ENV)
    fresh = ajpq(0, warmup_episodes=4)
    s = env.reset([])
    assert abs(fresh.greedy_action(s)[0] - 0.1) < 0.02
    assert abs(ajpq(0, init_sparsity=0.5).greedy_action(s)[0] - 0.5) < 0.02

    def gap(weight: float) -> tuple[float, float]:
        agent = ajpq(0, warmup_episodes=4, elite_weight=weight)
        rewards, _ = run(agent, env, 4)  # warm-up only: random episodes, no learning yet
        best, states, actions = agent.elite
        assert best == max(rewards) and states.shape == (8, STATE_DIM) and actions.shape == (8, 3)
        d0 = np.abs(np.stack([agent.greedy_action(x) for x in states]) - actions).mean()
        for _ in range(20):  # 160 gradient steps: what a 16-candidate search on SkyNet (~17 layers) gets in 10
            agent.update_policy()
        return d0, np.abs(np.stack([agent.greedy_action(x) for x in states]) - actions).mean()

    d0, with_imitation = gap(1.0)
    _, without = gap(0.0)
    assert with_imitation < 0.6 * d0 and with_imitation < 0.8 * without


def test_fitted_short_search_explores_near_the_low_sparsity_start():
    """A 24-candidate search: 6 warm-up episodes, noise 0.2 -> 0.05; its first learning episode stays near 10%
    sparsity. AMC/HAQ's truncated normal drifts inward from the bound: ~20% at 0.2, ~39% at 0.5 (pruning every
    layer hard again); logit-space noise keeps its median at the actor's 10%."""
    from rsdet_compress.search.agents.exploration import fitted

    cfg = fitted("ajpq", 24)
    assert cfg["warmup_episodes"] == 6 and cfg["sigma_init"] == 0.2
    np.testing.assert_allclose(cfg["sigma_init"] * cfg["sigma_decay"] ** 18, 0.05)
    assert fitted("ajpq", 600)["sigma_init"] == 0.5  # AMC/HAQ-length searches keep the broad noise
    s = BudgetEnv(*AJPQ_ENV).reset([])
    agent = ajpq(0, **cfg)
    a0 = np.array([agent.select_action(s, 6)[0] for _ in range(400)])
    assert 0.08 < a0.mean() < 0.14
    assert abs(np.median(a0) - agent.greedy_action(s)[0]) < 0.01


def test_logit_noise_stays_inside_is_median_centred_and_can_share_a_direction():
    rng = np.random.default_rng(0)
    mu = np.array([0.5, 0.1, 0.999])
    x = np.stack([logit_normal(mu, 0.2, rng) for _ in range(4000)])
    assert x.min() > 0 and x.max() < 1
    np.testing.assert_allclose(np.median(x, 0), mu, atol=0.01)
    np.testing.assert_allclose(x[:, 0].std(), 0.2 * 0.97, atol=0.02)  # ~sigma near 0.5 (slightly less: the sigmoid)
    # shared: per "episode" one draw moves every entry; the fraction of variance shared is the correlation
    eps = [logit_normal(np.full(8, 0.5), 0.2, rng, rng.standard_normal(8)[:1].repeat(8), 0.5) for _ in range(2000)]
    logits = np.log(np.stack(eps) / (1 - np.stack(eps)))
    np.testing.assert_allclose(np.corrcoef(logits[:, 0], logits[:, 5])[0, 1], 0.5, atol=0.06)
    assert (logit_normal(mu, 0.0, rng) == np.clip(mu, 1e-4, 1 - 1e-4)).all()


def test_ajpq_shared_noise_is_drawn_per_learning_episode_and_resumed():
    agent = ajpq(0, warmup_episodes=1, shared_noise=0.5)
    env = BudgetEnv(*AJPQ_ENV)
    run(agent, env, 1)
    assert (agent.shared == 0).all()  # warm-up draws a strength, not shared noise
    agent.select_blocks(1)
    shared = agent.shared.copy()
    assert (shared != 0).all()
    twin = ajpq(0, warmup_episodes=1, shared_noise=0.5)
    twin.load_state_dict(agent.state_dict())
    np.testing.assert_array_equal(twin.shared, shared)
    s = env.reset([])
    np.testing.assert_array_equal(agent.select_action(s, 1), twin.select_action(s, 1))


def test_ajpq_does_not_imitate_when_every_reward_is_equal():
    """All-zero rewards (every warm-up candidate dead) carry no information: the first episode is not an elite to
    imitate, so the actor learns exactly as without imitation; one better episode turns imitation on."""
    class Flat(BudgetEnv):
        def finish(self) -> float:
            return 0.0

    def actor_after(weight: float, env) -> np.ndarray:
        agent = ajpq(0, warmup_episodes=4, elite_weight=weight)
        run(agent, env, 4)
        for _ in range(5):
            agent.update_policy()
        return agent.greedy_action(env.reset([]))

    flat = Flat(*AJPQ_ENV)
    np.testing.assert_array_equal(actor_after(1.0, flat), actor_after(0.0, flat))
    live = BudgetEnv(*AJPQ_ENV)
    assert not np.array_equal(actor_after(1.0, live), actor_after(0.0, live))
