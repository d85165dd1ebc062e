"""The search environment over every registered detector: budgets always met, normalised states, determinism."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from rsdet_compress.compress.importance import importance_scores
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.detectors.registry import list_detectors
from rsdet_compress.errors import UserError
from rsdet_compress.search.budget import Budget
from rsdet_compress.search.env import BITS, STATE_DIM, CompressEnv, EnvConfig, bits_for
from rsdet_compress.search.rewards import REWARDS, accuracy, accuracy_log_cost, get_reward
from rsdet_compress.search.searchers import make_searcher, uniform_action

torch.set_num_threads(1)
IMGSZ = 256


@pytest.fixture(scope="module", params=list_detectors())
def view(request):
    return CompressibleView(create_detector(request.param, 2), imgsz=IMGSZ)


def _env(view, budget, cfg=None, seen=None):
    def fake_eval(policy):  # cheap stand-in for mAP: rewards keeping bits and channels
        if seen is not None:
            seen.append(policy)
        return {"map50": 0.5, "map50_95": 0.3}
    return CompressEnv(view, importance_scores(view, "l1"), Budget.parse(budget), fake_eval, accuracy,
                       config=cfg)


def _run(env, actions, blocks=None):
    s, states, applied = env.reset(blocks), [], []
    done = False
    while not done:
        states.append(s)
        s, done, a = env.step(actions(len(states) - 1))
        applied.append(a)
    env.finish()
    return np.stack(states), np.stack(applied), env.candidate


@pytest.mark.parametrize("budget", [["size=0.125"], ["bops=0.02"], ["size=0.1", "flops=0.4"]])
def test_every_episode_meets_the_budget(view, budget):
    env = _env(view, budget)
    rng = np.random.default_rng(0)
    greedy = _run(env, lambda t: np.array([0.0, 1.0, 0.0]))  # the most expensive action at every layer
    assert greedy[2].meets_budget and env.budget.met(greedy[2].cost, env.ref)
    assert (greedy[1][:, 1] < 1.0).any(), "the wall must have projected some greedy actions"
    for _ in range(4):
        states, applied, cand = _run(env, lambda t: rng.random(3), rng.random(len(view.blocks)) < 0.3)
        assert cand.meets_budget, cand.usage
        assert states.shape[1] == STATE_DIM and states.min() >= 0.0 and states.max() <= 1.0
        assert applied.min() >= 0.0 and applied.max() <= 1.0
        bits = [b for spec in cand.policy.layers.values()
                for b in (spec["weight_bits"] if isinstance(spec["weight_bits"], list) else [spec["weight_bits"]])]
        assert set(bits) <= set(BITS)


def test_same_actions_give_the_same_episode(view):
    env1, env2 = _env(view, ["size=0.125"]), _env(view, ["size=0.125"])
    def actions(seed: int):  # a fresh generator per run: both see the same action sequence
        rng = np.random.default_rng(seed)
        return lambda t: rng.random(3)
    a = [_run(e, actions(3)) for e in (env1, env2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])
    assert a[0][2].policy.to_dict() == a[1][2].policy.to_dict()


def test_policy_of_an_episode_is_valid_and_costed_exactly(view):
    from rsdet_compress.compress.cost import estimate
    env = _env(view, ["size=0.125"])
    _, _, cand = _run(env, lambda t: np.array([0.3, 0.5, 0.7]))
    cand.policy.validate(view)
    assert estimate(view, cand.policy).weight_bits == cand.cost.weight_bits
    assert cand.usage["size"] <= 0.125 and cand.ratios["size"] >= 8


def test_channel_multiple_rounds_every_kept_count_and_the_budget_still_holds(view):
    """With channel_multiple=8 the searched policy is the deployed one: every kept count is a multiple of 8 (or the
    whole group when it is smaller), and the cost the budget checked is that rounded policy's."""
    from rsdet_compress.compress.cost import estimate
    env = _env(view, ["size=0.125"], EnvConfig(channel_multiple=8))
    rng = np.random.default_rng(1)
    _, _, cand = _run(env, lambda t: rng.random(3) * np.array([0.6, 1, 1]))
    sizes = {g: view.groups[g].size for g in cand.policy.groups}
    kept = {g: len(spec["keep_idx"]) for g, spec in cand.policy.groups.items()}
    assert any(kept[g] < sizes[g] for g in kept), "some group must be pruned"
    assert all(k % 8 == 0 or k == sizes[g] for g, k in kept.items()), kept
    plain = _run(_env(view, ["size=0.125"]), lambda t: np.array([0.37, 0.5, 0.5]))[2].policy
    assert any(len(spec["keep_idx"]) % 8 for spec in plain.groups.values()), "without the option: exact counts"
    assert cand.meets_budget and estimate(view, cand.policy).weight_bits == cand.cost.weight_bits


