"""Reward ranking: how well each candidate evaluation of a search predicts the mAP a policy ends with.

    python benchmarks/reward_ranking.py --weights runs/baselines/yolov8n/weights/best.pt \\
        --data runs/data/airbus/data.yaml --budget size=0.125,flops=0.5 --episodes 24 --candidates 12

1. One search (``--agent``, ``--search-recover fast``) at ``--budget``; its in-budget candidates
   (the search recovery_compare.py ran with the same settings is reused from the work folder).
2. ``--candidates`` of them, evenly spread over the search's reward range (the top alone would
   say nothing about ranking), each scored with every reward form of ``search --recover``
   (``none``: calibration only; ``fast``: short reconstruction), on the same reward chips, timed
   (the search's own form is its logged reward and evaluation seconds).
3. Each gets the full treatment: compress (64 calibration chips) -> ``recover`` (``--images``,
   ``--iters``) [-> QAT ``--qat-epochs`` with ``--qat-config``] -> mAP on ``--split``.
4. Spearman rank correlation between each reward form and that final mAP, with the mean
   evaluation seconds per candidate (the price of a better ranking).

Stage outputs live under $RSDET_RUNS/bench/recovery/ (shared with recovery_compare.py) and are
reused on reruns; each ranked candidate's scores go to the ledger (benchmarks/results/ledger/),
so a later checkout ranks only the candidates still missing. Writes benchmarks/results/<--out>.{md,json}.
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

from kept_search import add_search_args, cached_search
from ledger import digest, kept
from recovery_compare import RESULTS, WORK, add_stage_args, make_stages, score
from scipy.stats import spearmanr

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.policy import Policy
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.search.budget import Budget
from rsdet_compress.search.evaluation import RECOVERY, CandidateEvaluator, fast_recovery, train_subsets


def spread(cands: list[dict], k: int) -> list[dict]:
    """``k`` candidates evenly spaced over the search's reward order (distinct policies only)."""
    seen, unique = set(), []
    for c in sorted(cands, key=lambda c: c["search"]["reward"]):
        key = json.dumps(c["policy"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    if len(unique) <= k:
        return unique
    return [unique[round(i * (len(unique) - 1) / (k - 1))] for i in range(k)]


def reward_evaluators(ws: Workspace, data: Path, search_cfg: dict) -> dict[str, CandidateEvaluator]:
    """One evaluator per reward form of ``search --recover`` other than the search's own, on its chips.

    The search's own form is not scored again: its logged mAP and evaluation seconds are that
    form's reward and cost for the candidate (same chips, same seed), so reusing them halves the work.
    """
    calib, reward_set = train_subsets(str(data), ws.view.imgsz, search_cfg["calib_images"],
                                      search_cfg["reward_images"], search_cfg["seed"])
    return {form: CandidateEvaluator(ws, calib, reward_set, device=search_cfg["device"],
                                     recovery=fast_recovery(search_cfg["recover_iters"]) if form == "fast" else None)
            for form in RECOVERY if form != search_cfg["recover"]}


def markdown(rows: list[dict], summary: dict, header: str) -> str:
    forms = list(summary["spearman"])
    cols = ["episode", *[f"reward ({f})" for f in forms], "final mAP50", "size x", "FLOPs x", "BOPs x"]
    out = [header, "", "| reward form | Spearman ρ vs final mAP50 | p | mean eval s / candidate | eval time x |",
           "|---|---|---|---|---|"]
    base = summary["eval_seconds"][forms[0]]
    for f in forms:
        rho, p = summary["spearman"][f]
        out.append(f"| {f} | {rho:+.3f} | {p:.3g} | {summary['eval_seconds'][f]:.1f} | "
                   f"{summary['eval_seconds'][f] / base:.1f} |")
    out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join([str(r["episode"]), *[f"{r['reward'][f]:.4f}" for f in forms],
                                      f"{r['final_map50']:.4f}", f"{r['size']:.2f}", f"{r['flops']:.2f}",
                                      f"{r['bops']:.2f}"]) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="float checkpoint")
    ap.add_argument("--data", required=True, help="dataset YAML")
    ap.add_argument("--split", default="test", help="split the final mAP is measured on")
    ap.add_argument("--budget", default="size=0.125,flops=0.5")
    ap.add_argument("--agent", default="ajpq")
    ap.add_argument("--candidates", type=int, default=12, help="candidates given the full treatment")
    add_search_args(ap)
    add_stage_args(ap, iters=100)
    ap.add_argument("--out", default="reward_ranking")
    args = ap.parse_args()
    weights, data = Path(args.weights), Path(args.data)
    budget = Budget.parse(args.budget.split(","))
    found = cached_search(args.agent, weights, data, budget, args)
    chosen = spread(found["candidates"], args.candidates)
    if len(chosen) < 3:
        raise SystemExit(f"error: only {len(chosen)} distinct in-budget candidates; run more --episodes")
    ws = Workspace.from_weights(weights)
    cfg = load_data_config(data)
    evaluator = Evaluator(EvalSet.from_coco(cfg.split_coco(args.split), cfg.split_images(args.split),
                                            int(ws.view.imgsz)), max_det=300, device=args.device)
    evaluators = functools.cache(lambda: reward_evaluators(ws, data, found["config"]))  # decodes the chips once
    stage_settings = {k: getattr(args, k) for k in ("images", "iters", "recover_minutes", "qat_epochs",
                                                     "qat_config", "device")}
    rows = []
    for c in chosen:
        def ranked(c=c) -> dict:
            policy = Policy.from_dict(c["policy"])
            s = c["search"]
            own = {found["config"]["recover"]: {"map50": s["map50"], "eval_seconds": s["eval_seconds"]}}
            got = {f: own[f] if f in own else evaluators()[f](policy) for f in RECOVERY}
            work = WORK / f"{found['name']}-ep{c['episode']}"  # the search's budget, settings and device
            work.mkdir(parents=True, exist_ok=True)
            stages = make_stages(policy, weights, data, work, args)
            m, _ = score(stages[-1][1], evaluator)
            return {"episode": c["episode"], "reward": {f: got[f]["map50"] for f in got},
                    "eval_seconds": {f: got[f]["eval_seconds"] for f in got},
                    "final_map50": m["map50"], "final_map50_95": m["map50_95"],
                    "final_minutes": sum(minutes for _, _, (minutes, _) in stages),
                    "size": s["compression_ratio"], "flops": s["flops_ratio"], "bops": s["bops_ratio"]}
        key = {"weights": digest(weights), "search": found["name"], "policy": c["policy"], "split": args.split,
               "stages": stage_settings}
        rows.append(kept(f"rank-{found['name']}-ep{c['episode']}", key, ranked))
        print(f"episode {c['episode']:3}: " + "  ".join(f"{f} {v:.4f}" for f, v in rows[-1]["reward"].items())
              + f"  final {rows[-1]['final_map50']:.4f}", flush=True)
    forms = list(rows[0]["reward"])
    final = [r["final_map50"] for r in rows]
    summary = {"spearman": {f: tuple(float(v) for v in spearmanr([r["reward"][f] for r in rows], final))
                            for f in forms},
               "eval_seconds": {f: sum(r["eval_seconds"][f] for r in rows) / len(rows) for f in forms}}
    stage = f"recover ({args.images} chips, {args.iters} steps)" + (
        f" + QAT {args.qat_epochs} ep ({args.qat_config})" if args.qat_epochs else "")
    header = (f"# Reward ranking: {args.agent} search at {budget}, {len(rows)} of its candidates\n\n"
              f"`python benchmarks/reward_ranking.py {shlex.join(sys.argv[1:])}`  \n"
              f"Final mAP50: {args.split} split of {data}, after {stage}. Rewards: the search's training chips.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{args.out}.md", markdown(rows, summary, header))
    write_text(RESULTS / f"{args.out}.json", json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(markdown(rows, summary, header))


if __name__ == "__main__":
    main()
