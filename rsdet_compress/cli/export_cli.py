"""``export`` sub-command: ONNX / int8 ONNX / packed artifacts, each verified by mAP."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsdet_compress.cli import add_trust_weights
from rsdet_compress.cli.options import ChoicesHelp, add_config_args
from rsdet_compress.errors import UserError

HELP = "deployable ONNX / int8 ONNX / packed file, checked by mAP against PyTorch"


def _formats() -> tuple[str, ...]:
    from rsdet_compress.export.exporter import FORMATS
    return FORMATS


def add_export(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.data.split import SPLITS
    from rsdet_compress.export.exporter import ExportOptions
    from rsdet_compress.export.openvino import OV_QUANTIZERS
    from rsdet_compress.runtime.decode import DECODES
    p.add_argument("--weights", required=True, help="float or compressed checkpoint (.pt)")
    p.add_argument("--format", required=True, metavar="FORMAT[,FORMAT...]",
                   help=ChoicesHelp("one or several comma-separated of: %(choices)s", _formats))
    p.add_argument("--out", help="artifact path (one format) or folder (several); default beside the weights")
    add_config_args(p, ExportOptions, extra={"split": {"choices": SPLITS}, "decode": {"choices": DECODES},
                                                  "ov_quantizer": {"choices": OV_QUANTIZERS}})
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_trust_weights(p)


def _row(r: dict) -> str:
    mb = r["bytes"] / 1e6
    return (f"{r['format']:13} {Path(r['path']).name:28} {mb:8.2f} MB {r['ratio']:6.2f}x  "
            f"mAP50 {r['map50']:.4f} (torch {r['torch_map50']:.4f}, {r['dmap50']:+.4f}, tol {r['tolerance']:g})  "
            f"mAP50-95 {r['map50_95']:.4f} ({r['dmap50_95']:+.4f})  ok")


def run_export(args: argparse.Namespace) -> None:
    from dataclasses import asdict, fields

    from rsdet_compress.config import make_config
    from rsdet_compress.export.exporter import (
        FORMATS,
        ExportOptions,
        check_format,
        default_out,
        export,
    )
    opts = asdict(make_config(ExportOptions, {}, "command line",
                              **{f.name: getattr(args, f.name) for f in fields(ExportOptions)}))
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise UserError(f"--format is empty; give one or more of {', '.join(FORMATS)}")
    for fmt in formats:  # unknown, or its optional package missing: said before the first artifact is made
        check_format(fmt)
    if len(set(formats)) != len(formats):
        raise UserError(f"--format lists a format twice: {args.format}")
    out = Path(args.out) if args.out else None
    if out is not None and len(formats) > 1:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: several formats need --out to be a folder")
        out.mkdir(parents=True, exist_ok=True)
    reports = []
    if not args.json:
        print(f"{'format':13} {'file':28} {'size':>11} {'x fp32':>7}  mAP on {opts['split']}")
    for fmt in formats:
        target = out / default_out(args.weights, fmt, opts["round8"]).name if out is not None and len(formats) > 1 \
            else out
        r = export(args.weights, fmt, out=target, **opts)
        reports.append(r)
        if not args.json:
            print(_row(r), flush=True)
    if args.json:
        print(json.dumps({"artifacts": reports}))
    else:
        print(f"fp32 = the same architecture's float tensors at 4 bytes; checked on {reports[0]['images']} "
              f"{opts['split']} images of {reports[0]['data']}")
