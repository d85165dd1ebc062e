"""recovery_compare's search reuse (a search cut short continues, but never one timed on another CPU), and the
commands the recovery table shows."""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from rsdet_compress.search.runner import SearchConfig, timing_machine
from rsdet_compress.search.statefile import save_state

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """recovery_compare and the sibling scripts it imports by bare name, registered for the test only."""
    modules = {}
    for name in ("ledger", "kept_search", "recovery_compare", "recovery_table"):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])  # removed again after the test
        spec.loader.exec_module(modules[name])
    return modules


def _state(run_id: str, cfg: SearchConfig, machine: dict | None) -> None:
    save_state(Path(os.environ["RSDET_RUNS"]) / "search" / run_id / "state.pt",
               {"config": asdict(cfg), "timing_machine": machine})
    time.sleep(0.02)  # newest first is by modification time


def test_earlier_search_resumes_only_a_latency_search_timed_here(bench):
    kept_search = bench["kept_search"]
    cfg = SearchConfig(weights="w.pt", data="d.yaml", budget=["latency=0.33"], latency_runtime="onnxruntime")
    here = timing_machine(cfg)
    elsewhere = {**here, "cpu": "Other CPU (avx2)", "table": "onnxruntime-t2-0000000000.json"}
    _state("older-here", cfg, here)
    _state("newer-elsewhere", cfg, elsewhere)
    _state("newest-other-budget", SearchConfig(weights="w.pt", data="d.yaml", budget=["latency=0.5"]), here)
    assert kept_search.earlier_search(cfg) == "older-here"  # the newest same-settings one of this machine
    _state("older-here", cfg, elsewhere)
    assert kept_search.earlier_search(cfg) is None

    flops = SearchConfig(weights="w.pt", data="d.yaml", budget=["flops=0.5"])  # no latency: any machine's
    _state("flops", flops, None)
    assert kept_search.earlier_search(flops) == "flops"


def test_stage_minutes_keep_the_cpu_they_ran_on(bench, tmp_path):
    recovery_compare = bench["recovery_compare"]
    from rsdet_compress.machine import cpu_label
    out = tmp_path / "stage.pt"
    made = recovery_compare.timed(out, lambda: out.write_bytes(b"x"))
    assert made[1] == cpu_label() and made[0] >= 0
    assert recovery_compare.timed(out, lambda: pytest.fail("made twice")) == made  # reused with its CPU
    old = tmp_path / "old.pt"
    old.write_bytes(b"x")
    old.with_name("old.pt.minutes").write_text("12.500\n")  # a record from before the CPU was kept
    assert recovery_compare.timed(old, lambda: pytest.fail("made twice")) == (12.5, None)

    m = {"map50": 0.5, "map50_95": 0.3, "per_class": {"plane": {"ap50": 0.5}}}
    ones = {"size": 1.0, "flops": 1.0, "bops": 1.0}
    rows = [recovery_compare.row("p", stage, m, made, ones, None, m)
            for stage, made in (("calibrated", (0.4, "CPU A (avx2)")), ("+ recover", (30.0, "CPU B")),
                                ("+ recover + QAT", (12.5, None)))]
    md = recovery_compare.markdown(rows, "# t")
    assert "| 0.4 (a) |" in md and "| 30.0 (b) |" in md and "| 12.5 |" in md
    assert "(a) CPU A (avx2); (b) CPU B; unmarked: CPU not recorded." in md


def test_each_results_file_records_the_command_its_table_config_gives(bench):
    """A results file's recorded command, split as a shell would, is the config's: a reader's copy-paste and
    ``--run-missing`` make the same rows (an empty ``--searches ""`` printed unquoted once made another)."""
    recovery_table = bench["recovery_table"]
    config = yaml.safe_load((BENCH / "recovery_table.yaml").read_text())
    checked = 0
    for section in config["sections"]:
        for spec in section["sources"]:
            stem, args = recovery_table.source(spec)
            command = recovery_table.command_of(stem)
            if command is None or args is None:
                continue
            assert shlex.split(command)[2:] == args, stem
            checked += 1
    assert checked >= 8  # the committed results files, not a vacuous pass


def test_two_stage_split_keeps_the_ledgered_searches_made_before_it(bench, tmp_path, monkeypatch):
    """The benchmarks' default split is the one the ledgered two-stage searches were made with, so their keys
    stay as they were; the bits split is a record of its own, and the other agents' keys never carry it."""
    import argparse
    kept_search = bench["kept_search"]
    recorded = {}
    monkeypatch.setattr(kept_search, "kept", lambda name, key, make: recorded.setdefault(name, key))
    weights = tmp_path / "yolov8n" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"float weights")
    ap = argparse.ArgumentParser()
    kept_search.add_search_args(ap)
    budget = kept_search.Budget.parse(["bops=0.02"])
    ap.add_argument("--device", default="cpu")  # recovery_compare's stage argument, part of every record's name
    bits = ["--stage-split", "bits"]
    for agent, flags in (("ajpq", bits), ("two-stage", []), ("two-stage", bits)):
        args = ap.parse_args(["--uniform-start", *flags])
        kept_search.cached_search(agent, weights, tmp_path / "d.yaml", budget, args)
    assert sorted(recorded) == ["yolov8n-search-ajpq-bops0.02-e24-fast-r5-s0-u",
                                "yolov8n-search-two-stage-bops0.02-e24-fast-r5-s0-u",
                                "yolov8n-search-two-stage-bops0.02-e24-fast-r5-s0-u-splitbits"]
    settings = {name: key["search"] for name, key in recorded.items()}
    assert "stage_split" not in settings["yolov8n-search-ajpq-bops0.02-e24-fast-r5-s0-u"]
    assert "stage_split" not in settings["yolov8n-search-two-stage-bops0.02-e24-fast-r5-s0-u"]
    assert settings["yolov8n-search-two-stage-bops0.02-e24-fast-r5-s0-u-splitbits"]["stage_split"] == "bits"
    kind = bench["recovery_table"].kind
    assert kind("two-stage (uniform start, bits split) @ bops=0.02") == "two-stage"
    assert kind("two-stage (uniform start) @ bops=0.02") == "two-stage (half split)"
    assert kind("ajpq (uniform start) @ bops=0.02") == "ajpq"


def test_a_sections_notes_follow_its_verdicts(bench):
    # the committed SkyNet (a) section: its verdicts, then the note saying what limits it, before the commands
    recovery_table = bench["recovery_table"]
    config = yaml.safe_load((BENCH / "recovery_table.yaml").read_text())
    spec = next(s for s in config["sections"] if s.get("notes") and s.get("target"))
    lines = recovery_table.section(spec, config["target_points"])
    last_verdict = max(i for i, line in enumerate(lines) if line.startswith("- best "))
    assert lines[last_verdict + 1] == f"- {spec['notes'][0]}"
    assert lines.index("Made by:") > last_verdict + 1
