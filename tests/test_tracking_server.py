"""The team's MLflow tracking server: ``mlflow server`` on PostgreSQL, artifacts proxied to a folder or S3.

Everything runs against a real server started here (``services.py``, 127.0.0.1 only): a
whole search lands there (nested runs, Pareto plot, best policy), ``evaluate`` logs there,
stopping the server for a few candidates mid-search loses and doubles nothing, and with an
S3-compatible artifact store the search's files end up as objects in its bucket.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from services import MlflowServer, Postgres, S3Store, postgres_bin

from rsdet_compress.cli.main import main
from rsdet_compress.search.runner import SearchConfig, search

pytestmark = pytest.mark.slow

SMALL = dict(calib_images=4, reward_images=8, budget=["size=0.125"], agent="random", seed=0)
METRICS = {"map50", "map50_95", "reward", "compression_ratio", "bops_ratio", "meets_budget"}


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster for this module; CI must have it (``.ci/run`` installs PostgreSQL)."""
    if not postgres_bin("initdb"):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server tools missing in CI: .ci/run installs them")
        pytest.skip("PostgreSQL server tools not installed (apt-get install postgresql)")
    pg = Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def server(postgres: Postgres, tmp_path_factory):
    """``mlflow server`` on PostgreSQL, artifacts proxied to a folder."""
    srv = MlflowServer(postgres.url, tmp_path_factory.mktemp("artifacts") / "store")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def on_server(server: MlflowServer, monkeypatch) -> MlflowServer:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    return server


def _candidates(uri: str, run_id: str) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_a_whole_search_lands_on_the_server(on_server: MlflowServer, trained_yolov8n: Path, small_airbus: Path):
    from mlflow import MlflowClient
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), episodes=3, **SMALL),
               progress=False)
    client = MlflowClient(on_server.uri)
    kids = _candidates(on_server.uri, r.run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == [0, 1, 2]
    for k in kids:
        assert METRICS <= set(k.data.metrics) and k.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(k.info.run_id)] == ["policy.json"]
    parent = client.get_run(r.run_id)
    assert parent.info.status == "FINISHED"
    assert {"pareto.png", "best_policy.json", "candidates.jsonl"} <= {a.path for a in client.list_artifacts(r.run_id)}
    assert "Chart" in parent.data.tags["mlflow.note.content"]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not Path(r.out_dir, "pending.jsonl").exists()


def test_evaluate_logs_to_the_server(on_server: MlflowServer, trained_yolov8n: Path, small_airbus: Path, capsys):
    from mlflow import MlflowClient
    assert main(["evaluate", "--weights", str(trained_yolov8n), "--data", str(small_airbus), "--json"]) == 0
    client = MlflowClient(on_server.uri)
    exp = client.get_experiment_by_name("rsdet-compress")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate'")
    assert runs and runs[0].data.metrics["map50"] > 0.2


def test_server_stopped_mid_search_loses_and_doubles_nothing(on_server: MlflowServer, trained_yolov8n: Path,
                                                             small_airbus: Path, monkeypatch):
    """The server goes down after candidate 1 and comes back after candidate 3: all 6 land, once each."""
    from rsdet_compress.search.logbook import Logbook
    real = Logbook.log_candidate
    seen: list[int] = []
    queued: dict[int, int] = {}

    def log_candidate(book, record):
        seen.append(record["episode"])
        if record["episode"] == 4:
            on_server.start()  # back before candidate 4 is logged (same port, same database)
        ok = real(book, record)
        queued[record["episode"]] = len(book.pending)
        if record["episode"] == 1:
            on_server.stop()
        return ok

    monkeypatch.setattr(Logbook, "log_candidate", log_candidate)
    r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), episodes=6, **SMALL),
               progress=False)
    assert seen == list(range(6))
    assert queued[2] >= 1 and queued[3] >= 2 and queued[4] == 0  # held back while down, all written once back
    kids = _candidates(on_server.uri, r.run_id)
    assert sorted(int(k.data.tags["episode"]) for k in kids) == list(range(6))  # none lost, none twice
    assert all(METRICS <= set(k.data.metrics) and k.info.status == "FINISHED" for k in kids)
    assert not Path(r.out_dir, "pending.jsonl").exists()


def test_artifacts_go_to_an_s3_store(postgres: Postgres, trained_yolov8n: Path, small_airbus: Path, tmp_path: Path,
                                     monkeypatch):
    """``--artifacts-destination s3://...``: the client uploads through the server, the files land in the bucket."""
    for module, extra in (("boto3", "server"), ("moto", "dev")):
        try:
            __import__(module)
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail(f"{module} missing in CI: scripts/setup.sh installs the '{extra}' extra")
            pytest.skip(f"{module} not installed (pip install -e '.[{extra}]')")
    from mlflow import MlflowClient
    store = S3Store().start()
    srv = MlflowServer(postgres.create_database("mlflow_s3"), f"s3://{store.bucket}/mlflow", log_dir=tmp_path,
                       env=store.env)
    try:
        srv.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        r = search(SearchConfig(weights=str(trained_yolov8n), data=str(small_airbus), episodes=2, **SMALL),
                   progress=False)
        client = MlflowClient(srv.uri)
        kids = _candidates(srv.uri, r.run_id)
        assert sorted(int(k.data.tags["episode"]) for k in kids) == [0, 1]
        listed = {a.path for a in client.list_artifacts(r.run_id)}
        assert {"pareto.png", "best_policy.json", "candidates.jsonl"} <= listed
        keys = store.keys("mlflow/")
        for name in ("pareto.png", "best_policy.json", "candidates.jsonl"):
            assert any(k.endswith(f"/{r.run_id}/artifacts/{name}") for k in keys), (name, keys)
        assert sum(k.endswith("/artifacts/policy.json") for k in keys) == 2  # one per candidate
        got = client.download_artifacts(r.run_id, "best_policy.json", str(tmp_path))
        assert Path(got).read_bytes() == Path(r.out_dir, "best_policy.json").read_bytes()
    finally:
        srv.stop()
        store.stop()
