"""Search benchmark: ajpq vs abcp vs two-stage vs random vs uniform 4-bit at equal budget and candidate count.

    python benchmarks/search_compare.py --models yolov8n --budgets size=0.125 --episodes 30
    python benchmarks/search_compare.py --models yolov8n --budgets bops=0.02 --act-bits 4 --device cuda
    python benchmarks/search_compare.py --models yolov8n --agents ajpq,random --seed 1   # more seeds
    python benchmarks/search_compare.py                      # both models, both budgets (hours on CPU)

Each search uses the trained baseline (runs/baselines/<model>/weights/best.pt),
rewards mAP50 on training chips (never the test split), and every candidate
meets the budget. The best policy of each search is then scored once on the
held-out airbus test split, calibrated, without fine-tuning. Every search is
an MLflow parent run (compare them with ``rsdet-compress compare RUN_ID...``).

Writes benchmarks/results/search_compare.md and .json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from rsdet_compress.compress.baselines import uniform_bits
from rsdet_compress.compress.calibration import calibration_set
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.cost import estimate
from rsdet_compress.config import load_config
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.data.prepare import PrepareConfig
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.engine.trainer import TrainConfig
from rsdet_compress.search.budget import Budget
from rsdet_compress.search.report import format_table
from rsdet_compress.search.runner import SearchConfig, search

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROW_CACHE = REPO / "runs" / "bench" / "search_rows.jsonl"  # finished rows, so a stopped benchmark resumes per search
AGENTS = ("ajpq", "abcp", "two-stage", "random")


def _test_score(ws: Workspace, policy, data_yaml: Path, evaluator: Evaluator, calib_images: int) -> dict:
    model = ws.apply(ws.resolve(policy), calibration_set(str(data_yaml), ws.view.imgsz, calib_images))
    return evaluator(model.to(evaluator.device))


def _device_name(device: str) -> str:
    """'cpu (2 threads)' or the GPU's name: wall times are only comparable on the same device."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def run(model: str, budget: str, episodes: int, data_yaml: Path, args) -> list[dict]:
    weights = Path(load_config(REPO / "configs" / f"airbus-{model}.yaml", TrainConfig).out) / "weights" / "best.pt"
    ws = Workspace.from_weights(weights)
    data = load_data_config(data_yaml)
    evaluator = Evaluator(EvalSet.from_coco(data.split_coco("test"), data.split_images("test"), ws.view.imgsz),
                          device=args.device)
    ref, b = estimate(ws.view), Budget.parse([budget])
    rows = []
    key = {"episodes": episodes, "seed": args.seed, "calib_images": args.calib_images,
           "reward_images": args.reward_images}
    cache = Path(args.row_cache)
    cached = _cached_rows(cache)
    for agent in args.agents.split(","):
        hit = next((r for r in map(_with_defaults, cached) if (r["model"], r["budget"], r["agent"], r["act_bits"])
                    == (model, budget, agent, args.act_bits) and all(r.get(k) == v for k, v in key.items())), None)
        if hit is not None:
            rows.append(_with_defaults({k: v for k, v in hit.items() if k not in key or k == "seed"}))
            print(f"cached: {rows[-1]}", flush=True)
            continue
        cfg = SearchConfig(weights=str(weights), data=str(data_yaml), agent=agent, budget=[budget], episodes=episodes,
                           seed=args.seed, calib_images=args.calib_images, reward_images=args.reward_images,
                           act_bits=args.act_bits, device=args.device, experiment="rsdet-compress-bench")
        t0 = time.time()
        r = search(cfg, progress=False)
        wall = time.time() - t0
        test = _test_score(ws, r.best_policy, data_yaml, evaluator, args.calib_images) if r.best_policy else {}
        m = r.best["metrics"] if r.best else {}
        rows.append({"model": model, "budget": budget, "act_bits": args.act_bits, "seed": args.seed, "agent": agent,
                     "test_map50": test.get("map50"),
                     "test_map50_95": test.get("map50_95"), "reward_map50": m.get("map50"),
                     "x_smaller": m.get("compression_ratio"), "x_fewer_bops": m.get("bops_ratio"),
                     "x_fewer_flops": m.get("flops_ratio"), "candidates": len(r.candidates),
                     "wall_min": round(wall / 60, 1), "eval_ratio": r.eval_ratio, "run_id": r.run_id,
                     "device": _device_name(args.device)})
        print(rows[-1], flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as f:
            f.write(json.dumps({**rows[-1], **key}) + "\n")
    if args.no_uniform:
        return rows
    pol = uniform_bits(ws.view, 4, args.act_bits)
    cost = estimate(ws.view, pol)
    test = _test_score(ws, pol, data_yaml, evaluator, args.calib_images)
    rat = cost.ratios(ref)
    rows.append({"model": model, "budget": budget, "act_bits": args.act_bits, "seed": None,
                 "agent": f"uniform 4-bit (w4a{args.act_bits})"
                 + ("" if b.met(cost, ref) else " (over budget)"), "test_map50": test["map50"],
                 "test_map50_95": test["map50_95"], "reward_map50": None, "x_smaller": rat["size"],
                 "x_fewer_bops": rat["bops"], "x_fewer_flops": rat["flops"], "candidates": 1, "wall_min": None,
                 "eval_ratio": None, "run_id": None, "device": None})
    return rows


def _cached_rows(cache: Path) -> list[dict]:
    """Rows of searches already finished by an earlier (stopped) run of this benchmark."""
    if not cache.is_file():
        return []
    return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]


