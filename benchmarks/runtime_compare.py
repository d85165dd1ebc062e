"""Runtime benchmark: our compressed detector against what a user gets without us, on both CPU runtimes.

    python benchmarks/runtime_compare.py --weights runs/baselines/yolov8n/weights/best.pt \
        --data runs/data/airbus/data.yaml --split test \
        --compressed "uniform w4a8p30=$RSDET_RUNS/bench/recovery/<name>/recovered-...-qat3-.../weights/last.pt" \
        --out runtime_airbus_yolov8n

Rows, all measured in one run (latency is only comparable within one run on an idle machine;
the load average at the start is written into the table):

* fp32 on onnxruntime and on OpenVINO (``export --format onnx`` / ``openvino``);
* the peers, int8 with each runtime's own defaults on the uncompressed model:
  onnxruntime ``quantize_static`` with its defaults (QDQ, per-tensor, int8 activations,
  MinMax) and NNCF for OpenVINO as ultralytics' ``export(format="openvino", int8=True)``
  runs it (``mixed`` preset, box decoding left float, NNCF's default overflow fix);
* each ``--compressed`` checkpoint exported as ``onnx-int8``, ``openvino`` (fp32 weights, our
  activation ranges as FakeQuantize), ``openvino-int8`` by NNCF and by onnxruntime (the
  onnx-int8 QDQ graph with our activation ranges, converted), with each
  ``--decode`` (boxes decoded in the graph, or on the host after it); ``--variants`` picks among
  these four exports;
* each ``--uniform w8a8p50``: the float weights uniformly pruned (kept channels rounded up to
  multiples of 8) and quantized, calibrated only, exported the same ways: how latency falls
  with pruning depth (its mAP is before recovery: a latency row, not an accuracy one).

Columns: mAP50 and AP50 per class on ``--split``, file MB, median and p90 ms at each batch,
speed-up against fp32 onnxruntime and against fp32 on the same runtime. Artifacts are kept
under $RSDET_RUNS/bench/runtime/<weights stem>/ and reused; latency is measured afresh.
The latency table of ``search --budget latency=...`` (runtime/latency_table.py) is checked in
the same run: its batch-1 prediction for each ``--compressed`` policy on each runtime, fitted
to anchor models timed again in this run, against the measured int8 file (onnx-int8 on
onnxruntime, openvino-int8 by NNCF on OpenVINO, boxes decoded in the graph).
With ``--profile``, each file's batch-1 pass is then broken down by operator and kernel
(``rsdet-compress benchmark --profile``): where the time goes, and which layers really ran int8.
Writes benchmarks/results/<--out>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import onnx
from recovery_compare import uniform_policy

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.calibration import calibration_set, image_batches
from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.engine.latency import LatencyConfig, benchmark, machine
from rsdet_compress.engine.scorer import evaluate
from rsdet_compress.export.exporter import export
from rsdet_compress.export.onnx import INPUT_NAME, set_meta
from rsdet_compress.export.openvino import float_scope, require_nncf, save_ir
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.latency_table import LatencyTable
from rsdet_compress.runtime.onnx_meta import META_KEY, read_meta
from rsdet_compress.runtime.openvino import bin_path, require_openvino
from rsdet_compress.runtime.profile import format_profile, profile
from rsdet_compress.search.latency_cost import LatencyCost
from rsdet_compress.settings import runs_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = runs_root() / "bench" / "runtime"
#: exports of each --compressed checkpoint: name -> (row label, runtime, export format, file suffix, OpenVINO quantizer,
#: full 8-bit weight codes: only where the CPU has VNNI or is ARM, see export.onnx.FULL_RANGE_WEIGHTS)
VARIANTS = {
    "onnx-int8": ("onnx-int8", "onnxruntime", "onnx-int8", ".int8.onnx", "nncf", False),
    "openvino": ("openvino, fp32 weights + our activation FQ", "openvino", "openvino", ".xml", "nncf", False),
    "openvino-int8": ("openvino-int8, NNCF", "openvino", "openvino-int8", ".int8.xml", "nncf", False),
    "openvino-int8-full": ("openvino-int8, NNCF, 8-bit weight codes", "openvino", "openvino-int8", ".full.int8.xml",
                           "nncf", True),
    "openvino-int8-ortq": ("openvino-int8, onnx-int8 QDQ (our ranges)", "openvino", "openvino-int8", ".ortq.int8.xml",
                           "onnxruntime", False),
    "openvino-int8-ortq-full": ("openvino-int8, onnx-int8 QDQ (our ranges), 8-bit weight codes", "openvino",
                                "openvino-int8", ".ortq.full.int8.xml", "onnxruntime", True),
}


def ort_default_int8(fp32_onnx: Path, out: Path, calib) -> Path:
    """onnxruntime's ``quantize_static`` with every default: what a user runs after reading its docs."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = (b.numpy() for b in image_batches(calib, 1))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {INPUT_NAME: x}

    if not out.is_file():
        quantize_static(str(fp32_onnx), str(out), Reader())
        proto = onnx.load(str(out))
        set_meta(proto, {**read_meta(onnx.load(str(fp32_onnx))), "precision": "int8 (onnxruntime defaults)"})
        onnx.save(proto, str(out))
    return out


