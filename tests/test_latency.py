"""``benchmark``: latency statistics, rows per artifact/backend/batch, speed-ups, MLflow, bad input.

Timings themselves are not asserted against goals here (those live in benchmarks/); only facts that
hold on any machine: 8 images cost more than 1, the baseline is 1.00x against itself.
"""
from __future__ import annotations

import json

import mlflow
import onnx
import pytest

from rsdet_compress.cli.main import main
from rsdet_compress.engine.latency import LatencyConfig, benchmark, summarize, time_fn
from rsdet_compress.errors import UserError
from rsdet_compress.export.onnx import export_onnx


def test_summarize_median_p90_throughput():
    t = [float(v) for v in range(1, 11)]  # 1..10 ms
    s = summarize(t, batch=4)
    assert s["median_ms"] == 5.5
    assert s["p90_ms"] == 9.0  # nearest rank: ceil(0.9 * 10) = 9th value
    assert s["mean_ms"] == 5.5
    assert s["throughput"] == pytest.approx(4 * 1000 / 5.5)
    assert summarize([3.0], batch=1)["p90_ms"] == 3.0


def test_time_fn_runs_warmup_then_timed_calls():
    calls = []
    times = time_fn(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(UserError, match="runs >= 1"):
        time_fn(lambda: None, runs=0, warmup=1)


@pytest.fixture(scope="module")
def float_onnx(trained_yolov8n, tmp_path_factory):
    return export_onnx(trained_yolov8n, tmp_path_factory.mktemp("lat") / "float.onnx")


def test_rows_speedups_and_batch_cost(trained_yolov8n, float_onnx):
    cfg = LatencyConfig(batches=(1, 8), runs=3, warmup=1, imgsz=160, devices=("cpu",))
    rows = benchmark([trained_yolov8n, float_onnx], cfg)
    assert [(r.backend, r.batch) for r in rows] == [("pytorch", 1), ("pytorch", 8), ("onnxruntime", 1),
                                                    ("onnxruntime", 8)]
    for r in rows:
        assert r.imgsz == 160 and r.device == "cpu" and r.p90_ms >= r.median_ms > 0
    assert all(r.speedup == 1.0 for r in rows)                # each backend's first file against itself
    assert all(r.speedup_vs_fp32_onnx == 1.0 for r in rows if r.backend == "onnxruntime")
    b1, b8 = (r for r in rows if r.backend == "onnxruntime")
    assert b8.median_ms > 2 * b1.median_ms                    # 8 images are real work, not a cached result
    assert b8.throughput > 0 and b1.extra["precision"] == "fp32"


def test_rounds_interleave_every_row_and_keep_the_run_count(trained_yolov8n, float_onnx, monkeypatch):
    from rsdet_compress.engine import latency
    calls, real = [], latency.time_fn

    def spy(fn, runs, warmup, sync=lambda: None):
        calls.append((fn.args[-1].shape[0], runs, warmup))  # (batch of the row, timed runs, untimed runs)
        return real(fn, runs, warmup, sync)
    monkeypatch.setattr(latency, "time_fn", spy)
    cfg = LatencyConfig(batches=(1, 2), runs=5, warmup=2, rounds=2, imgsz=96, devices=("cpu",))
    rows = benchmark([trained_yolov8n, float_onnx], cfg)
    # pass 1 times every row (3 runs each, full warm-up), then pass 2 every row again (2 runs, one re-warm call):
    # a spell of load during one pass slows all four rows, not the ones that happened to be timed then
    assert calls == [(1, 3, 2), (2, 3, 2), (1, 3, 2), (2, 3, 2), (1, 2, 1), (2, 2, 1), (1, 2, 1), (2, 2, 1)]
    assert len(rows) == 4 and all(r.p90_ms >= r.median_ms > 0 for r in rows)
    with pytest.raises(UserError, match="--rounds must be >= 1"):
        LatencyConfig(rounds=0)


def test_cli_writes_json_and_logs_mlflow(trained_yolov8n, float_onnx, tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["benchmark", "--weights", str(trained_yolov8n), "--onnx", str(float_onnx), "--batch", "1",
               "--runs", "2", "--warmup", "1", "--imgsz", "128", "--device", "cpu", "--out", str(out), "--profile"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "median ms" in text and "float.onnx" in text and "onnxruntime" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and data["config"]["runs"] == 2 and data["machine"]["onnxruntime"]
    # --profile: the ONNX file's operators (the .pt has no runtime profiler), every Conv node of the graph timed
    assert "| operator | kernel | nodes | ms / pass | share |" in text
    (prof,) = data["profiles"]
    ops = {o["op"]: o for o in prof["ops"]}
    graph_convs = sum(n.op_type == "Conv" for n in onnx.load(str(float_onnx)).graph.node)
    assert ops["Conv"]["nodes"] == graph_convs > 50 and ops["Conv"]["ms"] > 0
    assert prof["runs"] == 2 and prof["batch"] == 1 and prof["imgsz"] == 128
    runs = mlflow.search_runs(experiment_names=["rsdet-compress"], filter_string="tags.stage = 'benchmark'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.m1_float.onnxruntime.cpu.b1.median_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    ([], "give at least one model"),
    (["--weights", "nope.pt"], "nope.pt: model file not found"),
    (["--onnx", "model.pt"], "--onnx takes .onnx files"),
    (["--weights", "W", "--device", "tpu"], "--device must be"),
    (["--weights", "W", "--batch", "0"], "batch sizes must be >= 1"),
])
def test_bad_input_is_one_line_exit_2(trained_yolov8n, argv, message, capsys):
    argv = [str(trained_yolov8n) if a == "W" else a for a in argv]
    assert main(["benchmark", *argv, "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
