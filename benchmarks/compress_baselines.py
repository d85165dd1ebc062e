"""Compression-core benchmark: baseline policies on the trained detectors, no fine-tuning.

    python benchmarks/compress_baselines.py                     # yolov8n and skynet
    python benchmarks/compress_baselines.py --models yolov8n --calib-images 32

Starts from runs/baselines/<model>/weights/best.pt (benchmarks/train_baselines.py)
and the prepared airbus split (configs/airbus-prepare.yaml). Every policy is
applied to the float weights, BN statistics and activation ranges are
recalibrated on ``--calib-images`` training chips (never the test split), then
the held-out test split is scored with pycocotools. Size, params, FLOPs and
BOPs come from the exact cost model (``compress.cost.estimate``).

Writes benchmarks/results/compress_baselines.md and .json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from rsdet_compress.compress.apply import apply_policy
from rsdet_compress.compress.baselines import magnitude_pruning, two_stage, uniform_bits
from rsdet_compress.compress.calibration import calibrate, calibration_set
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.cost import estimate
from rsdet_compress.config import load_config
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.data.prepare import PrepareConfig
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.engine.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

#: (label, policy factory or None for the float model); the issue's baseline set.
POLICIES = [
    ("fp32", None),
    ("uniform 8-bit (w8a8)", lambda v: uniform_bits(v, 8)),
    ("uniform 6-bit (w6a6)", lambda v: uniform_bits(v, 6)),
    ("uniform 4-bit (w4a4)", lambda v: uniform_bits(v, 4)),
    ("magnitude pruning 30%", lambda v: magnitude_pruning(v, 0.3)),
    ("magnitude pruning 50%", lambda v: magnitude_pruning(v, 0.5)),
    ("two-stage 50% + 4-bit", lambda v: two_stage(v, 0.5, 4)),
]


def _apply_ms(ws: Workspace, policy, repeats: int = 5) -> float:
    """Median wall time of policy -> physically compressed model (no calibration), in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        apply_policy(ws.view, policy)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_model(model: str, data_yaml: Path, split: str, calib_images: int) -> list[dict]:
    cfg = load_config(REPO / "configs" / f"airbus-{model}.yaml", TrainConfig)
    weights = Path(cfg.out) / "weights" / "best.pt"
    if not weights.is_file():
        raise SystemExit(f"error: {weights}: no trained baseline; run benchmarks/train_baselines.py first")
    ws = Workspace.from_weights(weights)
    data = load_data_config(data_yaml)
    imgsz = ws.view.imgsz
    calib = calibration_set(str(data_yaml), imgsz, calib_images)
    evaluator = Evaluator(EvalSet.from_coco(data.split_coco(split), data.split_images(split), imgsz))
    ref = estimate(ws.view)
    rows = []
    for label, factory in POLICIES:
        other = None  # mAP50 with the other BN choice (recalibrated vs kept from training)
        if factory is None:
            resolved, compressed, apply_ms, calib_s, cost, bn = None, ws.view.model, 0.0, 0.0, ref, None
        else:
            resolved = ws.resolve(factory(ws.view))
            apply_ms = _apply_ms(ws, resolved)
            bn = resolved.changes_structure(ws.view)  # the library's default (Workspace.apply)
            compressed = apply_policy(ws.view, resolved)
            t0 = time.perf_counter()
            calibrate(compressed, calib, bn=bn)
            calib_s = time.perf_counter() - t0
            cost = estimate(ws.view, resolved)
            alt = apply_policy(ws.view, resolved)
            calibrate(alt, calib, bn=not bn)
            other = evaluator(alt.eval())["map50"]
        m = evaluator(compressed.eval())
        ratios = cost.ratios(ref)
        rows.append({"model": model, "policy": label, "map50": m["map50"], "map50_95": m["map50_95"],
                     "bn": None if bn is None else ("recal" if bn else "kept"),
                     "map50_other_bn": other, "size_mb": cost.size_mb, "size_x": ratios["size"],
                     "params": cost.params, "gflops": cost.gflops, "gbops": cost.gbops, "bops_x": ratios["bops"],
                     "apply_ms": round(apply_ms, 1), "calib_s": round(calib_s, 2)})
        print(f"{model:8s} {label:24s} mAP50 {m['map50']:.4f} mAP50-95 {m['map50_95']:.4f} "
              f"size {cost.size_mb:.3f} MB ({ratios['size']:.2f}x) GBOPs {cost.gbops:.1f} apply {apply_ms:.0f} ms",
              flush=True)
    return rows


def _markdown(rows: list[dict], command: str, split: str, calib_images: int) -> str:
    head = ("| model | policy | mAP50 | mAP50-95 | BN | mAP50 other BN | size MB | x smaller | params | GFLOPs "
            "| GBOPs | x fewer BOPs | apply ms | calib s |\n|" + "---|" * 14 + "\n")
    body = "".join(
        f"| {r['model']} | {r['policy']} | {r['map50']:.4f} | {r['map50_95']:.4f} | "
        f"{r['bn'] or ''} | {'' if r['map50_other_bn'] is None else format(r['map50_other_bn'], '.4f')} | "
        f"{r['size_mb']:.3f} | {r['size_x']:.2f} | {r['params']:,} | {r['gflops']:.2f} | {r['gbops']:.1f} | "
        f"{r['bops_x']:.1f} | {r['apply_ms']:.0f} | {r['calib_s']:.1f} |\n" for r in rows)
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"{platform.processor() or platform.machine()}. ")
    notes = (f"Split: airbus `{split}` (held-out scenes). No fine-tuning. Activation ranges calibrated on "
             f"{calib_images} training chips; BN statistics re-estimated on the same chips when the policy prunes "
             "(`BN` = recal) and kept from training when it only quantizes (`BN` = kept), the library's default; "
             "`mAP50 other BN` is the other choice. `apply ms` = median of 5 runs of policy -> physically "
             "pruned, fake-quantized model (weights shared with the float model, as the search does); `calib s` "
             "= BN recalibration + activation-range calibration. Size = weight storage of the cost model "
             "(kept weights x bits + fp32 scale per quantized channel + folded BN/bias); BOPs = MACs x weight "
             "bits x activation bits.")
    return (f"# Compression baselines: airbus-aircraft, no fine-tuning\n\n{head}{body}\n{notes}\n\n{env}\n\n"
            f"Command: `{command}`\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="yolov8n,skynet")
    ap.add_argument("--split", default="test", help="reporting split (never used for calibration)")
    ap.add_argument("--calib-images", type=int, default=64, help="training chips for BN/activation calibration")
    args = ap.parse_args()
    prep = load_config(REPO / "configs" / "airbus-prepare.yaml", PrepareConfig)
    data_yaml = Path(prep.out) / "data.yaml"
    if not data_yaml.is_file():
        raise SystemExit(f"error: {data_yaml}: not prepared; run benchmarks/train_baselines.py first")
    torch.manual_seed(0)
    rows = [r for model in args.models.split(",") for r in bench_model(model, data_yaml, args.split,
                                                                         args.calib_images)]
    command = "python " + shlex.join(["benchmarks/compress_baselines.py", *sys.argv[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compress_baselines.json").write_text(json.dumps(rows, indent=2))
    md = _markdown(rows, command, args.split, args.calib_images)
    (RESULTS / "compress_baselines.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
