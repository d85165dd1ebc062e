"""``export`` sub-command: ONNX / int8 ONNX / packed artifacts, each verified by mAP."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsdet_compress.cli import add_trust_weights
from rsdet_compress.cli.options import ChoicesHelp
from rsdet_compress.errors import UserError

HELP = "deployable ONNX / int8 ONNX / packed file, checked by mAP against PyTorch"


def _formats() -> tuple[str, ...]:
    from rsdet_compress.export.exporter import FORMATS
    return FORMATS


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="float or compressed checkpoint (.pt)")
    p.add_argument("--format", required=True, metavar="FORMAT[,FORMAT...]",
                   help=ChoicesHelp("one or several comma-separated of: %(choices)s", _formats))
    p.add_argument("--out", help="artifact path (one format) or folder (several); default beside the weights")
    p.add_argument("--data", help="dataset YAML for the mAP check and calibration (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split the mAP check runs on")
    p.add_argument("--calib-images", type=int, default=64, help="training chips for int8 calibration")
    p.add_argument("--tolerance", type=float, help="allowed |mAP50 difference| (default: the format's own)")
    p.add_argument("--round8", action="store_true",
                   help="round kept channel counts up to a multiple of 8 (compressed checkpoints)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the newest the exporter writes)")
    p.add_argument("--batch", type=int, default=16, help="evaluation batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_trust_weights(p)


def _row(r: dict) -> str:
    mb = r["bytes"] / 1e6
    return (f"{r['format']:10} {Path(r['path']).name:28} {mb:8.2f} MB {r['ratio']:6.2f}x  "
            f"mAP50 {r['map50']:.4f} (torch {r['torch_map50']:.4f}, {r['dmap50']:+.4f}, tol {r['tolerance']:g})  "
            f"mAP50-95 {r['map50_95']:.4f} ({r['dmap50_95']:+.4f})  ok")


def run_export(args: argparse.Namespace) -> None:
    from rsdet_compress.export.exporter import FORMATS, default_out, export
    from rsdet_compress.export.onnx import DEFAULT_OPSET
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise UserError(f"--format is empty; give one or more of {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown export format {unknown[0]!r}; choose one of: {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise UserError(f"--format lists a format twice: {args.format}")
    out = Path(args.out) if args.out else None
    if out is not None and len(formats) > 1:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: several formats need --out to be a folder")
        out.mkdir(parents=True, exist_ok=True)
    reports = []
    if not args.json:
        print(f"{'format':10} {'file':28} {'size':>11} {'x fp32':>7}  mAP on {args.split}")
    for fmt in formats:
        target = out / default_out(args.weights, fmt, args.round8).name if out is not None and len(formats) > 1 \
            else out
        r = export(args.weights, fmt, out=target, data=args.data, split=args.split, calib_images=args.calib_images,
                   tolerance=args.tolerance, round8=args.round8,
                   opset=DEFAULT_OPSET if args.opset is None else args.opset,
                   batch=args.batch)
        reports.append(r)
        if not args.json:
            print(_row(r), flush=True)
    if args.json:
        print(json.dumps({"artifacts": reports}))
    else:
        print(f"fp32 = the same architecture's float tensors at 4 bytes; checked on {reports[0]['images']} "
              f"{args.split} images of {reports[0]['data']}")