def _markdown(rows: list[dict], commands: list[str]) -> str:
    cols = ["model", "budget", "act_bits", "seed", "agent", "test_map50", "test_map50_95", "reward_map50", "x_smaller",
            "x_fewer_bops", "x_fewer_flops", "candidates", "wall_min", "eval_ratio", "device"]
    table = format_table([{c: r.get(c) for c in cols} for r in _sorted(rows)])
    notes = ("test_map50: best policy of the search on the held-out airbus test split, calibrated (BN when pruned, "
             "activation ranges), no fine-tuning. reward_map50: the same policy on the search's reward chips "
             "(training split). eval_ratio: mean candidate evaluation time (apply + calibrate + forward + NMS + "
             "COCOeval) / bare forward time over the same reward chips.")
    cmds = "\n".join(f"- `RSDET_DATA=../shared/data {c}`" for c in commands)
    return f"# Search comparison: airbus-aircraft\n\n{table}\n\n{notes}\n\nCommands:\n{cmds}\n"


def _with_defaults(row: dict) -> dict:
    """Rows written before --act-bits/--seed existed: 8-bit activations, seed 0 (uniform rows have no seed)."""
    return {"act_bits": 8, "seed": None if row["agent"].startswith("uniform") else 0, **row}


def _row_key(row: dict) -> tuple:
    """A table row is replaced only by a row of the same model, budget, activation bits, seed and searcher."""
    return row["model"], row["budget"], row["act_bits"], row["seed"], row["agent"]


def _sorted(rows: list[dict]) -> list[dict]:
    order = {a: i for i, a in enumerate(AGENTS)}
    return sorted(rows, key=lambda r: (r["model"], r["budget"] != "size=0.125", r["budget"], r["act_bits"],
                                       r["seed"] is None, r["seed"] or 0, order.get(r["agent"], len(order))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="yolov8n,skynet")
    ap.add_argument("--budgets", default="size=0.125,bops=0.02")
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--reward-images", type=int, default=32)
    ap.add_argument("--act-bits", type=int, default=8, help="activation bits of quantized layers in every search")
    ap.add_argument("--agents", default=",".join(AGENTS), help="searchers to run (comma-separated)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform 4-bit row (e.g. extra seeds)")
    ap.add_argument("--device", default="cpu", help="where candidates are evaluated: cpu or cuda")
    ap.add_argument("--row-cache", default=str(ROW_CACHE), help="finished searches, one JSON row per line")
    ap.add_argument("--append", action="store_true", help="add to the existing results (other models/budgets)")
    args = ap.parse_args()
    prep = load_config(REPO / "configs" / "airbus-prepare.yaml", PrepareConfig)
    data_yaml = Path(prep.out) / "data.yaml"
    rows = []
    for model in args.models.split(","):
        for budget in args.budgets.split(","):
            rows += run(model, budget, args.episodes, data_yaml, args)
            # read the results now, not at start: another invocation (a second seed) may have written meanwhile
            old = json.loads((RESULTS / "search_compare.json").read_text()) if args.append and (
                RESULTS / "search_compare.json").is_file() else []
            commands = [r for r in old if "command" in r]
            old = [_with_defaults(r) for r in old if "command" not in r]
            done = {_row_key(r) for r in rows}
            table = [r for r in old if _row_key(r) not in done] + rows
            command = "python " + shlex.join(["benchmarks/search_compare.py", *sys.argv[1:]])
            cmds = [c for c in commands if c["command"] != command] + [{"command": command}]
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "search_compare.json").write_text(json.dumps(table + cmds, indent=2))
            (RESULTS / "search_compare.md").write_text(_markdown(table, [c["command"] for c in cmds]))
    print(_markdown(table, [c["command"] for c in cmds]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
