"""``search(...)``: run a searcher for N candidate evaluations, log each to MLflow, resume after a crash.

Order per episode (what makes ``kill -9`` at any moment safe): evaluate ->
log the nested run (tag ``episode``) -> write the checkpoint atomically. On
``resume``, nested runs of episodes after the checkpoint (logged, then
killed before the checkpoint) are deleted and the episode is re-run; the
agent, replay buffer and RNGs come from the checkpoint, so it is the same
candidate. Nothing is lost and nothing is logged twice.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rsdet_compress.atomic import write_json, write_text
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.importance import DEFAULT_CRITERION
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.view import layer_patterns
from rsdet_compress.data.config import load_data_config
from rsdet_compress.detectors.checkpoint import check_classes
from rsdet_compress.errors import UserError
from rsdet_compress.machine import cpu_label
from rsdet_compress.runtime.latency_table import RUNTIMES, LatencyTable, table_path
from rsdet_compress.search.budget import STAGE_SPLITS, Budget
from rsdet_compress.search.env import CompressEnv, EnvConfig
from rsdet_compress.search.evaluation import RECOVERY, build_evaluator
from rsdet_compress.search.latency_cost import LatencyCost
from rsdet_compress.search.logbook import Logbook, candidate_record
from rsdet_compress.search.memo import ScoreMemo
from rsdet_compress.search.report import plot_searches, summary_row
from rsdet_compress.search.rewards import get_reward
from rsdet_compress.search.searchers import SEARCHERS, make_searcher
from rsdet_compress.search.statefile import load_state, save_state
from rsdet_compress.search.workers import evaluator_pool
from rsdet_compress.settings import runs_root
from rsdet_compress.tracking.mlflow_tracker import DEFAULT_EXPERIMENT, NOTE_TAG, check_store

METRICS = ("map50", "map50_95")
#: what an MLflow run id looks like (32 hex digits; letters, digits, - and _ allowed): never a path
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class SearchConfig:
    """One search. Saved in the checkpoint, so ``--resume`` needs only the run id."""

    #: float weights to compress
    weights: str = ""
    #: dataset YAML; calibration and reward chips come from its train split
    data: str = ""
    #: the search agent (a learning agent or a baseline searcher)
    agent: str = "ajpq"
    #: NAME=FRACTION of the float model, NAME a budget metric (search.budget.METRICS), e.g. size=0.125 (8x smaller
    #: weight storage) and/or bops=0.02
    budget: list[str] = field(default_factory=lambda: ["size=0.125"])
    #: candidate evaluations; AMC/HAQ use hundreds, 100-300 is a practical CPU range (with --resume: the search's
    #: own count, or more to extend it)
    episodes: int = 100
    #: seeds torch, the agent and the choice of calibration and reward chips
    seed: int = 0
    #: reward function name (search.rewards); accuracy under the hard budget is HAQ's choice
    reward: str = "accuracy"
    #: the accuracy the reward reads: COCO mAP@0.5 (map50) by default, or mAP@0.5:0.95
    metric: str = "map50"
    #: channel ranking criterion shared by both controllers
    criterion: str = DEFAULT_CRITERION
    #: training chips for BN/activation calibration of every candidate
    calib_images: int = 32
    #: other training chips the reward mAP is measured on (never the reporting split)
    reward_images: int = 64
    #: candidate evaluation: "none" scores it after calibration; "fast" after a short block reconstruction on the
    #: calibration chips (the mAP it will have after recover; costs recover_iters steps per layer)
    recover: str = "none"
    #: reconstruction steps per layer of a "fast" candidate evaluation
    recover_iters: int = 5
    #: activation bits of quantized layers
    act_bits: int = 8
    #: largest fraction of a group the agent may prune
    max_sparsity: float = 0.8
    #: kept channel counts rounded up to a multiple of this inside the search (8: what int8 CPU kernels want, and
    #: the budget then holds for the deployed file; 1: exact counts)
    channel_multiple: int = 1
    #: MLflow experiment
    experiment: str = DEFAULT_EXPERIMENT
    #: "cpu", "cuda"... where candidates are evaluated
    device: str = "cpu"
    #: with a latency budget: the CPU runtime the latency is measured on (runtime.latency_table.RUNTIMES)
    latency_runtime: str = "onnxruntime"
    #: with a latency budget: CPU threads of the measurement (None: all; the deployment's own count is best)
    latency_threads: int | None = None
    #: the learning agents' first candidate is uniform pruning at 8-bit weights at the budget, so the simplest policy
    #: is always compared (search.searchers.AgentSearcher); off: a random warm-up draw, as checkpoints before it had
    uniform_start: bool = True
    #: two-stage only: how its pruning stage's budget is taken from the whole (search.budget.STAGE_SPLITS); "bits":
    #: pruning cuts what quantization to w4 cannot, so at bops=0.02 both stages have a share to choose
    stage_split: str = "bits"
    #: conv layers whose output channels the search never prunes, as regex patterns on module paths (repeatable, e.g.
    #: "model\.11\." for SkyNet's head); they are still quantized. Empty: every group is the agents' to prune
    unprunable: list[str] = field(default_factory=list)
    #: candidates evaluated at once, each by a Ray worker (1: in this process, exactly the sequential search;
    #: the agents then learn after each batch of this many)
    workers: int = 1
    #: Ray cluster to run the workers on ("auto": the one `ray start` made here, HOST:PORT: a head node;
    #: None: a local one started for this search, on 127.0.0.1)
    ray_address: str | None = None


#: settings added after search checkpoints were first written, at the value that reproduces those checkpoints
LEGACY_SETTINGS = {"uniform_start": False, "stage_split": "half", "unprunable": []}


@dataclass
class SearchResult:
    run_id: str
    best: dict | None
    best_policy: Policy | None
    candidates: list[dict]
    wall_seconds: float
    eval_ratio: float | None
    out_dir: str


def _state_dir(run_id: str) -> Path:
    return runs_root() / "search" / run_id


def _check(cfg: SearchConfig) -> Budget:
    if cfg.agent not in SEARCHERS:
        raise UserError(f"unknown agent {cfg.agent!r}; choose one of {', '.join(SEARCHERS)}")
    get_reward(cfg.reward)
    if cfg.metric not in METRICS:
        raise UserError(f"unknown reward metric {cfg.metric!r}; choose one of {', '.join(METRICS)}")
    if cfg.recover not in RECOVERY:
        raise UserError(f"unknown --recover {cfg.recover!r}; choose one of {', '.join(RECOVERY)}")
    if cfg.recover_iters < 1:
        raise UserError(f"--recover-iters must be >= 1, got {cfg.recover_iters}")
    if cfg.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {cfg.episodes}")
    for flag, n in (("--calib-images", cfg.calib_images), ("--reward-images", cfg.reward_images)):
        if n < 1:
            raise UserError(f"{flag} must be >= 1, got {n}")
    if cfg.workers < 1:
        raise UserError(f"--workers must be >= 1, not {cfg.workers}")
    if cfg.channel_multiple < 1:
        raise UserError(f"--channel-multiple must be >= 1, not {cfg.channel_multiple}")
    if cfg.latency_runtime not in RUNTIMES:
        raise UserError(f"unknown --latency-runtime {cfg.latency_runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if cfg.stage_split not in STAGE_SPLITS:
        raise UserError(f"unknown --stage-split {cfg.stage_split!r}; choose one of {', '.join(STAGE_SPLITS)}")
    layer_patterns(cfg.unprunable)  # whether each matches a layer is checked once the model is loaded
    if cfg.latency_threads is not None and cfg.latency_threads < 1:
        raise UserError(f"--latency-threads must be >= 1, got {cfg.latency_threads}")
    if not cfg.weights or not Path(cfg.weights).is_file():
        raise UserError(f"{cfg.weights or '--weights'}: weights file not found")
    load_data_config(cfg.data)
    return Budget.parse(cfg.budget)


def latency_cost(ws: Workspace, cfg: SearchConfig) -> LatencyCost:
    """The latency-annotated cost of a latency budget: this machine's table, fitted to its anchor models."""
    return LatencyCost.measured(ws, LatencyTable(cfg.latency_runtime, cfg.latency_threads))


