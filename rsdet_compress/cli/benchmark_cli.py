"""``rsdet-compress benchmark``: measured latency and throughput, baseline vs compressed, logged to MLflow."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from rsdet_compress.atomic import write_json
from rsdet_compress.cli import add_trust_weights
from rsdet_compress.cli.options import add_config_args
from rsdet_compress.errors import UserError

HELP = ("latency (median/p90) and throughput on PyTorch, onnxruntime and OpenVINO, CPU and CUDA; "
        "the first model is the baseline")
#: LatencyConfig fields whose flags are older than the field names
RENAMED = {"batches": "batch", "devices": "device"}


def add_benchmark(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.engine.latency import LatencyConfig
    p.add_argument("--weights", nargs="+", default=[], help="checkpoints / packed files run on PyTorch "
                   "(first = baseline)")
    p.add_argument("--onnx", nargs="+", default=[], help="ONNX files run on onnxruntime (first = the fp32 "
                   "reference for 'vs fp32 ONNX')")
    p.add_argument("--openvino", nargs="+", default=[], help="OpenVINO IR files (.xml) run on OpenVINO's CPU plugin")
    add_config_args(p, LatencyConfig, rename=RENAMED)
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-track", dest="track", action="store_false", help="do not log to MLflow")
    add_trust_weights(p)


def run_benchmark(args: argparse.Namespace) -> None:
    from rsdet_compress.config import make_config
    from rsdet_compress.engine.latency import (
        DEVICES,
        LatencyConfig,
        benchmark,
        format_rows,
        machine,
    )
    from rsdet_compress.runtime.openvino import require_openvino
    from rsdet_compress.runtime.profile import PROFILED, format_profile, profile
    from rsdet_compress.tracking.mlflow_tracker import Tracker
    artifacts = [*args.weights, *args.onnx, *args.openvino]
    if not artifacts:
        raise UserError("give at least one model: --weights FILE..., --onnx FILE... and/or --openvino FILE...")
    bad = [a for a in args.onnx if not a.lower().endswith(".onnx")]
    if bad:
        raise UserError(f"{bad[0]}: --onnx takes .onnx files")
    bad = [a for a in args.openvino if not a.lower().endswith(".xml")]
    if bad:
        raise UserError(f"{bad[0]}: --openvino takes OpenVINO IR .xml files")
    if args.openvino:
        require_openvino()
    opts = {f: getattr(args, f) for f in LatencyConfig.__dataclass_fields__}
    if args.devices is not None:
        opts["devices"] = tuple(d.strip() for d in args.devices if d.strip())
        if not opts["devices"] or any(d not in DEVICES for d in opts["devices"]):
            raise UserError(f"--device must be {', '.join(DEVICES)} or {','.join(DEVICES)}, "
                            f"got {','.join(args.devices)!r}")
    cfg = make_config(LatencyConfig, {}, "command line", **opts)
    for a in artifacts:  # every file checked before any timing starts
        if not Path(a).is_file():
            raise UserError(f"{a}: model file not found")
    tracker = Tracker(enabled=args.track).check()  # a dead store: one line in seconds, before any timing
    rows = benchmark(artifacts, cfg)
    profiles = [profile(a, cfg.batches[0], cfg.imgsz, cfg.runs, cfg.warmup, cfg.threads, cfg.seed)
                for a in artifacts if cfg.profile and Path(a).suffix.lower() in PROFILED]
    info = machine(cfg.threads)
    result = {"machine": info, "config": asdict(cfg), "rows": [asdict(r) for r in rows],
              **({"profiles": [asdict(p) for p in profiles]} if cfg.profile else {})}
    if args.out:  # the result first: logging may still fail, it must not cost the measurements
        write_json(args.out, result)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(format_rows(rows))
        print(f"{info['cpu']} ({info['cores']} cores), {info['threads']} threads, torch {info['torch']}, "
              f"onnxruntime {info['onnxruntime']}" + (f", {info['gpu']}" if "gpu" in info else "")
              + f"; {cfg.runs} runs after {cfg.warmup} warm-up", flush=True)
        for p in profiles:
            print("\n" + format_profile(p), flush=True)
    with tracker.run("benchmark", params={"models": ", ".join(Path(a).name for a in artifacts), **info,
                                          "batches": list(cfg.batches), "runs": cfg.runs, "warmup": cfg.warmup},
                     tags={"stage": "benchmark"}):
        index = {str(Path(a)): i for i, a in enumerate(artifacts)}  # two files may share a name (best.pt)
        for r in rows:
            key = f"m{index[r.artifact]}_{Path(r.artifact).stem}.{r.backend}.{r.device}.b{r.batch}"
            tracker.log_metrics({f"{key}.median_ms": r.median_ms, f"{key}.p90_ms": r.p90_ms,
                                 f"{key}.img_per_s": r.throughput, f"{key}.speedup": r.speedup,
                                 f"{key}.speedup_vs_fp32_onnx": r.speedup_vs_fp32_onnx})
        tracker.log_dict(result, "latency.json")
    if tracker.warning():
        print(tracker.warning(), file=sys.stderr)
