"""Print the demo's summary from the JSON files scripts/demo.sh wrote: size, BOPs, mAP before/after, speed-up.

    python scripts/demo_summary.py runs/demo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        sys.exit(f"error: {path} not found: run scripts/demo.sh to the end first")
    return json.loads(path.read_text())


def _latency(rows: list[dict], name: str, batch: int) -> dict | None:
    return next((r for r in rows if Path(r["artifact"]).name == name and r["batch"] == batch
                 and r["backend"] == "onnxruntime" and r["device"] == "cpu"), None)


def main(folder: str = "runs/demo") -> int:
    from rsdet_compress.compress.compressor import Workspace
    from rsdet_compress.compress.cost import estimate
    from rsdet_compress.compress.policy import Policy
    d = Path(folder)
    fp32, comp, ft = (_load(d, f"eval_{k}.json") for k in ("fp32", "compressed", "finetuned"))
    onnx = _load(d, "export_fp32.json")["artifacts"][0]
    int8 = _load(d, "export_int8.json")["artifacts"][0]
    packed = _load(d, "export_packed.json")["artifacts"][0]
    lat = _load(d, "latency.json")["rows"]
    ws = Workspace.from_weights(d / "yolov8n" / "weights" / "best.pt")
    policy = ws.resolve(Policy.load(d / "policy.json"))
    ratios = estimate(ws.view, policy).ratios(estimate(ws.view))
    preds = _load(d / "predict", "detections.json")
    float_pt = (d / "yolov8n" / "weights" / "best.pt").stat().st_size

    print("rsdet-compress demo: YOLOv8n on airbus-aircraft (small set), held-out test split")
    print(f"{'':28}{'mAP50':>8}{'mAP50-95':>10}")
    for label, r in (("float (fp32)", fp32), ("AJPQ policy, calibrated", comp), ("after QAT fine-tune", ft)):
        print(f"{label:28}{r['map50']:8.4f}{r['map50_95']:10.4f}")
    print(f"{'int8 ONNX':28}{int8['map50']:8.4f}{int8['map50_95']:10.4f}")
    print(f"policy: {ratios['size']:.1f}x smaller weights, {ratios['bops']:.1f}x fewer BOPs, "
          f"{ratios['flops']:.2f}x fewer FLOPs (cost model)")
    print(f"files: float .pt {float_pt / 1e6:.2f} MB | fp32 ONNX {onnx['bytes'] / 1e6:.2f} MB | "
          f"int8 ONNX {int8['bytes'] / 1e6:.2f} MB | packed {packed['bytes'] / 1e6:.2f} MB "
          f"({onnx['bytes'] / packed['bytes']:.1f}x smaller than fp32 ONNX)")
    for b in (1, 8):
        a, c = _latency(lat, "fp32.onnx", b), _latency(lat, "compressed.int8.onnx", b)
        if a and c:
            print(f"onnxruntime CPU batch {b}: fp32 {a['median_ms']:.1f} ms -> int8 {c['median_ms']:.1f} ms "
                  f"(median), {a['median_ms'] / c['median_ms']:.2f}x faster")
    print(f"predict: {len(preds['annotations'])} aircraft on {preds['images'][0]['file_name']} "
          f"-> {d / 'predict'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
