"""The speed table: ratios taken inside one run, and the target judged on each of its three bounds."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TABLE_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_table.py"
PEER = "peer: int8, NNCF defaults"
TARGET = {"vs_peer": 1.5, "vs_fp32_ort": 3.0, "points": 1.0}


@pytest.fixture
def table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_runtime_table", TABLE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def row(name, runtime, map50, b1_ms):
    return {"name": name, "runtime": runtime, "map50": map50, "ap50": {},
            "latency": {"1": {"median_ms": b1_ms, "p90_ms": b1_ms * 1.1}}}


def run(ours_map50, ours_ms, fp32_ms=60.0, peer_ms=24.0):
    return {"machine": {"cpu": "test cpu", "threads": 2}, "load_average": [0.1, 0.1, 0.1], "command": "x",
            "rows": [row("fp32", "onnxruntime", 0.50, fp32_ms), row("fp32", "openvino", 0.50, 48.0),
                     row(PEER, "openvino", 0.49, peer_ms),
                     row("ajpq @ latency=0.3 + recover: openvino-int8, NNCF", "openvino", ours_map50, ours_ms)],
            "latency_table": [{"policy": "ajpq @ latency=0.3 + recover", "runtime": "openvino",
                               "predicted_ms": ours_ms * 1.1, "measured_ms": ours_ms, "error": 0.1}]}


@pytest.mark.parametrize("ours_map50, ours_ms, state", [
    (0.495, 15.0, "target met"),                        # 1.6x peer, 4x fp32 ORT, -0.5 points
    (0.485, 15.0, "target missed (points)"),            # -1.5 points
    (0.495, 17.0, "target missed (vs_peer)"),           # 1.41x the peer
])
def test_verdict_judges_each_bound(table, ours_map50, ours_ms, state):
    rows = table.rows_of(run(ours_map50, ours_ms), "r", PEER)
    ours = [r for r in rows if r["ours"]]
    assert len(ours) == 1 and ours[0]["vs_peer"] == pytest.approx(24.0 / ours_ms)
    assert ours[0]["prediction_error"] == 0.1
    assert table.verdict(rows, TARGET).startswith(state)


def test_ratios_stay_inside_their_own_run(table, tmp_path):
    # the same model timed in a slower run: its speed-up is against that run's peer, not the other file's
    (tmp_path / "quiet.json").write_text(json.dumps(run(0.495, 15.0)))
    (tmp_path / "busy.json").write_text(json.dumps(run(0.495, 30.0, fp32_ms=120.0, peer_ms=48.0)))
    lines = table.section("det", ["quiet", "busy", "absent"], {"peer": PEER, "target": TARGET})
    ours = [line for line in lines if "openvino-int8" in line and line.startswith("|")]
    assert len(ours) == 2 and all("| 1.60x |" in line for line in ours)
    assert "- not measured yet: absent" in lines


def test_notes_follow_the_verdict(table, tmp_path):
    # a missed bound's explanation sits under the verdict it explains, one bullet per note
    (tmp_path / "r.json").write_text(json.dumps(run(0.485, 15.0)))
    lines = table.section("det", ["r"], {"peer": PEER, "target": TARGET}, ["points: capacity, see limits.md"])
    verdict = next(i for i, line in enumerate(lines) if line.startswith("- target missed (points)"))
    assert lines[verdict + 1] == "- points: capacity, see limits.md"
