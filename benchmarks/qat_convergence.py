"""How much of the compressed detector's accuracy gap is fine-tune compute? (run where a GPU is lent)

On the CPU a QAT epoch of YOLOv8n takes ~10 min, so the deploy table stops at 3
epochs and a baseline trained for 45 min. This script answers, on one GPU, the
two questions the accuracy work depends on: where does the float baseline
converge, and how far does QAT recover a fixed ~8x compression policy with 3
epochs against many. Everything runs in one process:

    prepare -> train YOLOv8n (time cap) -> test mAP
    -> uniform policy (W bits, A bits, prune fraction, channels rounded to 8) -> compress (calibrated)
    -> test mAP (no fine-tune) -> QAT for each --qat-epochs (distilled from the float model) -> test mAP

    python benchmarks/qat_convergence.py --device 0 --train-hours 0.06 --qat-epochs 3,15 --out runs/qat-gpu
    python benchmarks/qat_convergence.py --tiny      # CPU smoke test of the whole chain (a minute)

Writes ``<out>/qat_convergence.json`` and ``.md`` (copied to benchmarks/results/ by hand with the command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
import ultralytics.engine.trainer as ultralytics_trainer

from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.config import load_config
from rsdet_compress.data.prepare import PrepareConfig, prepare
from rsdet_compress.engine.finetune import FinetuneConfig, finetune
from rsdet_compress.engine.scorer import evaluate
from rsdet_compress.engine.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
# fp32 on the GPU as on the CPU (fake quantization under fp16 autocast would be another experiment), and
# ultralytics' AMP check would try to download YOLO weights, which nothing here may do.
ultralytics_trainer.check_amp = lambda model: False


def _score(weights: Path, data: Path, device: str) -> dict:
    r = evaluate(weights, data, split="test", device=device)
    return {"map50": round(r["map50"], 4), "map50_95": round(r["map50_95"], 4)}


def _policy(weights: Path, wbits: int, abits: int, prune: float) -> Policy:
    view = Workspace.from_weights(weights).view
    return Policy(detector=view.detector, imgsz=view.imgsz, weights=Workspace.from_weights(weights).weights_fp,
                  criterion="l1", groups={g: {"keep": round(1.0 - prune, 6)} for g in view.groups},
                  layers={n: {"weight_bits": wbits, "act_bits": abits} for n in view.quantizable},
                  blocks={b.name: "keep" for b in view.blocks})


def _ratios(result: dict) -> dict:
    """Float cost over compressed cost, from the policy actually applied (after channel rounding)."""
    view = result["workspace"].view
    full, comp = estimate(view), estimate(view, result["policy"])
    return {k: round(getattr(full, k) / max(getattr(comp, k), 1e-9), 3) for k in ("size_bytes", "flops", "bops")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="airbus-aircraft", help="raw airbus folder (or a pre-scaled copy)")
    ap.add_argument("--rescale", type=float, default=0.5, help="1.0 when --src is already at half resolution")
    ap.add_argument("--device", default="0")
    ap.add_argument("--train-hours", type=float, default=0.06)
    ap.add_argument("--train-epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--qat-epochs", default="3,15")
    ap.add_argument("--qat-hours", type=float, default=None, help="cap on the longest QAT run")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--prune", type=float, default=0.25)
    ap.add_argument("--out", default="runs/qat-gpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 1 epoch each, 5%% of the chips")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fraction = 0.05 if args.tiny else 1.0
    if args.tiny:
        args.device, args.train_epochs, args.train_hours, args.qat_epochs, args.batch = "cpu", 1, None, "1", 8
    rows, t_all = [], time.time()

    pcfg = load_config(REPO / "configs" / "airbus-prepare.yaml", PrepareConfig, src=args.src,
                       out=str(out / "data"), rescale=args.rescale)
    data = out / "data" / "data.yaml"
    if not data.is_file():
        print(prepare(pcfg, progress=False).format(), flush=True)

    tcfg = load_config(REPO / "configs" / "airbus-yolov8n.yaml", TrainConfig, data=str(data),
                       epochs=args.train_epochs, time=args.train_hours, batch=args.batch, device=args.device,
                       workers=args.workers, out=str(out / "float"), fraction=fraction)
    tcfg = dataclasses.replace(tcfg, track=False, verbose=False, time=args.train_hours)
    t0 = time.time()
    tr = train(tcfg)
    float_w = Path(tr["weights"])
    rows.append({"variant": "fp32", "epochs": tr["epochs_run"], "minutes": round((time.time() - t0) / 60, 2),
                 **_score(float_w, data, args.device)})
    print(rows[-1], flush=True)

    comp_w = out / "compressed.pt"
    ratios = _ratios(compress(float_w, _policy(float_w, args.wbits, args.abits, args.prune), comp_w, data=data,
                              calib_images=64, round8=True))
    rows.append({"variant": f"W{args.wbits}A{args.abits} prune {args.prune} (round8), no fine-tune",
                 "epochs": 0, **ratios, **_score(comp_w, data, args.device)})
    print(rows[-1], flush=True)

    epochs = [int(e) for e in args.qat_epochs.split(",")]
    for e in epochs:
        t0 = time.time()
        fcfg = load_config(REPO / "configs" / "demo-finetune.yaml", FinetuneConfig, weights=str(comp_w),
                           data=str(data), epochs=e, device=args.device, out=str(out / f"qat{e}"),
                           fraction=fraction)
        fcfg = dataclasses.replace(fcfg, track=False, batch=args.batch, mosaic=0.5, close_mosaic=min(2, e),
                                   time=args.qat_hours if e == max(epochs) else None)
        r = finetune(fcfg)
        rows.append({"variant": f"+ QAT {e} ep (distilled)", "epochs": r["epochs_run"],
                     "minutes": round((time.time() - t0) / 60, 2), **ratios,
                     **_score(Path(r["weights"]), data, args.device)})
        print(rows[-1], flush=True)

    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "python": platform.python_version(), "minutes_total": round((time.time() - t_all) / 60, 2),
           "command": " ".join(sys.argv)}
    (out / "qat_convergence.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["| variant | epochs | train min | mAP50 (test) | mAP50-95 (test) | size x | FLOPs x |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('epochs', '')} | {r.get('minutes', '')} | {r['map50']:.4f} | "
                     f"{r['map50_95']:.4f} | {r.get('size_bytes', 1)} | {r.get('flops', 1)} |")
    md = "\n".join(lines) + f"\n\n{json.dumps(env)}\n"
    (out / "qat_convergence.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
