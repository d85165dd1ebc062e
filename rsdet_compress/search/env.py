"""The compression environment: one episode walks the compressible layers and yields one policy.

AMC/HAQ style, kept apart from the agents: ``reset(blocks)`` -> first state;
``step(action)`` -> (next state, done, applied action); ``finish()`` -> reward.
An action is three numbers in [0, 1] per layer:

* ``a[0]`` sparsity of the layer's channel group (the layer controller; only
  the group's first layer decides it, later members see the decision);
* ``a[1]`` mean weight bit-width of the kept channels (0 -> 2 bits, 1 -> 8);
* ``a[2]`` spread: the most important kept channels (same criterion that
  chose which channels to keep) get up to ``3 * a[2]`` bits more than the
  mean, the least important as many fewer (the channel controller).

Every finished episode meets the budget: before a layer's action is applied,
it is projected towards the cheapest action until the budget stays reachable
with every later layer at its cheapest (AMC's "action wall"); ``finish``
tightens bit-widths as HAQ does if rounding still leaves it over, and spends
budget the actions left unused by raising bit-widths evenly (``fill_budget``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rsdet_compress.compress.cost import Cost, estimate, kept_channels
from rsdet_compress.compress.importance import DEFAULT_CRITERION
from rsdet_compress.compress.policy import Policy
from rsdet_compress.errors import UserError
from rsdet_compress.search.budget import METRICS, PER_LAYER, Budget

#: weight bit-widths the agent chooses from (32 = float is left to hand-written policies).
BITS = (2, 3, 4, 5, 6, 8)
MIN_BITS, MAX_BITS = 2.0, 8.0
STATE_DIM = 22
#: an action: (sparsity, mean-bit position, bit spread) of one layer, each in [0, 1]
ACTION_DIM = 3


@dataclass
class EnvConfig:
    """How an episode maps actions to a policy."""

    #: activation bits of every quantized layer (8: lossless on the trained detectors; BOPs scale with it).
    act_bits: int = 8
    #: largest fraction of a channel group the agent may remove (keeps every layer alive and BN stats sane).
    max_sparsity: float = 0.8
    #: "joint" (AJPQ), "prune" (bits stay float; two-stage's first stage), "quant" (channels fixed).
    mode: str = "joint"
    #: channels fixed by an earlier stage (mode "quant"): a resolved policy's groups.
    fixed_groups: dict = field(default_factory=dict)
    #: spend budget the actions left unused by raising bit-widths evenly (HAQ's tightening, the other way): agents
    #: on YOLOv8n settled at 13-14x smaller under an 8x budget, i.e. with bits they could have kept
    fill_budget: bool = True
    #: kept channel counts are rounded up to a multiple of this (within the group's size), so the searched policy is
    #: the deployed one: rounding after the search (``compress --round8``) added back ~16% of the weights on YOLOv8n
    #: (an 8.7x policy packed to 7.3x), whose 16-64-channel groups lose a whole channel block to a few percent
    channel_multiple: int = 1


@dataclass
class Candidate:
    """One evaluated policy: what the search logs and compares."""

    episode: int
    policy: Policy
    cost: Cost
    usage: dict
    ratios: dict
    metrics: dict
    reward: float
    seconds: float
    meets_budget: bool = True


def _snap(bits: float) -> int:
    return min(BITS, key=lambda b: (abs(b - bits), b))


def bits_for(mean_pos: float, spread: float, importance: np.ndarray) -> list[int]:
    """Per-channel bit-widths: more for more important channels, centred on the mean."""
    n = len(importance)
    mean = MIN_BITS + (MAX_BITS - MIN_BITS) * float(mean_pos)
    if n == 1 or spread <= 0:
        return [_snap(mean)] * n
    rank = np.empty(n)
    rank[np.argsort(importance, kind="stable")] = np.arange(n) / (n - 1)  # 1 = most important
    return [_snap(mean + 3.0 * spread * (2 * r - 1)) for r in rank]


class CompressEnv:
    """Episodes over a :class:`~rsdet_compress.compress.view.CompressibleView` under a :class:`Budget`.

    ``evaluate(policy) -> metrics dict`` scores a candidate (e.g. COCO mAP on
    the reward split after calibration); ``reward(acc, usage)`` combines the
    ``metric`` entry with the budget usage (see :mod:`rsdet_compress.search.rewards`).
    """

    def __init__(self, view, scores: dict[str, torch.Tensor], budget: Budget,
                 evaluate: Callable[[Policy], dict], reward: Callable[[float, dict], float],
                 metric: str = "map50", config: EnvConfig | None = None, criterion: str = DEFAULT_CRITERION,
                 estimate_fn: Callable[..., Cost] = estimate):
        self.view, self.budget, self.evaluate_fn, self.reward_fn = view, budget, evaluate, reward
        #: ``estimate(view, policy, per_layer)``: the analytic cost, or with a latency budget the cost plus the
        #: latency predicted from the measured table
        self.estimate = estimate_fn
        self.metric, self.cfg, self.criterion = metric, config or EnvConfig(), criterion
        if self.cfg.mode not in ("joint", "prune", "quant"):
            raise UserError(f"unknown environment mode {self.cfg.mode!r}")
        self.ref = self.estimate(view)
        self.order = {g: torch.argsort(s, descending=True, stable=True).tolist() for g, s in scores.items()}
        self.scores = {g: s.numpy() for g, s in scores.items()}
        self.own_importance = {n: view.model.get_submodule(n).weight.detach().abs().flatten(1).sum(1).numpy()
                               for n in view.quantizable}
        self.block_of = {n: b.name for b in view.blocks for n in b.layers}
        self._static = self._static_features()
        self.episode = -1
        self.candidate: Candidate | None = None
        self.reset(np.zeros(len(view.blocks)))
        if not self.budget.met(self._cost(self._cheapest_policy()), self.ref):
            cheapest = self._cost(self._cheapest_policy())
            raise UserError(f"budget {budget} is impossible: the cheapest policy of this search space uses "
                            + ", ".join(f"{k} {v:.4g}" for k, v in self.budget.usage(cheapest, self.ref).items()))
        self.episode = -1

    # ------------------------------------------------------------------ episode
    def reset(self, blocks: np.ndarray | list | None = None) -> np.ndarray:
        """Start an episode; ``blocks[i] = 1`` skips ``view.blocks[i]`` (ABCP's block actions)."""
        blocks = np.zeros(len(self.view.blocks)) if blocks is None else np.asarray(blocks)
        self.skipped = {b.name for b, s in zip(self.view.blocks, blocks) if s > 0.5}
        self.steps = [n for n in self.view.quantizable if self.block_of.get(n) not in self.skipped]
        self.decider: dict[str, str] = {}  # group -> the step layer that decides its sparsity
        for name in self.steps:
            g = self.view.layers[name].out_group
            if g and g not in self.decider and self.cfg.mode != "quant":
                self.decider[g] = name
        self.groups: dict[str, dict] = dict(self.cfg.fixed_groups) if self.cfg.mode == "quant" else {}
        self.layers: dict[str, dict] = {}
        self.sparsity: dict[str, float] = {}
        self.t, self.prev = 0, np.zeros(ACTION_DIM, dtype=np.float32)
        self.walled = 0  # steps of this episode whose action the budget wall projected
        self.episode += 1
        self.candidate = None
        return self._state()

    def step(self, action) -> tuple[np.ndarray, bool, np.ndarray]:
        """Apply one layer's action (projected onto the budget wall); returns (state, done, applied action)."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), 0.0, 1.0)
        name = self.steps[self.t]
        a = self._fixed_dims(name, a)
        if not self._feasible(name, a):
            cheap = self._fixed_dims(name, np.array([self.cfg.max_sparsity, 0.0, 0.0]))
            lo, hi = 0.0, 1.0  # bisection on the segment a -> cheapest action
            for _ in range(10):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if self._feasible(name, a + mid * (cheap - a)) else (mid, hi)
            a = a + hi * (cheap - a)
            self.walled += 1
        self._commit(name, a)
        self.prev = a.astype(np.float32)
        self.t += 1
        done = self.t >= len(self.steps)
        return (np.zeros(STATE_DIM, np.float32) if done else self._state()), done, self.prev.copy()

    def finish(self) -> float:
        """Evaluate the episode's policy (tightened to the budget if needed); returns its reward."""
        self.candidate = self.score(self.final_policy(), self.episode)
        return self.candidate.reward

    def final_policy(self) -> Policy:
        """The episode's policy brought to the budget: what :meth:`finish` evaluates (or a worker does)."""
        policy = self.policy()
        cost = self._cost(policy)
        if self.cfg.fill_budget and self.cfg.mode != "prune" and self.budget.met(cost, self.ref):
            policy = self._loosen(policy, cost)
            cost = self._cost(policy)
        while not self.budget.met(cost, self.ref):  # HAQ: lower the costliest layer's bits one step
            policy = self._tighten(policy, cost)
            cost = self._cost(policy)
        return policy

    def score(self, policy: Policy, episode: int, metrics: dict | None = None) -> Candidate:
        """Any policy of this view as a candidate (budget reported, not enforced).

        ``metrics``: measured elsewhere (a search worker), else evaluated here.
        """
        t0 = time.perf_counter()
        cost = self._cost(policy)
        usage = self.budget.usage(cost, self.ref)
        if metrics is None:
            metrics = self.evaluate_fn(policy)
            seconds = time.perf_counter() - t0
        else:
            seconds = float(metrics.get("eval_seconds", 0.0))
        reward = float(self.reward_fn(float(metrics[self.metric]), usage))
        return Candidate(episode, policy, cost, usage, cost.ratios(self.ref), metrics, reward,
                         seconds, self.budget.met(cost, self.ref))

    def policy(self, groups: dict | None = None, layers: dict | None = None) -> Policy:
        """The policy the decisions so far describe (``groups``/``layers`` override them)."""
        return Policy(detector=self.view.detector or "", imgsz=self.view.imgsz, criterion=self.criterion,
                      groups=dict(self.groups if groups is None else groups),
                      layers=dict(self.layers if layers is None else layers),
                      blocks={b: "skip" for b in sorted(self.skipped)})

    # ------------------------------------------------------------------ internals
    def _fixed_dims(self, name: str, a: np.ndarray) -> np.ndarray:
        a = a.copy()
        g = self.view.layers[name].out_group
        if self.decider.get(g) != name:  # not this layer's decision: report the group's state
            a[0] = self.sparsity.get(g, self._fixed_sparsity(g))
        if self.cfg.mode == "prune":
            a[1], a[2] = 1.0, 0.0  # float weights: reported as the top of the bit range
        return a

    def _fixed_sparsity(self, g: str | None) -> float:
        spec = self.groups.get(g) if g else None
        return 1.0 - len(spec["keep_idx"]) / self.view.groups[g].size if spec else 0.0

    def _keep_idx(self, g: str, sparsity: float) -> list[int]:
        size = self.view.groups[g].size
        n = max(1, min(size, round(size * (1.0 - sparsity))))
        m = self.cfg.channel_multiple
        n = min(size, -(-n // m) * m)  # rounded up to a multiple of m, within the group
        return sorted(self.order[g][:n])

    def _layer_spec(self, name: str, a: np.ndarray, groups: dict) -> dict | None:
        if self.cfg.mode == "prune":
            return None
        g = self.view.layers[name].out_group
        spec = groups.get(g) if g else None
        n_out = kept_channels(self.view, name, "out", Policy(detector="", groups={g: spec} if spec else {}))
        if spec and len(spec["keep_idx"]) == n_out and g in self.scores:
            importance = self.scores[g][spec["keep_idx"]]
        elif n_out == self.view.layers[name].out_channels:
            importance = self.own_importance[name]
        else:
            importance = np.zeros(n_out)
        bits = bits_for(a[1], a[2], importance)
        return {"weight_bits": bits[0] if len(set(bits)) == 1 else bits, "act_bits": self.cfg.act_bits}

    def _decisions(self, name: str, a: np.ndarray) -> tuple[dict, dict]:
        groups, layers = dict(self.groups), dict(self.layers)
        g = self.view.layers[name].out_group
        if self.decider.get(g) == name and a[0] > 0:
            groups[g] = {"keep_idx": self._keep_idx(g, a[0])}
        spec = self._layer_spec(name, a, groups)
        if spec:
            layers[name] = spec
        return groups, layers

    def _commit(self, name: str, a: np.ndarray) -> None:
        self.groups, self.layers = self._decisions(name, a)
        g = self.view.layers[name].out_group
        if self.decider.get(g) == name:
            self.sparsity[g] = float(a[0])

    def _cheapest_policy(self, groups: dict | None = None, layers: dict | None = None,
                         after: int = 0) -> Policy:
        """Decisions so far, with every step from ``after`` on at its cheapest action."""
        groups = dict(self.groups if groups is None else groups)
        layers = dict(self.layers if layers is None else layers)
        for name in self.steps[after:]:
            g = self.view.layers[name].out_group
            if self.decider.get(g) == name and g not in groups:
                groups[g] = {"keep_idx": self._keep_idx(g, self.cfg.max_sparsity)}
            if name not in layers and self.cfg.mode != "prune":
                layers[name] = {"weight_bits": int(MIN_BITS), "act_bits": self.cfg.act_bits}
        return self.policy(groups, layers)

    def _feasible(self, name: str, a: np.ndarray) -> bool:
        groups, layers = self._decisions(name, a)
        return self.budget.met(self._cost(self._cheapest_policy(groups, layers, after=self.t + 1)), self.ref)

    def _cost(self, policy: Policy) -> Cost:
        return self.estimate(self.view, policy, per_layer=False)

    def _tighten(self, policy: Policy, cost: Cost) -> Policy:
        per = self.estimate(self.view, policy).per_layer
        key = PER_LAYER[self.budget.primary]
        for name in sorted(policy.layers, key=lambda n: -per.get(n, {}).get(key, 0)):
            bits = policy.layers[name]["weight_bits"]
            bits = bits if isinstance(bits, list) else [bits]
            if max(bits) > MIN_BITS:
                lower = [BITS[max(0, BITS.index(b) - 1)] if b in BITS else b for b in bits]
                policy.layers[name] = {**policy.layers[name],
                                       "weight_bits": lower[0] if len(set(lower)) == 1 else lower}
                return policy
        raise UserError(f"budget {self.budget} cannot be met by lowering bit-widths further")

    def _loosen(self, policy: Policy, cost: Cost) -> Policy:
        """Raise bit-widths one step at a time, layer by layer (cheapest first, round-robin so the agent's relative
        allocation is kept), while every budget limit stays met. Costs are linear in the bits of a layer, so the
        change is computed from the layer's per-bit cost; ``finish`` re-checks with the exact estimate."""
        per = self.estimate(self.view, policy).per_layer
        slack = {m: lim * getattr(self.ref, METRICS[m]) - getattr(cost, METRICS[m]) for m, lim in self.budget.limits}
        unit = {}
        for name in policy.layers:
            p = per.get(name)
            if not p or not p["out_channels"]:
                continue
            n_w = (p["in_channels"] // p["groups"]) * math.prod(self.view.layers[name].kernel)
            # bit-widths change neither FLOPs nor latency (<= 8 bits all run as int8)
            unit[name] = {"size": n_w, "bops": p["macs"] / p["out_channels"] * p["act_bits"], "flops": 0.0,
                          "latency": 0.0}
        order = sorted(unit, key=lambda n: per[n][PER_LAYER[self.budget.primary]])
        changed = True
        while changed:
            changed = False
            for name in order:
                bits = policy.layers[name]["weight_bits"]
                bits = bits if isinstance(bits, list) else [bits] * per[name]["out_channels"]
                if min(bits) >= MAX_BITS or any(b not in BITS for b in bits):
                    continue
                up = [BITS[min(len(BITS) - 1, BITS.index(b) + 1)] for b in bits]
                delta = {m: unit[name][m] * (sum(up) - sum(bits)) for m in slack}
                if all(delta[m] <= slack[m] for m in slack):
                    slack = {m: slack[m] - delta[m] for m in slack}
                    policy.layers[name] = {**policy.layers[name], "weight_bits": up[0] if len(set(up)) == 1 else up}
                    changed = True
        return policy

    # ------------------------------------------------------------------ state
    def _ref_total(self, key: str) -> float:
        return float(max(1, getattr(self.ref, METRICS[key])))

    def _static_features(self) -> dict[str, np.ndarray]:
        """Per-layer features that do not change during an episode, min-max normalised over layers (AMC)."""
        rows = {}
        for i, name in enumerate(self.view.quantizable):
            L = self.view.layers[name]
            g = L.out_group
            imp = self.scores[g] if g in self.scores else self.own_importance[name]
            imp = imp / (imp.max() + 1e-12)
            top = np.sort(imp)[::-1]
            rows[name] = np.array([
                i, L.kind == "conv", L.kind == "depthwise", L.kind == "pointwise", L.in_channels, L.out_channels,
                L.stride, L.kernel[0], math.log1p(L.params), math.log1p(L.macs), math.log1p(L.out_hw[0] * L.out_hw[1]),
                g is not None, imp.mean(), imp.std(), top[: max(1, len(top) // 2)].sum() / (top.sum() + 1e-12)],
                dtype=np.float64)
        table = np.stack(list(rows.values()))
        lo, span = table.min(0), np.ptp(table, 0)
        span[span == 0] = 1.0
        return {n: ((r - lo) / span).astype(np.float32) for n, r in rows.items()}

    def _state(self) -> np.ndarray:
        name = self.steps[self.t]
        decided = self.policy()
        cheapest = self._cheapest_policy(after=self.t)
        key = self.budget.primary
        limit = dict(self.budget.limits)[key]
        per = self.estimate(self.view, decided).per_layer
        used = sum(per[n][PER_LAYER[key]] for n in self.steps[:self.t] if n in per) / self._ref_total(key)
        floor = self.budget.usage(self._cost(cheapest), self.ref)[key]
        dynamic = [self.t / max(1, len(self.steps) - 1), min(1.0, used), min(1.0, max(0.0, limit - floor) / limit),
                   self.decider.get(self.view.layers[name].out_group) == name]
        return np.clip(np.concatenate([self._static[name], np.asarray(dynamic, np.float32), self.prev]), 0, 1)
