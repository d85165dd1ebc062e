"""End-to-end searches on a really trained detector: MLflow nested runs, resume after kill -9, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsdet_compress.cli.main import main
from rsdet_compress.compress.policy import Policy
from rsdet_compress.search.runner import SearchConfig, search

pytestmark = pytest.mark.slow
SMALL = dict(calib_images=4, reward_images=8, budget=["size=0.125"])
METRICS = {"map50", "map50_95", "reward", "size_bytes", "compression_ratio", "params", "flops", "bops"}


def _children(uri: str, parent: str):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.parametrize("agent", ["ajpq", "abcp", "random", "two-stage"])
def test_n_episodes_give_n_nested_runs(agent, trained_yolov8n: Path, small_airbus: Path):
    cfg = SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent=agent, episodes=3, seed=0, **SMALL)
    r = search(cfg, progress=False)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    kids = _children(uri, r.run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == [0, 1, 2]
    for k in kids:
        assert METRICS <= set(k.data.metrics) and k.info.status == "FINISHED"
        assert {"mean_weight_bits", "mean_sparsity"} <= set(k.data.params)
    from mlflow import MlflowClient
    parent = MlflowClient(uri).get_run(r.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["agent"] == agent
    assert {"best_reward", "best_map50", "wall_seconds"} <= set(parent.data.metrics)
    arts = {a.path for a in MlflowClient(uri).list_artifacts(r.run_id)}
    assert {"pareto.png", "best_policy.json", "candidates.jsonl"} <= arts
    best = Policy.load(Path(r.out_dir) / "best_policy.json")
    assert best.weights and r.best["metrics"]["compression_ratio"] >= 8
    if agent != "two-stage":  # two-stage's first half is pruning-only, under its own stage budget
        assert all(k.data.metrics["compression_ratio"] >= 8 for k in kids)


def test_resume_after_kill_loses_and_duplicates_nothing(trained_yolov8n: Path, small_airbus: Path, tmp_path: Path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    args = ["search", "--weights", str(trained_yolov8n), "--data", str(small_airbus), "--agent", "ajpq",
            "--episodes", "6", "--seed", "1", "--calib-images", "4", "--reward-images", "8", "--quiet"]
    ref = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="ajpq", episodes=6,
                              seed=1, **SMALL), progress=False)
    code = "import sys; from rsdet_compress.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = Path(os.environ["RSDET_RUNS"]) / "search"
    deadline = time.time() + 300
    state = None
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a few candidates are in
        states = [p for p in runs.glob("*/state.pt") if p.parent.name != ref.run_id]
        if states and len(_children(uri, states[0].parent.name)) >= 3:
            state = states[0]
            break
        time.sleep(0.2)
    assert state is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "too slow"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = state.parent.name
    assert len(_children(uri, run_id)) < 6
    assert main(["search", "--resume", run_id, "--episodes", "6", "--quiet"]) == 0
    kids = _children(uri, run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == list(range(6))
    # the same candidates as the uninterrupted search with the same seed
    mine = {int(k.data.tags["episode"]): k.data.metrics["size_bytes"] for k in kids}
    theirs = {r["episode"]: r["metrics"]["size_bytes"] for r in ref.candidates}
    assert mine == theirs


def test_bad_input_fails_fast(trained_yolov8n: Path, small_airbus: Path, tmp_path: Path, capsys):
    base = ["search", "--weights", str(trained_yolov8n), "--data", str(small_airbus), "--episodes", "2", "--quiet"]
    cases = [
        (["--agent", "genetic"], "unknown agent"),
        (["--reward", "eval"], "unknown reward"),
        (["--budget", "size=0.0005"], "impossible"),
        (["--budget", "speed=2"], "budget"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    from rsdet_compress.detectors.registry import create_detector, save_detector
    other = save_detector(create_detector("skynet", 3), tmp_path / "three_classes.pt", {"imgsz": 320})
    capsys.readouterr()
    assert main(["search", "--weights", str(tmp_path / "nope.pt"), "--data", str(small_airbus), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["search", "--weights", str(other), "--data", str(small_airbus), "--quiet", "--episodes", "1"]) == 2
    assert "classes" in capsys.readouterr().err
    os.environ["MLFLOW_TRACKING_URI_SAVED"] = os.environ["MLFLOW_TRACKING_URI"]
    try:
        os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9/"
        assert main(base) == 2
        assert "unreachable" in capsys.readouterr().err
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = os.environ.pop("MLFLOW_TRACKING_URI_SAVED")
    assert not list((Path(os.environ["RSDET_RUNS"]) / "search").glob("*/state.pt"))