def nncf_default_int8(fp32_onnx: Path, out: Path, calib) -> Path:
    """NNCF PTQ for OpenVINO as ultralytics' ``export(format="openvino", int8=True)`` calls it."""
    ov, nncf = require_openvino(), require_nncf()
    if not out.is_file():
        model = ov.convert_model(str(fp32_onnx))
        scope = float_scope(onnx.load(str(fp32_onnx)))
        images = [b.numpy() for b in image_batches(calib, 1)]
        model = nncf.quantize(model, nncf.Dataset(images), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(images), ignored_scope=nncf.IgnoredScope(patterns=scope, validate=False))
        meta = {**read_meta(onnx.load(str(fp32_onnx))), "precision": "int8 (NNCF defaults)", "runtime": "openvino"}
        model.set_rt_info(json.dumps(meta), [META_KEY])
        save_ir(model, out)
    return out


def work_dir(weights: str | Path) -> Path:
    """Where the artifacts made from ``weights`` are kept and reused."""
    weights = Path(weights)
    return WORK / weights.parent.parent.name / weights.stem


def compressed(args, work: Path) -> list[str]:
    """``--compressed`` NAME=PATH specs, then one per ``--uniform`` (compressed here, calibrated only, kept x8).

    A spec splits at its last ``=``: names such as ``ajpq @ size=0.125`` carry one.
    """
    specs = list(args.compressed)
    for spec in args.uniform:
        out = work / f"uniform-{spec}-round8.pt"
        if not out.is_file():
            compress(args.weights, uniform_policy(Workspace.from_weights(args.weights), spec), out, data=args.data,
                     calib_images=args.calib_images, round8=True)
        specs.append(f"uniform {spec} (calibrated, kept channels x8)={out}")
    return specs


def artifacts(args) -> list[tuple[str, str, Path]]:
    """(row name, runtime, file) of every row, fp32 files first (each runtime's speed-up reference)."""
    weights, data = Path(args.weights), Path(args.data)
    work = work_dir(weights)
    work.mkdir(parents=True, exist_ok=True)

    def made(src: Path, fmt: str, name: str, decode: str = "graph", quantizer: str = "nncf",
             full_range: bool = False) -> Path:
        out = work / name
        if not out.is_file():
            export(src, fmt, out=out, data=data, split="val", calib_images=args.calib_images, decode=decode,
                   ov_quantizer=quantizer, full_range_weights=full_range)
        return out
    fp32_onnx = made(weights, "onnx", "fp32.onnx")
    fp32_ov = made(weights, "openvino", "fp32.xml")
    calib = calibration_set(str(data), int(read_meta(onnx.load(str(fp32_onnx)))["imgsz"]), args.calib_images)
    rows = [("fp32", "onnxruntime", fp32_onnx), ("fp32", "openvino", fp32_ov),
            ("peer: int8, onnxruntime defaults", "onnxruntime", ort_default_int8(fp32_onnx, work / "ort-default.onnx",
                                                                                calib)),
            ("peer: int8, NNCF defaults", "openvino", nncf_default_int8(fp32_onnx, work / "nncf-default.xml", calib))]
    for spec in compressed(args, work):
        name, _, path = spec.rpartition("=")
        src = Path(path)
        for decode in args.decode.split(","):
            tag = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") + ("" if decode == "graph" else f"-{decode}")
            how = "" if decode == "graph" else f", {decode} decode"
            for v in args.variants.split(","):
                label, runtime, fmt, suffix, quantizer, full_range = VARIANTS[v]
                rows.append((f"{name}: {label}{how}", runtime,
                             made(src, fmt, tag + suffix, decode, quantizer, full_range)))
    return rows


