"""The speed issue's one table, assembled from the runtime_compare.py runs that measured its rows.

    python benchmarks/runtime_table.py [--config benchmarks/runtime_table.yaml] [--out runtime_table]

Each ``runtime_compare.py`` run times fp32 (onnxruntime, OpenVINO), the peers' int8 and our
compressed exports in one run on an idle machine; latency compares only inside such a run, so
this script never mixes rows of two files: each of our rows is set against the fp32 and peer
rows of its own file. Per detector (the config lists its files), one table: fp32, peers and ours
with mAP50, its difference to fp32, batch-1 and batch-8 median / p90 ms, speed-up against fp32
onnxruntime and against the NNCF/OpenVINO int8 peer, and the latency table's prediction error
where the run checked it; then whether the target was met (the best of our rows that meets the
accuracy bound, else the most accurate one, with how far it is) and the config's notes on the
detector (what limits a bound it misses, with the results file that measured it). Writes
benchmarks/results/<--out>.md.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from rsdet_compress.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def latency(row: dict, batch: int) -> dict | None:
    return row["latency"].get(str(batch))


def rows_of(run: dict, stem: str, peer_name: str) -> list[dict]:
    """A run's rows with the ratios this table shows, all taken within the run."""
    fp32 = next(r for r in run["rows"] if r["name"] == "fp32" and r["runtime"] == "onnxruntime")
    peer = next((r for r in run["rows"] if r["name"] == peer_name), None)
    fp32_ms = (latency(fp32, 1) or {}).get("median_ms")
    peer_ms = (latency(peer, 1) or {}).get("median_ms") if peer else None
    out = []
    for r in run["rows"]:
        b1_ms = (latency(r, 1) or {}).get("median_ms")
        ours = r["name"] != "fp32" and not r["name"].startswith("peer")
        # the run checked its prediction against one export per policy and runtime: the row timed at that value
        pred = next((p for p in run.get("latency_table", []) if ours and p["runtime"] == r["runtime"]
                     and r["name"].startswith(p["policy"] + ":") and p["measured_ms"] == b1_ms), None)
        out.append({**r, "stem": stem, "ours": ours, "dpoints": 100 * (r["map50"] - fp32["map50"]),
                    "vs_fp32_ort": fp32_ms / b1_ms if b1_ms and fp32_ms else None,
                    "vs_peer": peer_ms / b1_ms if b1_ms and peer_ms else None,
                    "prediction_error": pred["error"] if pred else None})
    return out


def meets(row: dict, target: dict) -> dict[str, bool]:
    """Which of the target's three bounds a row of ours meets."""
    return {"vs_peer": (row["vs_peer"] or 0) >= target["vs_peer"],
            "vs_fp32_ort": (row["vs_fp32_ort"] or 0) >= target["vs_fp32_ort"],
            "points": row["dpoints"] >= -target["points"]}


def verdict(rows: list[dict], target: dict) -> str:
    """The best of our rows: the fastest against the peer among those within the accuracy bound, else the most
    accurate; and whether it meets the target, with each bound's measured number."""
    ours = [r for r in rows if r["ours"]]
    if not ours:
        return "no compressed row measured yet"
    accurate = [r for r in ours if meets(r, target)["points"]]
    best = max(accurate, key=lambda r: r["vs_peer"] or 0) if accurate else max(ours, key=lambda r: r["dpoints"])
    ok = meets(best, target)
    parts = [f"{fmt(best['vs_peer'], '.2f', 'x')} the peer (target {target['vs_peer']:g}x)",
             f"{fmt(best['vs_fp32_ort'], '.2f', 'x')} fp32 onnxruntime (target {target['vs_fp32_ort']:g}x)",
             f"{best['dpoints']:+.2f} mAP50 points (target >= -{target['points']:g})"]
    missed = [k for k, v in ok.items() if not v]
    state = "met" if not missed else "missed (" + ", ".join(missed) + ")"
    return f"target {state}: {best['name']} on {best['runtime']} ({best['stem']}): " + ", ".join(parts)


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def section(title: str, stems: list[str], cfg: dict, notes: Sequence[str] = ()) -> list[str]:
    """A detector's table from its runs, the verdict, then the config's notes on it (what limits a missed bound)."""
    out, rows, missing = [f"## {title}", ""], [], []
    for stem in stems:
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            missing.append(stem)
            continue
        run = json.loads(path.read_text())
        rows += rows_of(run, stem, cfg["peer"])
        out.append(f"- {stem}: {run['machine']['cpu']}, {run['machine']['threads']} threads, load average at the "
                   f"start {run['load_average'][0]:.2f}; `{run['command']}`")
    if not rows:
        return out + ["Not measured yet: " + ", ".join(missing), ""]
    cols = ["run", "model", "runtime", "mAP50", "Δ points vs fp32", "b1 median ms", "b1 p90 ms", "b8 median ms",
            "b8 p90 ms", "b1 x fp32 ORT", "b1 x NNCF peer", "latency table error"]
    out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        b1, b8 = latency(r, 1) or {}, latency(r, 8) or {}
        out.append("| " + " | ".join([
            r["stem"], r["name"], r["runtime"], f"{r['map50']:.4f}", f"{r['dpoints']:+.2f}",
            fmt(b1.get("median_ms"), ".2f"), fmt(b1.get("p90_ms"), ".2f"), fmt(b8.get("median_ms"), ".2f"),
            fmt(b8.get("p90_ms"), ".2f"), fmt(r["vs_fp32_ort"], ".2f", "x"), fmt(r["vs_peer"], ".2f", "x"),
            fmt(None if r["prediction_error"] is None else 100 * r["prediction_error"], "+.1f", "%")]) + " |")
    out += ["", "- " + verdict(rows, cfg["target"])]
    out += [f"- not measured yet: {', '.join(missing)}"] if missing else []
    out += [f"- {n}" for n in notes]
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "runtime_table.yaml"))
    ap.add_argument("--out", default="runtime_table", help="results file stem in benchmarks/results/")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    t = cfg["target"]
    lines = ["# Speed: ours against fp32 and the peers' int8, per detector, batch 1 and 8", "",
             f"Target: ours >= {t['vs_peer']:g}x the NNCF/OpenVINO int8 peer and >= {t['vs_fp32_ort']:g}x fp32 "
             f"onnxruntime at batch 1, within {t['points']:g} mAP50 point of fp32. Every ratio is taken inside one "
             "runtime_compare.py run (one idle machine, all rows interleaved).",
             f"`python benchmarks/runtime_table.py --config {Path(args.config).relative_to(HERE.parent)}`", ""]
    for spec in cfg["detectors"]:
        lines += section(spec["title"], spec["stems"], cfg, spec.get("notes", []))
    write_text(RESULTS / f"{args.out}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
