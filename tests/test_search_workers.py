"""Candidate evaluation on Ray workers (``search --workers K``), on a local 2-CPU Ray cluster.

Random proposals do not depend on earlier rewards, so the same seed proposes the same
policies whatever the batch size: with two workers every candidate must score exactly what
the in-process search gave it, each logged once; a worker killed mid-evaluation must
cost nothing but the time to restart it, and a driver killed mid-batch must resume with
nothing lost or logged twice.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from rsdet_compress.cli.main import main
from rsdet_compress.search import workers
from rsdet_compress.search.runner import SearchConfig, search

pytestmark = pytest.mark.slow

SMALL = dict(calib_images=4, reward_images=8, budget=["size=0.125"], agent="random", seed=0, episodes=4)


def _children(run_id: str) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_two_workers_score_every_candidate_as_in_process_once(trained_yolov8n: Path, small_airbus: Path):
    base = dict(weights=str(trained_yolov8n), data=str(small_airbus), **SMALL)
    one = search(SearchConfig(**base), progress=False)
    two = search(SearchConfig(**base, workers=2), progress=False)
    assert not ray.is_initialized(), "the search's own local cluster is shut down"
    assert [c["episode"] for c in two.candidates] == [0, 1, 2, 3]
    for a, b in zip(one.candidates, two.candidates):
        assert a["params"] == b["params"]  # the same proposals
        # scored as in process, up to float summation order (each worker has one of the two threads)
        assert b["metrics"]["map50"] == pytest.approx(a["metrics"]["map50"], abs=2e-3)
        assert b["metrics"]["meets_budget"] == 1
    kids = _children(two.run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == [0, 1, 2, 3]
    assert all(k.info.status == "FINISHED" and "map50" in k.data.metrics for k in kids)


def test_a_killed_worker_requeues_its_candidate(trained_yolov8n: Path, small_airbus: Path, monkeypatch):
    real = workers.RayPool.map
    killed: list[int] = []

    def map_and_kill(pool, policies):
        if not killed:  # first batch: kill one worker while it evaluates
            victim = pool.pids()[0]

            def kill():
                time.sleep(1.0)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            threading.Thread(target=kill, daemon=True).start()
        out = real(pool, policies)
        if killed:
            assert killed[0] not in pool.pids(), "the dead worker was replaced"
        return out

    monkeypatch.setattr(workers.RayPool, "map", map_and_kill)
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), workers=2, **SMALL),
               progress=False)
    assert killed
    assert [c["episode"] for c in r.candidates] == [0, 1, 2, 3]
    assert sorted(int(k.data.tags["episode"]) for k in _children(r.run_id)) == [0, 1, 2, 3]


def _ray_processes() -> set[int]:
    """Pids of Ray's own processes (GCS, raylet, workers) on this machine."""
    out = subprocess.run(["pgrep", "-f", "gcs_server|raylet|ray::|default_worker.py"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_driver_killed_mid_batch_resumes_with_nothing_lost_or_doubled(trained_yolov8n: Path, small_airbus: Path):
    before = _ray_processes()
    args = ["search", "--weights", str(trained_yolov8n), "--data", str(small_airbus), "--agent", "random",
            "--episodes", "6", "--seed", "0", "--calib-images", "4", "--reward-images", "8",
            "--budget", "size=0.125", "--workers", "2", "--quiet"]
    code = "import sys; from rsdet_compress.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = Path(os.environ["RSDET_RUNS"]) / "search"
    seen: dict[int, dict] = {}
    deadline, run_id = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a candidate of the second batch is in
        states = list(runs.glob("*/state.pt"))
        if states:
            run_id = states[0].parent.name
            kids = _children(run_id)
            # a run is complete once FINISHED: before that its params may still be on the way
            seen = {int(k.data.tags["episode"]): dict(k.data.params) for k in kids if k.info.status == "FINISHED"}
            if len(seen) >= 3:
                break
        time.sleep(0.2)
    assert len(seen) >= 3, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "too slow"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    orphans = _ray_processes() - before  # the killed driver's local cluster
    assert len(seen) < 6
    assert main(["search", "--resume", run_id, "--quiet"]) == 0  # --workers 2 comes from the checkpoint
    kids = _children(run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == list(range(6))
    after = {int(k.data.tags["episode"]): dict(k.data.params) for k in kids}
    for episode, params in seen.items():  # the candidate redone after the kill is the one proposed before it
        assert after[episode] == params, episode
    assert all(k.info.status == "FINISHED" and "map50" in k.data.metrics for k in kids)
    # Ray's processes share their driver's fate: the workers and raylet at once, its node agents once they
    # see the raylet gone (about two minutes). Nothing of the killed search keeps running.
    deadline = time.time() + 240
    while orphans & _ray_processes() and time.time() < deadline:
        time.sleep(2)
    assert not orphans & _ray_processes(), "Ray processes outlived the killed driver"