def test_skipped_blocks_leave_the_walk(view):
    if not view.blocks:
        pytest.skip(f"{view.detector} has no skippable blocks")
    env = _env(view, ["size=0.125"])
    env.reset()
    n_all = len(env.steps)
    env.reset(np.ones(len(view.blocks)))
    assert len(env.steps) < n_all and not set(env.steps) & {n for b in view.blocks for n in b.layers}


def test_modes_prune_and_quant(view):
    env = _env(view, ["size=0.5"], EnvConfig(mode="prune"))
    _, applied, cand = _run(env, lambda t: np.array([0.6, 0.0, 0.0]))
    assert not cand.policy.layers and cand.policy.groups and (applied[:, 1] == 1.0).all()
    fixed = cand.policy.groups
    env = _env(view, ["size=0.1"], EnvConfig(mode="quant", fixed_groups=fixed))
    _, applied, cand = _run(env, lambda t: np.array([0.0, 0.5, 0.5]))
    assert cand.policy.groups == fixed and cand.policy.layers


def _mean_weight_bits(policy) -> float:
    bits = [b for spec in policy.layers.values()
            for b in (spec["weight_bits"] if isinstance(spec["weight_bits"], list) else [spec["weight_bits"]])]
    return float(np.mean(bits))


@pytest.mark.parametrize("split", ["bits", "half"])
def test_two_stage_split_leaves_the_quantization_stage_a_choice(view, split):
    """Two-stage at bops=0.02: its pruning stage's share, then the most expensive quantization of that structure."""
    budget = Budget.parse(["bops=0.02"])
    share = budget.pruning_stage(split, act_bits=8)
    prune = CompressEnv(view, importance_scores(view, "l1"), share, lambda p: {"map50": 0.5, "map50_95": 0.3},
                        accuracy, config=EnvConfig(mode="prune"))
    pruned = _run(prune, lambda t: np.array([0.0, 1.0, 0.0]))[2]  # the least pruning the stage's share allows
    assert pruned.meets_budget and not pruned.policy.layers
    quant = _env(view, ["bops=0.02"], EnvConfig(mode="quant", fixed_groups=pruned.policy.groups))
    most = _run(quant, lambda t: np.array([0.0, 1.0, 1.0]))[2]  # the most bits the budget lets it keep
    assert most.meets_budget and most.policy.groups == pruned.policy.groups
    if split == "bits":  # pruning took only what w4a8 cannot: 8-bit weights everywhere would break the budget
        assert share.as_dict()["bops"] == pytest.approx(0.64)
        assert _mean_weight_bits(most.policy) < 8
    else:  # pruning took half of 50x in log space: all-8-bit is inside the budget, the bits are no choice
        assert _mean_weight_bits(most.policy) == 8


def test_two_stage_split_of_each_metric():
    a = Budget.parse(["size=0.125", "flops=0.5"]).pruning_stage("bits", act_bits=8).as_dict()
    assert a == pytest.approx({"flops": 0.5, "size": 1.0})  # FLOPs are pruning's alone; w4 makes weights 8x smaller
    assert Budget.parse(["latency=0.25"]).pruning_stage("bits", 8).as_dict() == pytest.approx({"latency": 0.5})
    assert Budget.parse(["bops=0.02"]).pruning_stage("bits", 4).as_dict() == pytest.approx({"bops": 1.0})
    with pytest.raises(UserError, match="stage split"):
        Budget.parse(["bops=0.02"]).pruning_stage("thirds", 8)


def _head(model) -> str:
    """The Detect head's module path as an --unprunable pattern."""
    from ultralytics.nn.modules import Detect
    return "^" + re.escape(next(n for n, m in model.named_modules() if isinstance(m, Detect))) + r"\."


def test_unprunable_layers_keep_their_channels_but_stay_quantized(view):
    """--unprunable HEAD: no episode prunes the head's channels, it is still quantized, and the policy applies."""
    pattern = _head(view.model)
    head = {n for n in view.layers if re.search(pattern, n)}
    assert any(set(g.layers) & head for g in view.groups.values()), "the head must be prunable without the option"
    kept = CompressibleView(create_detector(view.detector, 2), imgsz=IMGSZ, unprunable=[pattern])
    assert not any(set(g.layers) & head for g in kept.groups.values())
    assert set(kept.groups) < set(view.groups) and set(kept.quantizable) == set(view.quantizable)
    env = CompressEnv(kept, importance_scores(kept, "l1"), Budget.parse(["size=0.1", "flops=0.5"]),
                      lambda p: {"map50": 0.5, "map50_95": 0.3}, accuracy)
    cand = _run(env, lambda t: np.array([0.8, 0.0, 0.0]))[2]  # prune everything it may, as far as it may
    assert cand.meets_budget and cand.policy.groups and not set(cand.policy.groups) & {
        g for g, grp in view.groups.items() if set(grp.layers) & head}
    assert head & set(cand.policy.layers), "the unprunable head is still quantized"
    cand.policy.validate(view)  # a compressed checkpoint rebuilds on the full view


