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
import torch

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


def test_fast_recovery_search_logs_recovered_candidates(trained_yolov8n: Path, small_airbus: Path):
    cfg = SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="random", episodes=2, seed=0,
                       recover="fast", recover_iters=2, **SMALL)
    r = search(cfg, progress=False)
    kids = _children(os.environ["MLFLOW_TRACKING_URI"], r.run_id)
    assert len(kids) == 2
    for k in kids:  # the reward was read after a reconstruction, and its cost is on record
        assert k.data.metrics["recover_seconds"] > 0 and 0 <= k.data.metrics["output_error"] < 10
        assert k.data.metrics["eval_seconds"] >= k.data.metrics["recover_seconds"]


def test_resume_after_kill_loses_and_duplicates_nothing(trained_yolov8n: Path, small_airbus: Path, tmp_path: Path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    args = ["search", "--weights", str(trained_yolov8n), "--data", str(small_airbus), "--agent", "ajpq",
            "--episodes", "6", "--seed", "1", "--calib-images", "4", "--reward-images", "8", "--quiet"]
    ref = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="ajpq", episodes=6,
                              seed=1, **SMALL), progress=False)
    code = "import sys; from rsdet_compress.cli.main import main; sys.exit(main(sys.argv[1:]))"
    # bit-exact resume holds for one thread count (float sums in the agent's updates depend on it), and importing
    # the killed search must use this process's thread count (test modules may have set their own)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
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
        (["--recover", "slow"], "unknown --recover"),
        (["--recover", "fast", "--recover-iters", "0"], "--recover-iters"),
        (["--agent", "two-stage", "--stage-split", "thirds"], "unknown --stage-split"),
        (["--unprunable", "model.(("], "--unprunable 'model.((': not a regular expression"),
        (["--unprunable", "model\\.99\\."], "matches no conv layer"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    from rsdet_compress.detectors.checkpoint import save_detector
    from rsdet_compress.detectors.factory import create_detector
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


class _FlakyStore:
    """Wraps ``logbook._client``: the store goes down after ``down_after`` candidate runs were created (the last
    one half-written: run created, its params and metrics not) and comes back after ``up_after`` failed calls."""

    def __init__(self, real, down_after: int, up_after: int | None):
        self.real, self.down_after, self.up_after = real, down_after, up_after
        self.created = self.failed = 0
        self.down = False

    def __call__(self, uri: str):
        store, client = self, self.real(uri)

        class Client:
            def __getattr__(self, name):
                attr = getattr(client, name)

                def call(*args, **kwargs):
                    if store.down:
                        store.failed += 1
                        if store.up_after is not None and store.failed > store.up_after:
                            store.down = False
                        else:
                            raise ConnectionError("MLflow store unreachable")
                    out = attr(*args, **kwargs)
                    if name == "create_run" and "mlflow.parentRunId" in (kwargs.get("tags") or {}):
                        store.created += 1
                        store.down = store.created >= store.down_after
                    return out
                return call
        return Client()


def _episodes(uri: str, run_id: str) -> list[int]:
    return sorted(int(k.data.tags["episode"]) for k in _children(uri, run_id))


def test_mlflow_outage_mid_search_loses_and_duplicates_nothing(trained_yolov8n: Path, small_airbus: Path,
                                                               monkeypatch):
    from rsdet_compress.search import logbook
    flaky = _FlakyStore(logbook._client, down_after=2, up_after=5)  # down for ~2 episodes, from candidate 1 on
    monkeypatch.setattr(logbook, "_client", flaky)
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="random", episodes=5,
                            seed=0, **SMALL), progress=False)
    assert flaky.failed > 1 and not flaky.down  # it really went down, and came back
    uri = os.environ["MLFLOW_TRACKING_URI"]
    assert _episodes(uri, r.run_id) == [0, 1, 2, 3, 4]  # candidate 1 was half-written once: replaced, not doubled
    for k in _children(uri, r.run_id):
        assert METRICS <= set(k.data.metrics) and k.info.status == "FINISHED"
    assert not (Path(r.out_dir) / "pending.jsonl").exists()


def test_mlflow_down_until_the_end_keeps_candidates_and_resume_uploads_them(trained_yolov8n: Path,
                                                                            small_airbus: Path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from rsdet_compress.search import logbook
    real = logbook._client
    monkeypatch.setattr(logbook, "_client", _FlakyStore(real, down_after=2, up_after=None))
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="random", episodes=4,
                            seed=0, **SMALL), progress=False)
    assert "pending.jsonl" in capsys.readouterr().err
    pending = [json.loads(line) for line in (Path(r.out_dir) / "pending.jsonl").read_text().splitlines()]
    assert [p["episode"] for p in pending] == [1, 2, 3]  # 1 half-written, 2 and 3 never reached MLflow
    assert (Path(r.out_dir) / "best_policy.json").is_file()  # the search's own results do not need MLflow
    uri = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setattr(logbook, "_client", real)
    assert MlflowClient(uri).get_run(r.run_id).info.status == "RUNNING"
    assert main(["search", "--resume", r.run_id, "--quiet"]) == 0
    assert _episodes(uri, r.run_id) == [0, 1, 2, 3]
    assert MlflowClient(uri).get_run(r.run_id).info.status == "FINISHED"
    assert not (Path(r.out_dir) / "pending.jsonl").exists()


def test_a_repeated_policy_is_scored_once(trained_yolov8n: Path, small_airbus: Path, monkeypatch):
    """A ladder that comes back to 8 bits: the 3rd candidate is the 1st policy again, logged but not re-evaluated."""
    from mlflow import MlflowClient

    from rsdet_compress.search import evaluation, searchers
    monkeypatch.setattr(searchers.UniformSearcher, "LADDER", (8, 4, 8))
    scored = []
    real = evaluation.CandidateEvaluator.__call__
    monkeypatch.setattr(evaluation.CandidateEvaluator, "__call__",
                        lambda self, policy: scored.append(policy) or real(self, policy))
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), agent="uniform", episodes=3,
                            seed=0, **SMALL), progress=False)
    assert len(scored) == 2 and len(r.candidates) == 3
    kids = {int(k.data.tags["episode"]): k.data.metrics for k in _children(os.environ["MLFLOW_TRACKING_URI"],
                                                                         r.run_id)}
    assert sorted(kids) == [0, 1, 2]
    assert kids[2]["repeat_of"] == 0 and kids[2]["eval_seconds"] == 0 and kids[0]["eval_seconds"] > 0
    assert kids[2]["map50"] == kids[0]["map50"] and kids[2]["reward"] == kids[0]["reward"]
    assert "repeat_of" not in kids[0] and "repeat_of" not in kids[1]
    assert MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(r.run_id).data.metrics["eval_ratio"] > 0
