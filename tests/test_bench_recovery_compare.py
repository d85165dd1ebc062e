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