def test_unprunable_patterns_that_do_not_match_are_refused():
    with pytest.raises(UserError, match="matches no conv layer"):
        CompressibleView(create_detector("skynet", 2), imgsz=IMGSZ, unprunable=["model\\.99\\."])
    with pytest.raises(UserError, match="not a regular expression"):
        CompressibleView(create_detector("skynet", 2), imgsz=IMGSZ, unprunable=["model.(("])


def test_impossible_budget_is_refused_before_any_evaluation(view):
    seen = []
    with pytest.raises(UserError, match="impossible"):
        _env(view, ["size=0.0005"], seen=seen)
    assert not seen


def test_uniform_start_is_the_least_uniform_8_bit_pruning_inside_the_budget(view, budget=("size=0.125",)):
    """The learning agents' first candidate: one sparsity for every group, 8-bit weights, the budget met without
    the wall; a little less pruning would need the wall. The agent learns from it like any episode."""
    searcher = make_searcher("ajpq", lambda cfg, which: _env(view, budget, cfg), 8, 0, EnvConfig())
    cand = searcher.run_episode(0)
    assert searcher.stage(0) == "uniform-start" and searcher.stage(1) == "ajpq"
    assert searcher.env.episode == 0 and cand.episode == 0, "the bisection's walks are not episodes"
    assert cand.meets_budget and searcher.env.walled == 0
    assert searcher.agent.elite is not None and searcher.agent.elite[0] == cand.reward
    bits = {b for spec in cand.policy.layers.values()
            for b in (spec["weight_bits"] if isinstance(spec["weight_bits"], list) else [spec["weight_bits"]])}
    assert bits == {8} and len(cand.policy.layers) == len(view.quantizable)
    sizes = {g: view.groups[g].size for g in cand.policy.groups}
    pruned = {g: 1 - len(spec["keep_idx"]) / sizes[g] for g, spec in cand.policy.groups.items()}
    largest = max(sizes, key=sizes.get)  # its fraction is the action's sparsity within half a channel
    sparsity = pruned[largest]
    assert sparsity > 0.05, pruned
    assert all(abs(f - sparsity) <= 0.5 / sizes[g] + 0.5 / sizes[largest] + 1e-9
               or len(cand.policy.groups[g]["keep_idx"]) == 1 for g, f in pruned.items()), pruned
    env = searcher.env
    env.reset()
    for _ in env.steps:
        env.step(np.array([sparsity - 0.02, 1.0, 0.0]))
    assert env.walled > 0, "less pruning than the uniform start must not fit"


def test_uniform_start_falls_back_to_the_agent_when_no_uniform_8_bit_policy_fits(view):
    env = _env(view, ["size=0.5"])
    cheapest = env.budget.usage(env._cost(env._cheapest_policy()), env.ref)["size"]
    densest = _run(env, lambda t: np.array([env.cfg.max_sparsity, 1.0, 0.0]))[2].usage["size"]
    assert densest > cheapest, "8-bit weights must cost more than the cheapest (2-bit) policy"
    budget = [f"size={(cheapest + densest) / 2:.6f}"]  # every layer at the largest sparsity: 2-bit fits, 8-bit not
    searcher = make_searcher("ajpq", lambda cfg, which: _env(view, budget, cfg), 8, 0, EnvConfig())
    assert uniform_action(searcher.env) is None
    cand = searcher.run_episode(0)
    assert cand.meets_budget and searcher.stage(0) == "ajpq" and searcher.env.episode == 0
    off = make_searcher("ajpq", lambda cfg, which: _env(view, ["size=0.125"], cfg), 8, 0, EnvConfig(),
                        uniform_start=False)
    off.run_episode(0)
    assert off.stage(0) == "ajpq"


def test_bits_follow_importance():
    imp = np.array([0.1, 5.0, 1.0, 3.0])
    bits = bits_for(0.5, 1.0, imp)
    assert bits[1] == max(bits) and bits[0] == min(bits) and bits[1] > bits[0]
    assert bits_for(0.5, 0.0, imp) == [5] * 4 and bits_for(1.0, 0.0, imp) == [8] * 4
    assert bits_for(0.0, 0.0, imp) == [2] * 4


def test_budget_parsing_and_rewards():
    assert Budget.parse(["size=1/8", "bops=50x"]).as_dict() == {"bops": 0.02, "size": 0.125}
    for bad in ("size", "speed=0.5", "size=0", "size=2", "size=abc"):
        with pytest.raises(UserError, match="budget"):
            Budget.parse([bad])
    with pytest.raises(UserError, match="accuracy_log_cost"):
        get_reward("eval(1)")
    assert set(REWARDS) >= {"accuracy", "accuracy_log_cost"}
    assert accuracy_log_cost(0.5, {"size": 0.0625}) > accuracy_log_cost(0.5, {"size": 0.125}) > 0.5