def timing_machine(cfg: SearchConfig) -> dict | None:
    """What a latency budget was timed on (CPU, threads, runtime version: its table's file); None without one.

    A latency budget is a fraction of the float model's latency on this machine's runtime: the same
    ``latency=0.33`` on a CPU without VNNI asks for far deeper pruning. So a search keeps this in its
    checkpoint, and a resume elsewhere is refused instead of mixing candidates timed on two machines.
    """
    if "latency" not in Budget.parse(cfg.budget).as_dict():
        return None
    threads = int(cfg.latency_threads or torch.get_num_threads())
    return {"cpu": cpu_label(), "threads": threads, "table": table_path(cfg.latency_runtime, threads).name}


def _check_same_machine(cfg: SearchConfig, state: dict, path: Path) -> None:
    then, now = state.get("timing_machine"), timing_machine(cfg)
    if then and now and then.get("table") != now["table"]:
        raise UserError(f"--resume: {path}: this search's latency budget was timed on {then.get('cpu')}, "
                        f"{then.get('threads')} threads ({then.get('table')}); this machine is {now['cpu']}, "
                        f"{now['threads']} threads ({now['table']}): start a new search here (its budget means "
                        "another latency on this CPU)")


def search(config: SearchConfig | None = None, resume: str | None = None, progress: bool = True,
           tracking_uri: str | None = None, **overrides) -> SearchResult:
    """Run (or resume) a compression search; every candidate becomes a nested MLflow run."""
    state = None
    if not resume:  # cheap argument checks first: bad input fails before MLflow or the model is touched
        _check(SearchConfig(**{**asdict(config or SearchConfig()), **overrides}))
    if resume:  # the checkpoint is read (as plain data) before the store or the model is touched
        if not _RUN_ID.fullmatch(resume):
            raise UserError(f"--resume {resume!r}: not a run id (letters, digits, - and _ only)")
        path = _state_dir(resume) / "state.pt"
        if not path.is_file():
            raise UserError(f"--resume {resume}: no search checkpoint at {path}")
        state = load_state(path)
        if not isinstance(state.get("config"), dict) or set(state["config"]) - set(SearchConfig.__dataclass_fields__):
            raise UserError(f"{path}: not a search checkpoint of this rsdet-compress (field 'config')")
        # episodes=None means "the search's own count"; 0 is a value, and an error (checked below)
        cfg = SearchConfig(**{**LEGACY_SETTINGS, **state["config"],
                              **{k: v for k, v in overrides.items() if k == "episodes" and v is not None}})
        _check_same_machine(cfg, state, path)
    else:
        cfg = config or SearchConfig()
        cfg = SearchConfig(**{**asdict(cfg), **overrides})
    budget = _check(cfg)
    uri = check_store(tracking_uri)
    torch.manual_seed(cfg.seed)

    ws = Workspace.from_weights(cfg.weights, unprunable=cfg.unprunable)
    check_classes(ws.meta, load_data_config(cfg.data).names, cfg.weights, cfg.data)
    evaluator = build_evaluator(asdict(cfg), ws)  # the workers build theirs the same way
    scores = ws.scores(cfg.criterion)
    reward_fn = get_reward(cfg.reward)
    cost_fn = latency_cost(ws, cfg) if "latency" in budget.as_dict() else estimate

    def make_env(env_cfg: EnvConfig, which) -> CompressEnv:
        b = budget.pruning_stage(cfg.stage_split, cfg.act_bits) if which == "prune" else budget
        return CompressEnv(ws.view, scores, b, evaluator, reward_fn, cfg.metric, env_cfg, cfg.criterion, cost_fn)

    env_cfg = EnvConfig(act_bits=cfg.act_bits, max_sparsity=cfg.max_sparsity, channel_multiple=cfg.channel_multiple)
    searcher = make_searcher(cfg.agent, make_env, cfg.episodes, cfg.seed, env_cfg, cfg.uniform_start)
    book = Logbook(uri, cfg.experiment, parent=resume)
    group_sizes = {g: grp.size for g, grp in ws.view.groups.items()}
    if state is None:
        data = load_data_config(cfg.data)
        run_id = book.start(f"search-{cfg.agent}-{ws.view.detector}",
                            params={**asdict(cfg), "budget": str(budget), "data_prep": data.prep},
                            tags={"stage": "search", "detector": ws.view.detector, "agent": cfg.agent,
                                  "weights_fingerprint": ws.weights_fp, "budget": str(budget),
                                  NOTE_TAG: search_description(cfg, ws.view.detector, str(budget))})
        records, start, wall0 = [], 0, 0.0
        summary = data.yaml_path.parent / "summary.json"
        book_artifacts = [summary] if summary.is_file() else []
    else:
        run_id = resume
        searcher.load_state_dict(state["searcher"])
        book.pending = state["pending"]
        records, start, wall0 = state["records"], state["next_episode"], state["wall_seconds"]
        evaluator.seconds = list(state.get("eval_seconds", []))
        book.forget_from(start)
        book_artifacts = []
    out_dir = _state_dir(run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    forward_s = evaluator.forward_seconds()
    ref = cost_fn(ws.view)

    bar = _progress(cfg.episodes, start, progress)
    t0 = time.perf_counter() - wall0
    best = state["best"] if state is not None else None  # carries the policy, unlike the summary records
    pool = evaluator_pool(cfg, evaluator)
    memo = ScoreMemo(state.get("memo") if state is not None else None)
    machine = timing_machine(cfg)
    episode = start
    while episode < cfg.episodes:
        end = searcher.batch_end(episode, cfg.workers, cfg.episodes)
        proposals = [searcher.propose(e) for e in range(episode, end)]
        for prop, metrics in zip(proposals, memo.score(proposals, pool.map)):
            cand = searcher.observe(prop, metrics)
            if pool.remote and "repeat_of" not in metrics:  # the in-process evaluator keeps its own times
                evaluator.seconds.append(float(metrics.get("eval_seconds", cand.seconds)))
            stage = searcher.stage(prop.episode) if hasattr(searcher, "stage") else cfg.agent
            rec = candidate_record(cand, group_sizes, stage)
            in_budget = budget.met(cand.cost, ref)  # the search's budget, whatever a stage's own (two-stage: half)
            rec["metrics"]["meets_budget"] = int(in_budget)
            book.log_candidate(rec)
            summary_rec = {k: rec[k] for k in ("episode", "params", "metrics")}
            records.append(summary_rec)
            if in_budget and (best is None or cand.reward > best["metrics"]["reward"]):
                best = {**summary_rec, "policy": rec["policy"]}
            if best:
                m = best["metrics"]
                book.update_parent({"best_reward": m["reward"], f"best_{cfg.metric}": m[cfg.metric],
                                    "best_compression_ratio": m["compression_ratio"]}, step=prop.episode)
            bar.update(1)
            bar.set_postfix_str(f"best reward {best['metrics']['reward']:.4f} {cfg.metric} "
                                f"{best['metrics'][cfg.metric]:.4f} | now {cand.ratios['size']:.1f}x smaller, "
                                f"{cand.ratios['bops']:.0f}x fewer BOPs" if best else "no candidate in budget yet")
        episode = end
        # after the whole batch: a kill -9 mid-batch resumes at its start, and its logged runs are forgotten
        save_state(out_dir / "state.pt", {
            "config": asdict(cfg), "searcher": searcher.state_dict(), "pending": book.pending,
            "records": records, "best": best, "next_episode": episode, "wall_seconds": time.perf_counter() - t0,
            "eval_seconds": list(evaluator.seconds), "memo": memo.state_dict(), "timing_machine": machine})
    pool.close()
    bar.close()
    wall = time.perf_counter() - t0
    mean_eval = sum(evaluator.seconds) / len(evaluator.seconds) if evaluator.seconds else None
    ratio = mean_eval / forward_s if mean_eval and forward_s > 0 else None
    artifacts = list(book_artifacts)
    write_text(out_dir / "candidates.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    artifacts.append(plot_searches({cfg.agent: records}, out_dir / "pareto.png", cfg.metric))
    artifacts.append(out_dir / "candidates.jsonl")
    best_policy = None
    if best:
        best_policy = Policy.from_dict(best["policy"], source="search")
        best_policy.weights = ws.weights_fp
        best_policy.search_run = run_id
        best_policy.save(out_dir / "best_policy.json")
        artifacts.append(out_dir / "best_policy.json")
    row = summary_row(cfg.agent, records, cfg.metric)
    write_json(out_dir / "summary.json", {**row, "wall_seconds": wall, "eval_ratio": ratio,
                                          "forward_seconds": forward_s, "mean_eval_seconds": mean_eval})
    artifacts.append(out_dir / "summary.json")
    book.update_parent({"wall_seconds": wall, "eval_ratio": ratio or 0.0}, step=cfg.episodes)
    if not book.finish(artifacts, fallback=out_dir / "pending.jsonl"):
        import sys
        print(f"warning: MLflow store {uri} unreachable at the end: {len(book.pending)} candidate(s) kept in "
              f"{out_dir / 'pending.jsonl'}; `rsdet-compress search --resume {run_id}` uploads them", file=sys.stderr)
    return SearchResult(run_id, best, best_policy, records, wall, ratio, str(out_dir))


def search_description(cfg: SearchConfig, detector: str, budget: str) -> str:
    """The parent run's description in the MLflow UI: what its nested runs are and how to compare them."""
    return (f"**{cfg.agent} search** of `{detector}` under `{budget}`, {cfg.episodes} candidates, "
            f"reward `{cfg.reward}` on `{cfg.metric}`.\n\n"
            "Each nested run is one candidate policy (its `policy.json` is an artifact); `meets_budget` = 1 "
            "marks those within the budget. To compare them: expand this run in the runs table, select its "
            f"candidates and open the **Chart** view, then plot `{cfg.metric}` against `compression_ratio` "
            "(size) and against `bops_ratio` (scatter charts); the search's own Pareto plot is `pareto.png` "
            "among this run's artifacts, and the best policy is `best_policy.json`.")


def _progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="search", unit="cand", dynamic_ncols=True)
