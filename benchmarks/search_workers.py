"""Search wall time with 1 and K Ray workers: the same search (agent, seed, budget, candidate count).

    python benchmarks/search_workers.py                                  # YOLOv8n, 16 AJPQ candidates, 1 and 2 workers
    python benchmarks/search_workers.py --workers 1,2,4,8 --episodes 32  # a machine with more cores
    python benchmarks/search_workers.py --recover fast                   # the accuracy issue's candidate evaluation

``--workers 1`` is the in-process search (all cores in one evaluation); K > 1 starts a
private local Ray cluster and K actors with cores/K threads each, whose start-up is part of
the wall time. With AJPQ the agent learns after every batch of K, so the candidates differ
between rows: their mAP50 is compared as distributions (mean, quartiles, best, and a
two-sample Kolmogorov-Smirnov test). Run it on an idle machine: timings of a shared 2-core
machine are only comparable within one quiet run.

Writes benchmarks/results/search_workers.md and .json.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from rsdet_compress.atomic import write_json, write_text
from rsdet_compress.machine import cpu_label
from rsdet_compress.search.runner import SearchConfig, search

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def ks_pvalue(a: list[float], b: list[float]) -> float | None:
    try:
        from scipy.stats import ks_2samp
    except ImportError:
        return None
    return float(ks_2samp(a, b).pvalue)


def run_one(workers: int, args) -> dict:
    load = os.getloadavg()[0]
    cfg = SearchConfig(weights=str(args.weights), data=str(args.data), agent=args.agent, episodes=args.episodes,
                       seed=args.seed, budget=[args.budget], recover=args.recover, workers=workers,
                       experiment="rsdet-bench-search-workers")
    r = search(cfg, progress=not args.quiet)
    maps = [c["metrics"]["map50"] for c in r.candidates]
    q1, med, q3 = quartiles(maps)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else torch.get_num_threads()
    return {"workers": workers, "threads_per_worker": threads,
            "wall_seconds": round(r.wall_seconds, 1), "seconds_per_candidate": round(r.wall_seconds / len(maps), 2),
            "candidates": len(maps), "in_budget": sum(c["metrics"]["meets_budget"] for c in r.candidates),
            "map50_mean": round(statistics.fmean(maps), 4), "map50_q1": round(q1, 4), "map50_median": round(med, 4),
            "map50_q3": round(q3, 4), "map50_best": round(max(maps), 4), "load_before": round(load, 2),
            "run_id": r.run_id, "map50": [round(m, 4) for m in maps]}


def markdown(rows: list[dict], args, cpu: str) -> str:
    base = rows[0]["wall_seconds"]
    lines = [f"Search wall time by worker count: {args.agent}, {args.episodes} candidates, budget {args.budget}, "
             f"seed {args.seed}, candidate evaluation `--recover {args.recover}`, "
             f"weights `{args.weights}`, data `{args.data}`.",
             f"CPU: {cpu}, {os.cpu_count()} cores; every row in one run, one after the other (1-minute load average "
             "before each row in its column).", "",
             "| workers | threads each | wall s | s / candidate | speed-up | in budget | mAP50 mean | q1 | median | q3 "
             "| best | KS p vs 1 worker | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = ks_pvalue(rows[0]["map50"], r["map50"]) if r is not rows[0] else None
        lines.append(f"| {r['workers']} | {r['threads_per_worker']} | {r['wall_seconds']} | "
                     f"{r['seconds_per_candidate']} | {base / r['wall_seconds']:.2f}x | {r['in_budget']}/"
                     f"{r['candidates']} | {r['map50_mean']:.4f} | {r['map50_q1']:.4f} | {r['map50_median']:.4f} | "
                     f"{r['map50_q3']:.4f} | {r['map50_best']:.4f} | {'' if p is None else f'{p:.2f}'} | "
                     f"{r['load_before']} |")
    lines += ["", "Command: `python benchmarks/search_workers.py " + shlex.join(sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=REPO / "runs/baselines/yolov8n/weights/best.pt")
    ap.add_argument("--data", type=Path, default=REPO / "runs/data/airbus/data.yaml")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; the first is the reference")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--agent", default="ajpq")
    ap.add_argument("--budget", default="size=0.125")
    ap.add_argument("--recover", default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="search_workers")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'runs' / 'bench' / 'search_workers.db'}")
    (REPO / "runs" / "bench").mkdir(parents=True, exist_ok=True)
    rows = [run_one(int(k), args) for k in args.workers.split(",")]
    cpu = cpu_label()
    write_json(RESULTS / f"{args.out}.json", {"cpu": cpu, "cores": os.cpu_count(), "args": vars(args) | {
        "weights": str(args.weights), "data": str(args.data)}, "rows": rows})
    text = markdown(rows, args, cpu)
    write_text(RESULTS / f"{args.out}.md", text)
    print(text)


if __name__ == "__main__":
    main()
