"""SkyNet's reorg in the exported graph: pixel_unshuffle's 6-D Transpose against SpaceToDepth + Gather.

    python benchmarks/reorg_export.py --weights runs/baselines/skynet/weights/best.pt \
        --compressed "uniform w4a8p40=$RSDET_RUNS/bench/recovery/<name>/.../weights/last.pt" --out reorg_export

Each checkpoint is exported both ways (``export_module(space_to_depth=...)``) as fp32 ONNX, as
onnxruntime int8 (``quantize_int8`` on random calibration chips: a latency row, not an accuracy
one) and as fp32 and NNCF int8 OpenVINO IR; every file is timed by ``rsdet-compress benchmark``
in one run (interleaved passes), batch 1. The exporter picks per runtime the form this table
shows faster. Writes benchmarks/results/<--out>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rsdet_compress.atomic import write_text  # noqa: E402
from rsdet_compress.engine.latency import LatencyConfig, benchmark  # noqa: E402
from rsdet_compress.export.onnx import export_module, quantize_int8  # noqa: E402
from rsdet_compress.export.openvino import export_openvino  # noqa: E402
from rsdet_compress.machine import cpu_label  # noqa: E402
from rsdet_compress.runtime.checkpoint import load_detector  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
FORMS = {"transpose": False, "space-to-depth": True}


def exports(name: str, weights: Path, work: Path, calib: list[torch.Tensor]) -> list[tuple[str, str, str, Path]]:
    """(model, form, file kind, path) for each export of ``weights``."""
    model, meta = load_detector(weights)
    imgsz = int(meta.get("imgsz") or 416)
    out = []
    for form, s2d in FORMS.items():
        stem = work / f"{weights.parent.parent.name}-{form}"
        fp32 = export_module(model, meta, stem.with_suffix(".onnx"), imgsz, act_qdq=False, space_to_depth=s2d)
        out += [(name, form, "onnx fp32", fp32),
                (name, form, "onnx int8", quantize_int8(fp32, stem.with_suffix(".int8.onnx"), calib))]
        out += [(name, form, "openvino fp32",
                 export_openvino(model, meta, stem.with_suffix(".xml"), imgsz, space_to_depth=s2d)),
                (name, form, "openvino int8 (NNCF)", export_openvino(model, meta, stem.with_suffix(".int8.xml"), imgsz,
                                                                     calib_batches=calib, space_to_depth=s2d))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="float SkyNet checkpoint")
    ap.add_argument("--compressed", action="append", default=[], help="LABEL=checkpoint (repeatable)")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="reorg_export")
    args = ap.parse_args()
    work = Path(os.environ.get("RSDET_RUNS", REPO / "runs")) / "bench" / "reorg"
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.rand(4, 3, 416, 416, generator=gen) for _ in range(4)]
    files = exports("fp32", args.weights, work, calib)
    for item in args.compressed:
        label, _, path = item.partition("=")
        files += exports(label, Path(path), work, calib)
    load = os.getloadavg()
    rows = benchmark([str(f[3]) for f in files], LatencyConfig(batches=(1,), runs=args.runs, rounds=args.rounds,
                                                               devices=("cpu",)))
    by_file = {r.artifact: r for r in rows}
    table = [{"model": m, "form": form, "file": kind, "median_ms": by_file[str(p)].median_ms,
              "p90_ms": by_file[str(p)].p90_ms} for m, form, kind, p in files if str(p) in by_file]
    lines = ["# SkyNet's reorg in the exported graph, batch 1\n",
             f"{cpu_label()}; load average at start {load[0]:.2f}; {args.runs} runs per row in {args.rounds} "
             "interleaved passes.\n", "Command: `python benchmarks/reorg_export.py " + shlex.join(sys.argv[1:]) + "`\n",
             "| model | file | Transpose ms (p90) | SpaceToDepth + Gather ms (p90) | ratio |", "|---|---|---|---|---|"]
    for m, kind in dict.fromkeys((t["model"], t["file"]) for t in table):
        a, b = (next(t for t in table if (t["model"], t["file"], t["form"]) == (m, kind, f)) for f in FORMS)
        lines.append(f"| {m} | {kind} | {a['median_ms']:.2f} ({a['p90_ms']:.2f}) | {b['median_ms']:.2f} "
                     f"({b['p90_ms']:.2f}) | {b['median_ms'] / a['median_ms']:.2f}x |")
    write_text(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    write_text(RESULTS / f"{args.out}.json", json.dumps({"machine": cpu_label(), "load_average": load,
                                                         "rows": table}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
