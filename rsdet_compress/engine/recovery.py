"""``recover``: post-training recovery of a compressed checkpoint by block reconstruction against its float model.

Reads the compressed checkpoint and the float weights it records (checked by
fingerprint), draws training chips, fits layer after layer
(:mod:`rsdet_compress.compress.reconstruct`), writes a checkpoint of the same
structure and bit-widths (checked after reload, as ``finetune`` does), and
scores val mAP before and after. One MLflow run, a child of the search run
when the policy came from one, with each layer's output error before/after.
Every input is checked before any work starts.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from rsdet_compress.compress.policy import fingerprint
from rsdet_compress.compress.reconstruct import ReconstructConfig, activation_bytes, reconstruct
from rsdet_compress.compress.units import build_units
from rsdet_compress.compress.view import CompressibleView
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet, load_coco
from rsdet_compress.detectors.checkpoint import check_classes, load_float_detector, save_detector
from rsdet_compress.engine.evaluator import Evaluator, torch_device
from rsdet_compress.engine.finetune import structure
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.tracking.mlflow_tracker import DEFAULT_EXPERIMENT, PARENT_TAG, Tracker

#: share of the free memory the cached activations may take (the models, batches and gradients need the rest)
MEMORY_SHARE = 0.6
#: fewer chips than this cannot pin down a layer's output (BRECQ/QDrop use 1024; AdaRound shows 256 suffice).
MIN_IMAGES = 16


@dataclass
class RecoverConfig(ReconstructConfig):
    """A recovery run: what to recover, on which chips, within what time. Flags of ``recover``."""

    #: compressed checkpoint (``rsdet-compress compress``); a float checkpoint is refused.
    weights: str = ""
    #: dataset YAML (``data prepare``'s or any ultralytics one): chips come from its training split only.
    data: str = ""
    #: training chips to fit on, drawn at random (seeded); all of them are held in memory with their activations.
    images: int = 256
    #: wall-clock budget in minutes, shared out over the layers by their step cost (None: every layer gets ``iters``).
    budget_minutes: float | None = None
    #: output checkpoint; default ``<weights stem>.recovered.pt`` beside the input.
    out: str | None = None
    #: "cpu", "0" (first GPU)...
    device: str = "cpu"
    #: score val mAP before and after (the check that the recovery helped; costs two evaluations).
    val: bool = True
    #: MLflow experiment.
    experiment: str = DEFAULT_EXPERIMENT
    #: log to MLflow (--no-track: no logging).
    track: bool = True
    #: MLflow run to log under; default: the search run recorded in the policy, if any.
    parent_run: str | None = None

    def check(self) -> None:
        if not self.weights:
            raise UserError("no compressed checkpoint given (--weights)")
        if not self.data:
            raise UserError("no dataset given (--data DATA.yaml)")
        if self.images < MIN_IMAGES:
            raise UserError(f"--images must be >= {MIN_IMAGES}, got {self.images}")
        if self.iters < 0 or self.batch < 1 or self.probe_images < 1:
            raise UserError(f"--iters must be >= 0, --batch and --probe-images >= 1, got {self.iters}, {self.batch} "
                            f"and {self.probe_images}")
        if self.lr < 0 or self.bias_lr < 0 or not 0.0 <= self.drop < 1.0:
            raise UserError("--lr and --bias-lr must be >= 0, --drop in [0, 1)")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise UserError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if not self.range_factors or any(not 0.0 < f <= 1.0 for f in self.range_factors):
            raise UserError(f"--range-factors must be in (0, 1], got {list(self.range_factors)}")
        if not self.weight_clip_factors or any(not 0.0 < f <= 1.0 for f in self.weight_clip_factors):
            raise UserError(f"--weight-clip-factors must be in (0, 1], got {list(self.weight_clip_factors)}")

    def reconstruct_config(self) -> ReconstructConfig:
        return ReconstructConfig(**{f.name: getattr(self, f.name) for f in fields(ReconstructConfig)})


def default_out(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + ".recovered.pt")


def training_chips(data_yaml: Path, imgsz: int, n: int, seed: int) -> EvalSet:
    """``n`` training chips drawn at random (seeded); too few in the split is an error."""
    cfg = load_data_config(data_yaml)
    coco_path = cfg.split_coco("train")
    ids = sorted(load_coco(coco_path).getImgIds())
    if len(ids) < n:
        raise UserError(f"{data_yaml}: the 'train' split has {len(ids)} chips, fewer than --images {n} "
                        f"(give --images {len(ids)} or fewer, at least {MIN_IMAGES})")
    chosen = sorted(random.Random(seed).sample(ids, n))
    return EvalSet.from_coco(coco_path, cfg.split_images("train"), imgsz, image_ids=chosen)


def _load(cfg: RecoverConfig):
    """The compressed model, its float original and metadata; every refusal before any work."""
    weights = Path(cfg.weights)
    if not weights.is_file():
        raise UserError(f"{weights}: checkpoint not found")
    model, meta = load_detector(weights)
    policy = getattr(model, "policy", None)
    if not meta.get("compressed") or policy is None:
        raise UserError(f"{weights}: not a compressed checkpoint; recovery fits a compressed model to its float "
                        "original (apply a policy first: rsdet-compress compress)")
    float_path = meta.get("float_weights")
    if not float_path or not Path(float_path).is_file():
        raise UserError(f"{weights}: the float weights it was compressed from ({float_path or 'not recorded'}) "
                        "are not there; recovery needs them as its target")
    float_model, _ = load_float_detector(float_path)
    if meta.get("float_fingerprint") and fingerprint(float_model) != meta["float_fingerprint"]:
        raise UserError(f"{float_path}: not the float weights {weights} was compressed from (fingerprint differs)")
    data = load_data_config(cfg.data)
    check_classes(meta, data.names, weights, cfg.data)
    return model, meta, float_model, policy, data


def recover(cfg: RecoverConfig | None = None, **kwargs) -> dict:
    """Recover a compressed checkpoint by block reconstruction; returns the report (also in the checkpoint).

    ``recover(weights="c.pt", data="data.yaml")`` or ``recover(RecoverConfig(...))``. The report
    holds ``weights`` (written), ``layers`` (per-layer error before/after), ``seconds``, and
    ``before`` / ``after`` val metrics when ``cfg.val``.
    """
    cfg = cfg or RecoverConfig(**kwargs)
    cfg.check()
    out = Path(cfg.out) if cfg.out else default_out(cfg.weights)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the recovered checkpoint's file name")
    if out.resolve() == Path(cfg.weights).resolve():
        raise UserError(f"{out}: would overwrite the input checkpoint; give another --out")
    tracker = Tracker(cfg.experiment, enabled=cfg.track).check()
    model, meta, float_model, policy, data = _load(cfg)
    imgsz = int(policy.imgsz or meta.get("imgsz") or 640)
    chips = training_chips(data.yaml_path, imgsz, cfg.images, cfg.seed)
    device = torch_device(cfg.device)
    view = CompressibleView(float_model, imgsz=imgsz)  # rewrites split blocks as the compressed model has them
    model.to(device)
    float_model.to(device)
    units = build_units(view.model, model, view, policy)
    need = activation_bytes(units, imgsz, cfg.images, cfg.cache_dtype) + chips.images.numel() * 4
    free = psutil.virtual_memory().available
    if need > MEMORY_SHARE * free:
        fit = max(1, int(cfg.images * MEMORY_SHARE * free / need))
        raise UserError(f"--images {cfg.images} at {imgsz} px would hold ~{need / 2**30:.1f} GiB of activations, "
                        f"more than {MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free; give --images {fit} "
                        "or fewer")
    before_structure = structure(model)
    evaluator = None
    if cfg.val:
        evalset = EvalSet.from_coco(data.split_coco("val"), data.split_images("val"), imgsz)
        evaluator = Evaluator(evalset, device=cfg.device)
    base = evaluator(model) if evaluator else None
    parent = cfg.parent_run or getattr(policy, "search_run", None)
    tags = {"stage": "recover", "detector": meta.get("detector", "")}
    if parent:
        tags[PARENT_TAG] = parent
    params = asdict(cfg)
    images = chips.images.to(device).float().div_(255)
    with tracker.run(f"recover-{meta.get('detector', '')}", params=params, tags=tags) as run_id:
        bar = tqdm(total=len(units), desc="recover", unit="layer", disable=None, file=sys.stderr)

        def progress(row: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{row['layer']} err {row['error_before']:.3g}->{row['error_after']:.3g}")
            step = int(row["layer"].rsplit(".", 1)[-1])
            tracker.log_metrics({"error_before": row["error_before"], "error_after": row["error_after"]}, step=step)

        t0 = time.time()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                rows = reconstruct(units, images, cfg.reconstruct_config(),
                                   budget_seconds=cfg.budget_minutes * 60 if cfg.budget_minutes else None,
                                   progress=progress)
        finally:
            bar.close()
        seconds = time.time() - t0
        del images
        report = {"weights": str(out), "source": str(cfg.weights), "float_weights": meta.get("float_weights"),
                  "images": len(chips), "cache_gib": round(need / 2**30, 4), "seconds": round(seconds, 1),
                  "layers": rows,
                  "config": params, "mlflow_run_id": run_id, "parent_run": parent}
        keep = {k: v for k, v in meta.items() if k not in ("detector", "num_classes", "names", "compressed")}
        save_detector(model.cpu(), out, {**keep, "recovered": {k: v for k, v in report.items() if k != "weights"}})
        reloaded, _ = load_detector(out)
        after_structure = structure(reloaded)
        moved = sorted(n for n in before_structure if before_structure[n] != after_structure.get(n))
        if moved or set(after_structure) != set(before_structure):
            raise UserError(f"{out}: recovery changed the compressed structure at {', '.join(moved[:5])}")
        report["structure_kept"] = True
        if evaluator:
            report["before"], report["after"] = base, evaluator(reloaded.to(device))
            tracker.log_metrics({"before": _scalars(base), "after": _scalars(report["after"])})
        tracker.log_metrics({"seconds": seconds})
        tracker.log_dict({"layers": rows}, "recover_layers.json")
    if tracker.warning():
        print(tracker.warning(), file=sys.stderr)
    return report


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
