"""The searches the recovery benchmarks compress with: one per agent and budget, kept in the ledger.

``cached_search`` runs (or continues, or reloads) the search whose best policy a benchmark
row compresses, so recovery_compare.py and reward_ranking.py share one search per setting
(same agent, budget, episodes, reward form and seed), and a later checkout reuses its ledger
record instead of searching again for hours.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
from ledger import digest, kept

from rsdet_compress.machine import cpu_label
from rsdet_compress.runtime.latency_table import RUNTIMES
from rsdet_compress.search.budget import STAGE_SPLITS, Budget
from rsdet_compress.search.logbook import Logbook
from rsdet_compress.search.runner import LEGACY_SETTINGS, SearchConfig, search, timing_machine
from rsdet_compress.search.statefile import load_state
from rsdet_compress.settings import runs_root
from rsdet_compress.tracking.mlflow_tracker import check_store


def earlier_search(cfg: SearchConfig) -> str | None:
    """Run id of the newest search with exactly ``cfg``'s settings (its checkpoint), finished or not.

    A search of 24 fast-recovered candidates takes hours on 2 cores; one cut short by the end
    of a session continues from its last candidate instead of starting over, and a finished one
    whose table was never written is only reloaded.
    """
    states = sorted((runs_root() / "search").glob("*/state.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    machine = timing_machine(cfg)  # a latency search continues only on the machine that timed it
    for state_file in states:
        state = load_state(state_file)
        # settings added to SearchConfig after the checkpoint was written: the value that reproduces it
        if ({**asdict(cfg), **LEGACY_SETTINGS, **state.get("config", {})} == asdict(cfg)
                and state.get("timing_machine") == machine):
            return state_file.parent.name
    return None


def candidate_policies(run_id: str) -> dict[int, dict]:
    """Each candidate's policy by episode: the ``policy.json`` its nested MLflow run carries.

    The search's own records keep episode, params and metrics only (the policies would make
    its checkpoint grow with every candidate); MLflow holds every candidate's policy file.
    """
    uri = check_store(None)
    with tempfile.TemporaryDirectory() as tmp:
        return {int(r.data.tags["episode"]): json.loads(Path(mlflow.artifacts.download_artifacts(
                    run_id=r.info.run_id, artifact_path="policy.json", tracking_uri=uri, dst_path=tmp)).read_text())
                for r in Logbook(uri, parent=run_id).children()}


def cached_search(agent: str, weights: Path, data: Path, budget: Budget, args) -> dict:
    """One search at ``budget``: its best policy and in-budget candidates, kept in the ledger.

    Shared by recovery_compare.py and reward_ranking.py, so the ranking reuses the search whose best
    policy fills this table (same agent, budget, episodes, reward form and seed).
    """
    tag = "-".join(f"{n}{v:g}" for n, v in budget.limits)
    latency = {"latency_runtime": args.latency_runtime} if "latency" in budget.as_dict() else {}
    tag += f"-{args.latency_runtime}" if latency else ""
    # the split is two-stage's alone: the other agents keep its legacy value, which stays out of their keys
    split = args.stage_split if agent == "two-stage" else LEGACY_SETTINGS["stage_split"]
    name = (f"{weights.parent.parent.name}-search-{agent}-{tag}-e{args.episodes}-{args.search_recover}"
            f"-r{args.recover_iters}-s{args.seed}{'-u' if args.uniform_start else ''}"
            f"{'' if split == LEGACY_SETTINGS['stage_split'] else f'-split{split}'}{unprunable_suffix(args)}"
            f"{gpu_suffix(args)}")
    cfg = SearchConfig(weights=str(weights), data=str(data), agent=agent, episodes=args.episodes,
                       budget=[f"{n}={v}" for n, v in budget.limits], recover=args.search_recover,
                       recover_iters=args.recover_iters, channel_multiple=args.channel_multiple,
                       seed=args.seed, device=args.device, experiment="rsdet-compress-bench",
                       uniform_start=args.uniform_start, stage_split=split, unprunable=list(args.unprunable),
                       **latency)
    # a legacy setting at its legacy value stays out of the key, so records made before it existed still match
    settings = {k: v for k, v in asdict(cfg).items() if LEGACY_SETTINGS.get(k, object()) != v}

    def run() -> dict:
        earlier = earlier_search(cfg)
        if earlier:
            print(f"resuming search {earlier} (same settings)", flush=True)
        result = search(resume=earlier) if earlier else search(cfg)
        if result.best_policy is None:
            raise SystemExit(f"error: the {agent} search found no policy within {budget}")
        policies = candidate_policies(result.run_id)
        return {"name": name, "run_id": result.run_id, "config": cfg.__dict__,
                "wall_minutes": result.wall_seconds / 60, "eval_ratio": result.eval_ratio, "best": result.best,
                "best_policy": result.best_policy.to_dict(),
                "candidates": [{"episode": r["episode"], "policy": policies[r["episode"]], "search": r["metrics"]}
                               for r in result.candidates if r["metrics"].get("meets_budget")]}
    key = {"weights": digest(weights), "search": settings}
    if latency:  # a latency budget is a fraction of this machine's timings: another CPU finds another policy
        key["machine"] = cpu_label()
    return kept(name, key, run)


def unprunable_suffix(args) -> str:
    """``-keep-<patterns>`` for searches that kept some layers' channels whole (file-name safe)."""
    if not args.unprunable:
        return ""
    return "-keep-" + re.sub(r"[^A-Za-z0-9]+", "_", "+".join(args.unprunable)).strip("_")


def gpu_suffix(args) -> str:
    """``-gpu`` for work folders made on a GPU: their stage minutes are not this CPU's."""
    return "" if args.device == "cpu" else "-gpu"


def add_search_args(ap: argparse.ArgumentParser) -> None:
    """The search settings both benchmarks pass to ``cached_search``."""
    ap.add_argument("--episodes", type=int, default=24, help="candidates per search")
    ap.add_argument("--search-recover", default="fast", help="the searches' candidate evaluation")
    ap.add_argument("--recover-iters", type=int, default=5, help="steps per layer of the fast reward")
    ap.add_argument("--channel-multiple", type=int, default=8, help="kept-channel multiple")
    ap.add_argument("--seed", type=int, default=0, help="search seed")
    ap.add_argument("--uniform-start", action="store_true",
                    help="the agents' first candidate is uniform 8-bit pruning at the budget (search's default; off "
                         "here so the ledgered searches made before it are reused)")
    ap.add_argument("--stage-split", default=LEGACY_SETTINGS["stage_split"], choices=STAGE_SPLITS,
                    help="two-stage only: its pruning stage's share of the budget (search's default: bits; half "
                         "here so the ledgered two-stage searches made before it are reused)")
    ap.add_argument("--unprunable", action="append", default=[], metavar="REGEX",
                    help="conv layers whose output channels the searches never prune (search --unprunable)")
    ap.add_argument("--latency-runtime", default="openvino", choices=RUNTIMES,
                    help="with a latency budget: the runtime it is measured on (the one our int8 export wins on)")
