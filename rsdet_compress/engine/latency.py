"""Measured speed: latency and throughput of our artifacts on PyTorch, onnxruntime and OpenVINO, CPU and CUDA.

A row is one (artifact, backend, device, batch): warm-up runs first (allocator,
oneDNN/ORT kernel selection and CUDA context are not part of a deployment's
steady state), then ``runs`` timed forward passes of a fixed random batch,
reported as median and p90 milliseconds and images per second at the median.
The first artifact run on a backend is that backend's baseline: every row gets
its speed-up against the baseline's row on the same backend, device and batch
(fp32 on the same runtime, when the fp32 file comes first), and against the
first ONNX file on onnxruntime (fp32 onnxruntime on CPU: the common deployment
every other runtime is compared with).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from rsdet_compress.engine.scorer import check_imgsz
from rsdet_compress.errors import UserError
from rsdet_compress.machine import cpu_label
from rsdet_compress.runtime.loader import OnnxDetector, load_model
from rsdet_compress.runtime.openvino import OV_SUFFIX, OpenVinoDetector, bin_path

#: devices a benchmark can time on
DEVICES = ("cpu", "cuda")


@dataclass
class LatencyConfig:
    """How a latency measurement is taken."""

    #: batch sizes, e.g. 1,8: 1 = a drone's frame-by-frame loop; 8 = tiles of a scene in one pass
    batches: tuple[int, ...] = (1, 8)
    #: timed runs per row: p90 of 30 is stable to a few % on an idle CPU
    runs: int = 30
    #: untimed runs first: kernel selection, allocator, CUDA context
    warmup: int = 5
    #: passes over all rows, each timing runs/rounds calls of every row: on a shared machine a spell of load then
    #: slows every row a little instead of whichever rows were timed during it, so ratios within one run hold
    rounds: int = 3
    #: input side; None = each model's own (its training size)
    imgsz: int | None = None
    #: CPU threads for both backends; None = torch's default (all cores)
    threads: int | None = None
    #: cpu, cuda or both (cpu,cuda); cuda rows appear only where a GPU (or ORT CUDA provider) is
    devices: tuple[str, ...] = DEVICES
    #: seed of the random input batch
    seed: int = 0
    #: also time every operator of each ONNX / OpenVINO file (first batch size): where a pass's time goes
    profile: bool = False

    def __post_init__(self) -> None:
        """Bad values fail before any model is loaded; 0 is an error, never "the default"."""
        if not self.batches or any(b < 1 for b in self.batches):
            raise UserError(f"--batch sizes must be >= 1, got {','.join(map(str, self.batches))}")
        if self.runs < 1 or self.warmup < 0 or self.rounds < 1:
            raise UserError(f"--runs and --rounds must be >= 1 and --warmup >= 0, got {self.runs}, {self.rounds} "
                            f"and {self.warmup}")
        check_imgsz(self.imgsz)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class LatencyRow:
    """One measurement: artifact x backend x device x batch."""

    artifact: str
    backend: str
    device: str
    batch: int
    imgsz: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float                  # images / s at the median latency
    size_bytes: int
    speedup: float | None = None       # vs the baseline artifact, same backend/device/batch
    speedup_vs_fp32_onnx: float | None = None
    extra: dict = field(default_factory=dict)


def time_fn(fn: Callable[[], object], runs: int, warmup: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones (``sync`` waits for the GPU)."""
    if runs < 1 or warmup < 0:
        raise UserError(f"latency needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms: list[float], batch: int) -> dict:
    """Median, p90 (nearest rank), mean and images/s of one row's timings."""
    s = sorted(times_ms)
    p90 = s[min(len(s) - 1, max(0, -(-9 * len(s) // 10) - 1))]
    med = statistics.median(s)
    return {"median_ms": med, "p90_ms": p90, "mean_ms": statistics.fmean(s), "throughput": batch * 1e3 / med}


def _torch_devices(devices: tuple[str, ...]) -> list[str]:
    return [d for d in devices if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]


def _ort_providers(devices: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    import onnxruntime as ort  # heavy: imported when ONNX rows are measured, not at CLI start-up
    have = ort.get_available_providers()
    out = [("cpu", ["CPUExecutionProvider"])] if "cpu" in devices else []
    if "cuda" in devices and "CUDAExecutionProvider" in have and torch.cuda.is_available():
        out.append(("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    return out


def _imgsz(meta: dict, cfg: LatencyConfig) -> int:
    size = cfg.imgsz if cfg.imgsz is not None else \
        meta.get("imgsz") or (meta.get("policy") or {}).get("imgsz") or 640
    return int(size)


@dataclass
class _Probe:
    """One row to be timed: its loaded model called on its input, and the row's fixed fields."""

    row: dict
    call: Callable[[], object]
    sync: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)


def _batch(cfg: LatencyConfig, b: int, imgsz: int, device: str = "cpu") -> torch.Tensor:
    return torch.rand(b, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(cfg.seed)).to(device)


def _infer(model: torch.nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


def _torch_probes(path: Path, cfg: LatencyConfig) -> list[_Probe]:
    model, meta = load_model(path)
    imgsz = _imgsz(meta, cfg)
    probes = []
    for device in _torch_devices(cfg.devices):
        m = (model if device == "cpu" else copy.deepcopy(model).to(device)).eval()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for b in cfg.batches:
            call = partial(_infer, m, _batch(cfg, b, imgsz, device))
            probes.append(_Probe(dict(artifact=str(path), backend="pytorch", device=device, batch=b, imgsz=imgsz,
                                      size_bytes=path.stat().st_size,
                                      extra={"compressed": bool(meta.get("compressed"))}), call, sync))
    return probes


def _artifact_info(meta: dict) -> dict:
    return {"precision": meta.get("precision"), "decode": meta.get("decode", "graph")}


def _onnx_probes(path: Path, cfg: LatencyConfig) -> list[_Probe]:
    probes = []
    for device, providers in _ort_providers(cfg.devices):
        det = OnnxDetector(path, threads=cfg.threads, providers=providers)
        imgsz = _imgsz(det.meta, cfg)
        for b in cfg.batches:  # the session, and a host decode
            probes.append(_Probe(dict(artifact=str(path), backend="onnxruntime", device=device, batch=b, imgsz=imgsz,
                                      size_bytes=path.stat().st_size, extra=_artifact_info(det.meta)),
                                 partial(det, _batch(cfg, b, imgsz))))
    return probes


def _openvino_probes(path: Path, cfg: LatencyConfig) -> list[_Probe]:
    """CPU rows of an OpenVINO IR, each batch on the IR compiled for that static shape (as deployed)."""
    if "cpu" not in cfg.devices:
        return []
    det = OpenVinoDetector(path, threads=cfg.threads)
    imgsz = _imgsz(det.meta, cfg)
    size = path.stat().st_size + bin_path(path).stat().st_size
    return [_Probe(dict(artifact=str(path), backend="openvino", device="cpu", batch=b, imgsz=imgsz, size_bytes=size,
                        extra=_artifact_info(det.meta)), partial(det, _batch(cfg, b, imgsz)))
            for b in cfg.batches]  # the request, and a host decode


def _probes(path: str | Path, cfg: LatencyConfig) -> list[_Probe]:
    """``.onnx`` on onnxruntime, ``.xml`` on OpenVINO, anything else on PyTorch."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx_probes(path, cfg)
    return _openvino_probes(path, cfg) if suffix == OV_SUFFIX else _torch_probes(path, cfg)


def _time(paths: list, cfg: LatencyConfig) -> list[LatencyRow]:
    """Load every artifact, then time the rows in ``cfg.rounds`` passes over all of them (see LatencyConfig)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        probes = [p for a in paths for p in _probes(a, cfg)]
        rounds = min(cfg.rounds, cfg.runs)
        for r in range(rounds):
            runs = cfg.runs // rounds + (r < cfg.runs % rounds)
            for p in probes:  # after the first pass one untimed call re-warms caches the other models used
                p.times += time_fn(p.call, runs, cfg.warmup if r == 0 else min(cfg.warmup, 1), p.sync)
    finally:
        torch.set_num_threads(threads)
    return [LatencyRow(**p.row, **summarize(p.times, p.row["batch"])) for p in probes]


def measure(path: str | Path, cfg: LatencyConfig | None = None) -> list[LatencyRow]:
    """Rows for one artifact: ``.onnx`` on onnxruntime, ``.xml`` on OpenVINO, anything else on PyTorch."""
    return _time([path], cfg or LatencyConfig())


def benchmark(artifacts: list[str | Path], cfg: LatencyConfig | None = None) -> list[LatencyRow]:
    """Measure every artifact; each backend's first artifact is the baseline its speed-ups are taken against."""
    if not artifacts:
        raise UserError("benchmark needs at least one model file")
    cfg = cfg or LatencyConfig()
    rows = _time(list(artifacts), cfg)
    first_onnx = next((str(Path(a)) for a in artifacts if str(a).lower().endswith(".onnx")), None)
    ref = {(r.artifact, r.backend, r.device, r.batch): r.median_ms for r in rows}
    first = {}
    for r in rows:
        first.setdefault(r.backend, r.artifact)
    for r in rows:
        base = ref.get((first[r.backend], r.backend, r.device, r.batch))
        fp32 = ref.get((first_onnx, "onnxruntime", r.device, r.batch))
        r.speedup = base / r.median_ms if base else None
        r.speedup_vs_fp32_onnx = fp32 / r.median_ms if fp32 else None
    return rows


def machine(threads: int | None = None) -> dict:
    """What the numbers were measured on (they only compare within one machine)."""
    import onnxruntime as ort  # heavy: imported when a benchmark runs, not at CLI start-up
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": threads if threads is not None else torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}
    try:
        import openvino
        info["openvino"] = openvino.__version__
    except ImportError:
        pass
    info["cpu"] = cpu_label()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_rows(rows: list[LatencyRow]) -> str:
    """A fixed-width table: one line per row."""
    head = (f"{'artifact':32} {'backend':11} {'dev':4} {'batch':>5} {'px':>4} {'median ms':>10} {'p90 ms':>9} "
            f"{'img/s':>8} {'MB':>7} {'speed-up':>8} {'vs fp32 ONNX':>12}")
    lines = [head]
    for r in rows:
        su = f"{r.speedup:.2f}x" if r.speedup else "-"
        so = f"{r.speedup_vs_fp32_onnx:.2f}x" if r.speedup_vs_fp32_onnx else "-"
        lines.append(f"{Path(r.artifact).name[:32]:32} {r.backend:11} {r.device:4} {r.batch:5d} {r.imgsz:4d} "
                     f"{r.median_ms:10.2f} {r.p90_ms:9.2f} {r.throughput:8.1f} {r.size_bytes / 1e6:7.2f} "
                     f"{su:>8} {so:>12}")
    return "\n".join(lines)