def predictions(args, rows: list[dict], threads: int | None) -> list[dict]:
    """The latency table's batch-1 prediction of each compressed policy against its measured int8 file.

    The prediction's anchor models (``search.latency_cost``) are timed again in this run, so the
    check compares numbers from one run; the conv entries come from the machine's table.
    """
    ws = Workspace.from_weights(args.weights)
    measured = {"onnxruntime": ": onnx-int8", "openvino": ": openvino-int8, NNCF"}
    costs, out = {}, []
    for spec in compressed(args, work_dir(args.weights)):
        name, _, path = spec.rpartition("=")
        policy = load_detector(path)[0].policy
        for runtime, suffix in measured.items():
            got = next((r for r in rows if r["name"] == name + suffix), None)
            if got is None:
                continue
            if runtime not in costs:
                table = LatencyTable(runtime, threads)
                searched = dict(table.models)
                table.forget_models(ws.weights_fp)  # the anchors are timed again, in this run
                costs[runtime] = LatencyCost.measured(ws, table)
                # ... for this check only: later searches keep the anchors the machine's searches were fitted to
                table.models.update(searched)
                table.save()
            cost = costs[runtime]
            pred = cost(ws.view, policy).latency_ms
            meas = got["latency"]["1"]["median_ms"]
            out.append({"policy": name, "runtime": runtime, "predicted_ms": pred, "measured_ms": meas,
                        "error": pred / meas - 1, "table": str(cost.table.path), "anchors_ms": cost.anchors,
                        "fits": {("int8" if k else "fp32"): vars(f) for k, f in cost.fits.items()},
                        "branch_ms": {("int8" if k else "fp32"): v for k, v in cost.branch_ms.items()}
                        if cost.branches else {}})
    return out


