"""``search`` and ``compare`` sub-commands (kept apart from the single-model commands in main.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsdet_compress.cli import add_trust_weights, choices
from rsdet_compress.cli.options import ChoicesHelp, add_config_args
from rsdet_compress.errors import UserError

SEARCH_HELP = "AJPQ search: joint pruning + mixed precision under a budget, mAP reward"
COMPARE_HELP = "table + Pareto plot of several searches (MLflow parent run ids)"
#: flags of the search command that are not SearchConfig fields
_NOT_CONFIG = ("command", "resume", "out", "quiet", "trust_weights")


def add_search(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.search.runner import SearchConfig
    add_config_args(p, SearchConfig,
                    choices={"agent": choices.agents, "reward": choices.rewards, "metric": choices.metrics,
                             "criterion": choices.criteria, "recover": choices.recovery,
                             "latency_runtime": choices.latency_runtimes, "stage_split": choices.stage_splits},
                    extra={"budget": {"action": "append", "type": None, "metavar": "NAME=FRACTION", "help": ChoicesHelp(
                        "NAME=FRACTION of the float model, NAME one of %(choices)s (repeatable), e.g. "
                        "--budget size=0.125 --budget bops=0.02", choices.budget_metrics)},
                           "unprunable": {"action": "append", "type": None, "metavar": "REGEX"}})
    p.add_argument("--resume", metavar="RUN_ID", help="continue a killed search (same parent MLflow run)")
    p.add_argument("--out", help="also write the best policy here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_trust_weights(p)


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    p.add_argument("--out", default=None, help="plot path (default runs/compare/<ids>.png)")
    p.add_argument("--json", action="store_true")


def run_search(args: argparse.Namespace) -> None:
    from rsdet_compress.config import make_config
    from rsdet_compress.search.runner import SearchConfig, search
    if args.resume:
        r = search(resume=args.resume, progress=not args.quiet,
                   **({"episodes": args.episodes} if args.episodes is not None else {}))
    else:
        if not args.weights or not args.data:
            raise UserError("search needs --weights and --data (or --resume RUN_ID)")
        opts = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
        cfg = make_config(SearchConfig, {}, "command line", **opts)  # flags not given: SearchConfig's defaults
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
