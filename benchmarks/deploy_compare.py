"""Deployment benchmark: fp32 vs AJPQ-compressed + QAT fine-tune, per detector, on the airbus test split.

    python benchmarks/deploy_compare.py --models yolov8n --episodes 24 --finetune-epochs 4
    python benchmarks/deploy_compare.py --models yolov8n --policy runs/search/<id>/best_policy.json

For each detector (trained baseline runs/baselines/<model>/weights/best.pt):
1. fp32: ONNX export (mAP-checked), test-split mAP.
2. AJPQ policy: a search under ``--budget`` (default 8.3x smaller weights and 1.67x fewer
   FLOPs: without a FLOPs term the agent spends the whole budget on bits and nothing
   gets faster), or ``--policy`` (the fp32 weights the policy was searched on).
   Kept channel counts are multiples of ``--channel-multiple`` (8) inside the search, so
   the budget holds for the deployed file (rounding after the search cost YOLOv8n ~16%).
3. compress (calibrated) -> QAT fine-tune (``--finetune-epochs``, distilled from fp32)
   (channels rounded to multiples of 8 before fine-tuning) -> test mAP -> int8 ONNX and packed file.
4. onnxruntime CPU latency, batch 1 and 8: fp32 ONNX vs int8 ONNX.

Every stage's output is kept under runs/bench/deploy/<model>/<settings>/ (fp32 stages
under runs/bench/deploy/<model>/) and reused when the script is run again with the
same settings; latency is measured afresh on every run. Writes benchmarks/results/deploy_compare.{md,json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.config import load_config
from rsdet_compress.data.prepare import PrepareConfig
from rsdet_compress.engine.finetune import FinetuneConfig, finetune
from rsdet_compress.engine.latency import LatencyConfig, benchmark, machine
from rsdet_compress.engine.scorer import evaluate
from rsdet_compress.engine.trainer import TrainConfig
from rsdet_compress.export.exporter import export
from rsdet_compress.search.report import format_table
from rsdet_compress.search.runner import SearchConfig, search

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "runs" / "bench" / "deploy"
#: the issue's targets: deploy file >= 8x smaller than fp32, mAP50 drop <= 1 point, ORT CPU >= 2x faster
TARGETS = {"x_smaller": 8.0, "max_map50_drop": 0.01, "ort_speedup": 2.0}


def _cached(path: Path, make):
    """JSON result of ``make()``, computed once and kept in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def _policy(model: str, weights: Path, data_yaml: Path, args, work: Path) -> Path:
    if args.policy:
        return Path(args.policy)
    out = work / "policy.json"
    if not out.is_file():
        cfg = SearchConfig(weights=str(weights), data=str(data_yaml), agent="ajpq", budget=args.budget.split(","),
                           episodes=args.episodes, seed=args.seed, calib_images=16, reward_images=32,
                           channel_multiple=args.channel_multiple, experiment="rsdet-compress-bench")
        r = search(cfg, progress=False)
        if r.best_policy is None:
            raise SystemExit(f"error: {model}: no candidate met the budget {args.budget}")
        r.best_policy.save(out)
    return out


def _settings(args) -> str:
    """The folder name of one set of compressed-stage settings (a changed budget never reuses an old policy)."""
    if args.policy:
        src = hashlib.sha1(Path(args.policy).read_bytes()).hexdigest()[:10]
        return f"policy-{src}"
    mult = f"-m{args.channel_multiple}" if args.channel_multiple != 1 else ""
    return f"{args.budget.replace('=', '').replace(',', '_')}-ep{args.episodes}-s{args.seed}{mult}"