def markdown(rows: list[dict], batches: tuple[int, ...], header: str) -> str:
    classes = list(rows[0]["ap50"])
    cols = ["model", "runtime", "mAP50", *[f"AP50 {c}" for c in classes], "MB"]
    for b in batches:
        cols += [f"b{b} median ms", f"b{b} p90 ms", f"b{b} x fp32 ORT", f"b{b} x fp32 same runtime"]
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["name"], r["runtime"], f"{r['map50']:.4f}", *[f"{r['ap50'][c]:.4f}" for c in classes],
                 f"{r['mb']:.2f}"]
        for b in batches:
            t = r["latency"][str(b)]
            cells += [f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", f"{t['vs_fp32_ort']:.2f}x",
                      f"{t['vs_fp32_same']:.2f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="the float checkpoint (fp32 and peer rows)")
    ap.add_argument("--data", required=True, help="dataset YAML")
    ap.add_argument("--split", default="test", help="split the mAP is measured on")
    ap.add_argument("--compressed", action="append", default=[], metavar="NAME=PATH",
                    help="our compressed checkpoint (after recover / QAT) to export for both runtimes")
    ap.add_argument("--uniform", action="append", default=[], metavar="w8a8p50",
                    help="also a uniform policy (recovery_compare's w<bits>a<bits>p<percent>) compressed from "
                         "--weights, calibrated only, kept channels rounded to multiples of 8: latency by depth")
    ap.add_argument("--calib-images", type=int, default=64, help="training chips for every int8 calibration")
    ap.add_argument("--decode", default="graph,host", help="box decoding of our exports, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"exports of each --compressed checkpoint, comma-separated from {','.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4,
                    help="passes over all rows, each timing runs/rounds calls of every row (see LatencyConfig)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both runtimes (default: all)")
    ap.add_argument("--profile", action="store_true", help="also each file's batch-1 time per operator and kernel")
    ap.add_argument("--out", default="runtime_compare")
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"--variants: unknown {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    batches = tuple(int(b) for b in args.batches.split(","))
    made = artifacts(args)
    load = os.getloadavg()
    cfg = LatencyConfig(batches=batches, runs=args.runs, warmup=5, rounds=args.rounds, threads=args.threads,
                        devices=("cpu",))
    timed = benchmark([p for _, _, p in made], cfg)
    info = machine(cfg.threads)
    by = {(r.artifact, r.batch): r for r in timed}
    fp32 = {rt: p for n, rt, p in made if n == "fp32"}
    rows = []
    for name, runtime, path in made:
        m = evaluate(path, args.data, split=args.split)
        size = path.stat().st_size + (bin_path(path).stat().st_size if path.suffix == ".xml" else 0)
        lat = {}
        for b in batches:
            r = by[(str(path), b)]
            lat[str(b)] = {"median_ms": r.median_ms, "p90_ms": r.p90_ms,
                           "vs_fp32_ort": by[(str(fp32["onnxruntime"]), b)].median_ms / r.median_ms,
                           "vs_fp32_same": by[(str(fp32[runtime]), b)].median_ms / r.median_ms}
        rows.append({"name": name, "runtime": runtime, "path": str(path), "map50": m["map50"],
                     "map50_95": m["map50_95"], "ap50": {c: (v or {}).get("ap50") for c, v in m["per_class"].items()},
                     "mb": size / 1e6, "latency": lat})
        print(f"{name:45} {runtime:11} mAP50 {m['map50']:.4f}  b1 {lat[str(batches[0])]['median_ms']:.2f} ms",
              flush=True)
    command = "python benchmarks/runtime_compare.py " + shlex.join(sys.argv[1:])
    header = (f"# Runtimes: fp32, peer int8 and ours on {args.split} of {args.data}\n\n"
              f"{info['cpu']} ({info['cores']} cores), {info['threads']} threads, onnxruntime {info['onnxruntime']}, "
              f"openvino {info.get('openvino')}; {args.runs} runs per row after 5 warm-up, in {cfg.rounds} passes "
              f"over all rows (a spell of load slows every row alike), all rows in one run; "
              f"load average at the start {load[0]:.2f} / {load[1]:.2f} (1 / 5 min)\n\nCommand: `{command}`")
    preds = []
    if 1 in batches and (args.compressed or args.uniform):
        try:  # the measured table above is what this run is for: a failing check must not cost it
            preds = predictions(args, rows, args.threads)
        except Exception as e:  # noqa: BLE001
            print(f"latency table check failed: {type(e).__name__}: {e}", file=sys.stderr)
        table = ["", "Latency table (search --budget latency): predicted vs measured, batch 1", "",
                 "| policy | runtime | predicted ms | measured ms | error |", "|---|---|---|---|---|"]
        table += [f"| {p['policy']} | {p['runtime']} | {p['predicted_ms']:.2f} | {p['measured_ms']:.2f} | "
                  f"{100 * p['error']:+.1f}% |" for p in preds]
        anchors = {p["runtime"]: p["anchors_ms"] for p in preds}
        table += ["", "Anchors the prediction is fitted to (whole models timed in this run, batch 1 ms): "
                  + "; ".join(f"{rt}: " + ", ".join(f"{k} {v:.2f}" for k, v in a.items()) for rt, a in anchors.items())
                  ] if anchors else []
        branches = {p["runtime"]: p["branch_ms"] for p in preds if p["branch_ms"]}
        table += ["", "Droppable branches (SkyNet's reorg bypass) charged whole, ms: "
                  + "; ".join(f"{rt}: " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()) for rt, b in branches.items())
                  ] if branches else []
    else:
        table = []
    profiles = [(name, profile(path, 1, runs=20, threads=args.threads)) for name, _, path in made] \
        if args.profile else []
    table += ["", "## Where the time goes: batch 1, per operator and kernel (runtime profilers)"] if profiles else []
    for name, prof in profiles:
        table += ["", f"### {name}", "", format_profile(prof, top=8)]
    text = markdown(rows, batches, header) + "\n".join(table) + ("\n" if table else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{args.out}.md", text)
    write_text(RESULTS / f"{args.out}.json", json.dumps({"machine": info, "load_average": load, "rows": rows,
                                                           "latency_table": preds, "command": command,
                                                           "profiles": [{"name": n, **asdict(p)} for n, p in profiles]},
                                                          indent=2, default=float))
    print(text)


if __name__ == "__main__":
    main()
