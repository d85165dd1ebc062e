"""Where an exported model's time goes: each operator's time, from the runtime's own profiler.

A latency row says how long a pass takes; a profile says which operators take it.
onnxruntime records every node's kernel time when its session is built with profiling
on (a Chrome trace, read back here and deleted); OpenVINO's CPU plugin keeps per-node
counters (``PERF_COUNT``) of the last inference. Both are summed over ``runs`` passes
after ``warmup`` untimed ones, then grouped by operator type and the kernel that ran
it. OpenVINO's kernel name carries the precision it ran in (``..._I8`` vs ``..._FP32``),
which is how a layer meant to run in int8 that fell back to float shows up; for
onnxruntime the operator type says it (``QLinearConv`` vs ``Conv``).

Profiling adds a little time per node, so ``wall_ms`` (with the profiler on) is only
the scale against which the operator times are read; latency comes from ``benchmark``.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsdet_compress.errors import UserError
from rsdet_compress.runtime.loader import OnnxDetector
from rsdet_compress.runtime.openvino import OV_SUFFIX, OpenVinoDetector

#: artifacts a runtime can profile, by suffix
PROFILED = (".onnx", OV_SUFFIX)


@dataclass
class OpTime:
    """One operator type run by one kernel: its nodes' time per pass."""

    op: str          # ONNX op type / OpenVINO node type
    kernel: str      # onnxruntime's execution provider / OpenVINO's exec type (with its precision)
    nodes: int       # how many nodes of the graph
    ms: float        # milliseconds per pass, summed over those nodes
    share: float     # of all operators' time


@dataclass
class Profile:
    """Per-operator times of one artifact at one batch size."""

    artifact: str
    runtime: str
    batch: int
    imgsz: int
    runs: int
    wall_ms: float                     # median pass with the profiler on
    ops: list[OpTime] = field(default_factory=list)

    @property
    def op_ms(self) -> float:
        return sum(o.ms for o in self.ops)


def _grouped(times: dict[tuple[str, str], float], names: dict[tuple[str, str], set], runs: int) -> list[OpTime]:
    total = sum(times.values()) or 1.0
    ops = [OpTime(op, kernel, len(names[(op, kernel)]), ms / runs, ms / total) for (op, kernel), ms in times.items()]
    return sorted(ops, key=lambda o: -o.ms)


def _profile_onnx(path: Path, batch: int, imgsz: int | None, runs: int, warmup: int,
                  threads: int | None, x_of) -> Profile:
    with tempfile.TemporaryDirectory() as tmp:
        det = OnnxDetector(path, threads=threads, profile=str(Path(tmp) / "ort"))
        size = int(imgsz or det.meta.get("imgsz") or 640)
        x, walls = x_of(batch, size), []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            det.session.run(None, {det.input_name: x})
            if i >= warmup:
                walls.append((time.perf_counter() - t0) * 1e3)
        events = json.loads(Path(det.session.end_profiling()).read_text())
    passes = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = passes[warmup] if len(passes) > warmup else 0  # the first profiled pass
    times, names = defaultdict(float), defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            key = (e["args"].get("op_name", "?"), e["args"].get("provider", "?").replace("ExecutionProvider", ""))
            times[key] += e["dur"] / 1e3
            names[key].add(e["name"])
    return Profile(str(path), "onnxruntime", batch, size, runs, statistics.median(walls),
                   _grouped(times, names, runs))


def _profile_openvino(path: Path, batch: int, imgsz: int | None, runs: int, warmup: int,
                      threads: int | None, x_of) -> Profile:
    det = OpenVinoDetector(path, threads=threads, profile=True)
    size = int(imgsz or det.meta.get("imgsz") or 640)
    x = x_of(batch, size)
    req = det.request(tuple(x.shape))
    times, names, walls = defaultdict(float), defaultdict(set), []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        req.infer({0: x})
        if i < warmup:
            continue
        walls.append((time.perf_counter() - t0) * 1e3)
        for info in req.get_profiling_info():  # the last pass's counters
            if info.status == info.Status.EXECUTED:
                key = (info.node_type, info.exec_type)
                times[key] += info.real_time.total_seconds() * 1e3
                names[key].add(info.node_name)
    return Profile(str(path), "openvino", batch, size, runs, statistics.median(walls), _grouped(times, names, runs))


def profile(path: str | Path, batch: int = 1, imgsz: int | None = None, runs: int = 20, warmup: int = 5,
            threads: int | None = None, seed: int = 0) -> Profile:
    """Per-operator times of an ``.onnx`` (onnxruntime, CPU) or ``.xml`` (OpenVINO CPU) on a random batch."""
    path = Path(path)
    if path.suffix.lower() not in PROFILED:
        raise UserError(f"{path}: only ONNX (.onnx) and OpenVINO (.xml) files can be profiled")
    if runs < 1 or warmup < 0 or batch < 1:
        raise UserError(f"profile needs runs >= 1, warmup >= 0 and batch >= 1, got {runs}, {warmup}, {batch}")
    rng = np.random.default_rng(seed)

    def x_of(b: int, s: int) -> np.ndarray:
        return rng.random((b, 3, s, s), dtype=np.float32)
    run = _profile_onnx if path.suffix.lower() == ".onnx" else _profile_openvino
    return run(path, batch, imgsz, runs, warmup, threads, x_of)


def format_profile(p: Profile, top: int = 12) -> str:
    """A markdown table of the ``top`` operator groups by time, the rest summed in one line."""
    lines = [f"{Path(p.artifact).name} on {p.runtime}, batch {p.batch}, {p.imgsz} px: operators {p.op_ms:.2f} ms "
             f"of {p.wall_ms:.2f} ms per pass (median of {p.runs}, profiler on)", "",
             "| operator | kernel | nodes | ms / pass | share |", "|---|---|---|---|---|"]
    for o in p.ops[:top]:
        lines.append(f"| {o.op} | {o.kernel} | {o.nodes} | {o.ms:.2f} | {o.share:.1%} |")
    rest = p.ops[top:]
    if rest:
        lines.append(f"| ({len(rest)} more) | | {sum(o.nodes for o in rest)} | {sum(o.ms for o in rest):.2f} | "
                     f"{sum(o.share for o in rest):.1%} |")
    return "\n".join(lines)
