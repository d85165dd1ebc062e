"""The benchmarks' ledger: a finished piece is reused under the same key and made again under another."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

LEDGER_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "ledger.py"


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_ledger", LEDGER_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "LEDGER", tmp_path / "ledger")
    return module


def test_same_key_reuses_other_key_remakes(ledger, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    calls = []

    def make(v):
        def run():
            calls.append(v)
            return {"map50": np.float64(v), "ci95": (v - 0.1, v + 0.1)}
        return run
    key = {"weights": ledger.digest(weights), "stages": {"iters": 300, "minutes": None}}
    first = ledger.kept("rows-a", key, make(0.5))
    again = ledger.kept("rows-a", dict(key), make(0.9))  # same key: not made again
    assert calls == [0.5] and again == first == {"map50": 0.5, "ci95": [0.4, 0.6]}
    weights.write_bytes(b"retrained")  # other weights: other digest, made again and replaced
    other = ledger.kept("rows-a", {**key, "weights": ledger.digest(weights)}, make(0.7))
    assert calls == [0.5, 0.7] and other["map50"] == 0.7
    record = json.loads((tmp_path / "ledger" / "rows-a.json").read_text())
    assert record["value"]["map50"] == 0.7 and record["key"]["weights"] == ledger.digest(weights)


def test_a_failed_make_keeps_nothing(ledger):
    def boom():
        raise RuntimeError("stage failed")
    with pytest.raises(RuntimeError):
        ledger.kept("rows-b", {"k": 1}, boom)
    assert not (ledger.LEDGER / "rows-b.json").exists()


def test_a_checkpoint_gone_is_named_by_its_digest(ledger, tmp_path):
    weights = tmp_path / "recovered.pt"
    weights.write_bytes(b"recovered")
    sha = ledger.digest(weights)
    assert ledger.digest_of(str(weights)) == sha
    weights.unlink()  # an earlier checkout's file: its rows stay reachable by the digest they were kept under
    assert ledger.digest_of(sha) == sha
    with pytest.raises(SystemExit, match="no such file"):
        ledger.digest_of(str(weights))
