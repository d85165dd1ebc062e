"""``search`` and ``compare`` sub-commands (kept apart from the single-model commands in main.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsdet_compress.cli import add_trust_weights
from rsdet_compress.errors import UserError


def add_search(sub) -> None:
    p = sub.add_parser("search", help="AJPQ search: joint pruning + mixed precision under a budget, mAP reward")
    p.add_argument("--weights", help="float weights to compress")
    p.add_argument("--data", help="dataset YAML; calibration and reward chips come from its train split")
    p.add_argument("--agent", default="ajpq", help="ajpq | abcp | random | two-stage | uniform")
    p.add_argument("--budget", action="append", help="NAME=FRACTION of the float model, NAME in size|bops|flops "
                   "(repeatable), e.g. --budget size=0.125 --budget bops=0.02")
    p.add_argument("--episodes", type=int, help="candidate evaluations (default 100; with --resume: the search's own"
                   " count, or more to extend it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="accuracy", help="accuracy | accuracy_log_cost | accuracy_minus_cost")
    p.add_argument("--metric", default="map50", help="map50 | map50_95: the accuracy the reward reads")
    p.add_argument("--criterion", default="l1", help="channel ranking: l1 | l2 | bn_scale | taylor")
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--reward-images", type=int, default=64)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--channel-multiple", type=int, default=1,
                   help="round kept channel counts up to a multiple of this in the search (8 for int8 CPU deploys)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default rsdet-compress)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a killed search (same parent MLflow run)")
    p.add_argument("--out", help="also write the best policy here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_trust_weights(p)


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="table + Pareto plot of several searches (MLflow parent run ids)")
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--out", default=None, help="plot path (default runs/compare/<ids>.png)")
    p.add_argument("--json", action="store_true")


def run_search(args: argparse.Namespace) -> None:
    from rsdet_compress.search.runner import SearchConfig, search
    if args.resume:
        r = search(resume=args.resume, progress=not args.quiet,
                   **({"episodes": args.episodes} if args.episodes is not None else {}))
    else:
        if not args.weights or not args.data:
            raise UserError("search needs --weights and --data (or --resume RUN_ID)")
        cfg = SearchConfig(weights=args.weights, data=args.data, agent=args.agent,
                           budget=args.budget or ["size=0.125"], seed=args.seed,
                           episodes=100 if args.episodes is None else args.episodes,
                           reward=args.reward, metric=args.metric, criterion=args.criterion,
                           calib_images=args.calib_images, reward_images=args.reward_images, act_bits=args.act_bits,
                           channel_multiple=args.channel_multiple,
                           **({"experiment": args.experiment} if args.experiment else {}))
        r = search(cfg, progress=not args.quiet)
    print(f"search run {r.run_id}: {len(r.candidates)} candidates in {r.wall_seconds:.0f} s"
          + (f", evaluation/forward time ratio {r.eval_ratio:.1f}" if r.eval_ratio else ""))
    if r.best is None:
        print("no candidate met the budget")
        return
    m = r.best["metrics"]
    print(f"best: episode {r.best['episode']}  mAP50 {m['map50']:.4f}  mAP50-95 {m['map50_95']:.4f}  "
          f"{m['compression_ratio']:.2f}x smaller  {m['bops_ratio']:.1f}x fewer BOPs")
    print(f"wrote {r.out_dir}/best_policy.json, pareto.png, candidates.jsonl")
    if args.out:
        r.best_policy.save(args.out)
        print(f"wrote {args.out}")


def run_compare(args: argparse.Namespace) -> None:
    from rsdet_compress.search.logbook import load_search
    from rsdet_compress.search.report import format_table, plot_searches, summary_row
    from rsdet_compress.settings import runs_root
    from rsdet_compress.tracking.mlflow_tracker import check_store
    uri = check_store()
    searches, rows = {}, []
    for rid in args.run_ids:
        name, info, recs = load_search(uri, rid)
        label = f"{name} {rid[:8]}"
        searches[label] = recs
        rows.append({**summary_row(label, recs), "budget": info.get("budget"), "detector": info.get("detector")})
    out = Path(args.out) if args.out else runs_root() / "compare" / ("_".join(r[:8] for r in args.run_ids) + ".png")
    plot_searches(searches, out)
    if args.json:
        print(json.dumps({"rows": rows, "plot": str(out)}))
        return
    print(format_table(rows))
    print(f"wrote {out}")