def run(model: str, data_yaml: Path, args) -> list[dict]:
    weights = Path(load_config(REPO / "configs" / f"airbus-{model}.yaml", TrainConfig).out) / "weights" / "best.pt"
    base_dir = WORK / model
    base_dir.mkdir(parents=True, exist_ok=True)
    fp32 = _cached(base_dir / "eval_fp32.json", lambda: evaluate(weights, data_yaml, split="test"))
    onnx = _cached(base_dir / "export_fp32.json", lambda: export(weights, "onnx", out=base_dir / "fp32.onnx",
                                                                 data=data_yaml, split="test"))
    work = base_dir / _settings(args)
    work.mkdir(parents=True, exist_ok=True)
    policy_path = _policy(model, weights, data_yaml, args, work)
    ws = Workspace.from_weights(weights)
    ratios = estimate(ws.view, ws.resolve(Policy.load(policy_path))).ratios(estimate(ws.view))
    comp_pt = work / "compressed.pt"
    if not comp_pt.is_file():
        compress(weights, policy_path, comp_pt, data=data_yaml, calib_images=64, round8=True)
    before = _cached(work / "eval_compressed.json", lambda: evaluate(comp_pt, data_yaml, split="test"))
    ft_dir = work / f"finetuned-e{args.finetune_epochs}"
    ft_pt = ft_dir / "weights" / "best.pt"
    if not ft_pt.is_file():
        finetune(FinetuneConfig(weights=str(comp_pt), data=str(data_yaml), epochs=args.finetune_epochs,
                                teacher="auto", val=False, seed=args.seed, out=str(ft_dir),
                                experiment="rsdet-compress-bench"))
    after = _cached(ft_dir / "eval_test.json", lambda: evaluate(ft_pt, data_yaml, split="test"))
    int8 = _cached(ft_dir / "export_int8.json", lambda: export(ft_pt, "onnx-int8", out=ft_dir / "int8.onnx",
                                                               data=data_yaml, split="test"))
    packed = _cached(ft_dir / "export_packed.json", lambda: export(ft_pt, "packed", out=ft_dir / "model.packed",
                                                                   data=data_yaml, split="test"))
    lat = benchmark([base_dir / "fp32.onnx", ft_dir / "int8.onnx"],
                    LatencyConfig(batches=(1, 8), runs=args.runs, warmup=5, devices=("cpu",)))
    ms = {(Path(r.artifact).name, r.batch): r.median_ms for r in lat}
    pt_bytes = weights.stat().st_size
    base = {"model": model, "variant": "fp32", "map50": fp32["map50"], "map50_95": fp32["map50_95"],
            "pt_mb": pt_bytes / 1e6, "onnx_mb": onnx["bytes"] / 1e6, "int8_onnx_mb": None, "packed_mb": None,
            "ort_b1_ms": ms[("fp32.onnx", 1)], "ort_b8_ms": ms[("fp32.onnx", 8)], "speedup_b1": 1.0,
            "speedup_b8": 1.0, "x_smaller": 1.0, "x_fewer_bops": 1.0, "x_fewer_flops": 1.0}
    comp = {"model": model, "variant": f"AJPQ + QAT {args.finetune_epochs} ep", "map50": after["map50"],
            "map50_95": after["map50_95"], "pt_mb": ft_pt.stat().st_size / 1e6, "onnx_mb": None,
            "int8_onnx_mb": int8["bytes"] / 1e6, "packed_mb": packed["bytes"] / 1e6,
            "ort_b1_ms": ms[("int8.onnx", 1)], "ort_b8_ms": ms[("int8.onnx", 8)],
            "speedup_b1": ms[("fp32.onnx", 1)] / ms[("int8.onnx", 1)],
            "speedup_b8": ms[("fp32.onnx", 8)] / ms[("int8.onnx", 8)],
            "x_smaller": onnx["bytes"] / packed["bytes"], "x_fewer_bops": ratios["bops"],
            "x_fewer_flops": ratios["flops"]}
    nofit = {**comp, "variant": "AJPQ, no fine-tune", "map50": before["map50"], "map50_95": before["map50_95"],
             "pt_mb": comp_pt.stat().st_size / 1e6, "int8_onnx_mb": None, "packed_mb": None, "ort_b1_ms": None,
             "ort_b8_ms": None, "speedup_b1": None, "speedup_b8": None}
    comp["targets"] = {"x_smaller": comp["x_smaller"] >= TARGETS["x_smaller"],
                       "map50_drop": fp32["map50"] - after["map50"] <= TARGETS["max_map50_drop"],
                       "ort_speedup": min(comp["speedup_b1"], comp["speedup_b8"]) >= TARGETS["ort_speedup"]}
    comp["policy"] = str(policy_path)
    command = "python " + shlex.join(["benchmarks/deploy_compare.py", *sys.argv[1:]])
    return [{**r, "command": command} for r in (base, nofit, comp)]


def _markdown(rows: list[dict], info: dict) -> str:
    cols = ["model", "variant", "map50", "map50_95", "pt_mb", "onnx_mb", "int8_onnx_mb", "packed_mb", "ort_b1_ms",
            "ort_b8_ms", "speedup_b1", "speedup_b8", "x_smaller", "x_fewer_bops", "x_fewer_flops"]
    table = format_table([{c: r.get(c) for c in cols} for r in rows])
    met = "\n".join(f"- {r['model']}: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in r["targets"].items())
                    for r in rows if "targets" in r)
    commands = "\n".join(sorted({f"- `RSDET_DATA=../shared/data {r['command']}`" for r in rows if r.get("command")}))
    return (f"# Deployment: fp32 vs AJPQ + QAT, airbus-aircraft test split\n\n{table}\n\n"
            "x_smaller: fp32 ONNX bytes / packed deploy file bytes. speed-up: onnxruntime CPU median latency, fp32 "
            "ONNX of the uncompressed model / int8 ONNX of the fine-tuned one (channels rounded to multiples of 8 "
            "before fine-tuning). "
            f"BOPs/FLOPs: cost model of the policy.\n\nTargets (>= 8x smaller, mAP50 drop <= 1 point, >= 2x faster "
            f"on ORT CPU):\n{met}\n\nMachine: {info}\n\nCommands:\n{commands}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="yolov8n,skynet")
    # size 0.12, not 0.125: a 4% margin. With channels rounded in the search the cost model matches the packed
    # file (SkyNet: policy 268,185 bytes, file 275,937 with its 5 KB header), but the 8x target is on the file.
    # flops 0.6, not 0.5: at 0.5 (multiples of 8) every YOLOv8n candidate scored mAP50 0 before fine-tuning, so
    # the reward was flat and the search could not steer; at 0.6 the best scored 0.33 on the reward chips
    ap.add_argument("--budget", default="size=0.12,flops=0.6", help="search budget, comma-separated")
    ap.add_argument("--channel-multiple", type=int, default=8, help="kept channel counts rounded in the search")
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--policy", help="use this policy instead of searching (one model only)")
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--runs", type=int, default=30, help="timed latency runs per row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.policy and "," in args.models:
        raise SystemExit("error: --policy is for one model; give --models MODEL")
    prep = load_config(REPO / "configs" / "airbus-prepare.yaml", PrepareConfig)
    data_yaml = Path(prep.out) / "data.yaml"
    rows = [r for m in args.models.split(",") for r in run(m, data_yaml, args)]
    old = json.loads((RESULTS / "deploy_compare.json").read_text()).get("rows", []) \
        if (RESULTS / "deploy_compare.json").is_file() else []
    done = {r["model"] for r in rows}
    rows = [r for r in old if r["model"] not in done] + rows
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "deploy_compare.json").write_text(json.dumps({"rows": rows, "machine": info}, indent=2))
    md = _markdown(rows, info)
    (RESULTS / "deploy_compare.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
