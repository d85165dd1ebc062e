"""One training path for every detector: an ultralytics ``DetectionTrainer`` subclass.

Why a subclass: the stock trainer rebuilds the model from its YAML (which
would drop pruned tensors later), saves fp16 pickles, and lets integration
callbacks (MLflow among them) start and end runs on their own. Here the
model object we pass is trained as is, checkpoints are our fp32 format, and
only our tracker logs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer

from rsdet_compress.atomic import write_json
from rsdet_compress.data.config import DataConfig, load_data_config
from rsdet_compress.detectors.checkpoint import save_detector
from rsdet_compress.detectors.factory import create_detector
from rsdet_compress.engine.augment import REPLACED_HYP, overhead_augmentations
from rsdet_compress.engine.scorer import check_imgsz, evaluate
from rsdet_compress.errors import UserError
from rsdet_compress.tracking.mlflow_tracker import DEFAULT_EXPERIMENT, Tracker

#: values of ``augment``: our overhead-imagery pipeline, or ultralytics' own defaults.
AUGMENTATIONS = ("overhead", "ultralytics")


@dataclass
class TrainConfig:
    """Training recipe. Every field can come from a YAML in configs/ or a CLI flag."""

    #: registered detector name.
    model: str = "skynet"
    #: dataset YAML: ``data prepare``'s, or any ultralytics data YAML (ground truth derived from its labels).
    data: str = ""
    #: local .pt to start from; None trains from scratch (nothing is ever downloaded).
    weights: str | None = None
    #: passes over the training chips.
    epochs: int = 30
    #: wall-clock cap in hours; ultralytics re-plans the epochs (and LR schedule) to fit it.
    time: float | None = None
    #: square training size; chips are made at this size by ``data prepare --tile``.
    imgsz: int = 640
    #: images per step; 16 fits a 2-core CPU's memory and keeps BN statistics stable.
    batch: int = 16
    #: ultralytics' "auto" picks AdamW for short runs and SGD for long ones.
    optimizer: str = "auto"
    #: initial learning rate (ignored by optimizer=auto, which fits it to the run length).
    lr0: float = 0.01
    #: cosine LR decay instead of linear.
    cos_lr: bool = False
    #: warm-up epochs (linear LR ramp); short runs need fewer.
    warmup_epochs: float = 3.0
    #: mosaic probability; four chips per sample adds context and small-object density.
    mosaic: float = 1.0
    #: turn mosaic off for the last N epochs so training ends on real chip statistics.
    close_mosaic: int = 5
    #: "overhead" (flips, rot90, scale, colour via albumentations) or "ultralytics" (its defaults).
    augment: str = "overhead"
    #: relative scale jitter of the overhead pipeline (GSD varies little within a sensor).
    aug_scale: float = 0.25
    #: epochs without val improvement before stopping early.
    patience: int = 100
    #: seeds python, numpy and torch; deterministic algorithms are requested.
    seed: int = 0
    #: "cpu", "0" (first GPU)...
    device: str = "cpu"
    #: data-loader workers (ultralytics forces 0 on CPU, where loading is not the bottleneck).
    workers: int = 2
    #: fraction of the training chips to use (quick experiments and tests).
    fraction: float = 1.0
    #: validate every epoch (ultralytics metrics); the final COCO evaluation always runs.
    val: bool = True
    #: output folder: weights/last.pt, weights/best.pt, metrics.json.
    out: str = "runs/train/skynet"
    #: MLflow experiment.
    experiment: str = DEFAULT_EXPERIMENT
    #: log to MLflow (--no-track: no logging).
    track: bool = True
    #: print ultralytics' per-batch progress.
    verbose: bool = True

    def check(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"augment must be 'overhead' or 'ultralytics', got {self.augment!r}")
        if self.epochs < 1 or self.batch < 1:
            raise UserError(f"--epochs and --batch must be >= 1, got {self.epochs} and {self.batch}")
        check_imgsz(self.imgsz)  # the final evaluation needs the size the model trained at
        if self.time is not None and self.time <= 0:
            raise UserError(f"--time must be > 0 hours, got {self.time}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not self.data:
            raise UserError("no dataset given (--data DATA.yaml)")


def _is_integration(callback) -> bool:
    """ultralytics' own integration callbacks (MLflow, analytics, platform...): never run here."""
    module = getattr(callback, "__module__", "") or ""
    return module.startswith("ultralytics.") and module != "ultralytics.utils.callbacks.base"


class DetectorTrainer(DetectionTrainer):
    """Trains the given model object; fp32 checkpoints in our format; our MLflow logging only."""

    def __init__(self, model, overrides: dict, tracker: Tracker | None = None, meta: dict | None = None):
        threads = torch.get_num_threads()
        super().__init__(overrides=overrides)
        # ultralytics' select_device sets cpu_count - 1 threads, leaving a core to data-loader workers; on CPU
        # it runs none, so a 2-core machine trained on one core (18 -> 13 s per 640 px batch of 16 with both).
        torch.set_num_threads(threads)
        self.model = model  # a module, so setup_model() keeps it instead of rebuilding from YAML
        self.tracker = tracker
        self.meta = meta or {}
        self.history: list[dict] = []
        self.add_callback("on_fit_epoch_end", DetectorTrainer._log_epoch)

    def run_callbacks(self, event: str) -> None:
        for cb in self.callbacks.get(event, []):
            if not _is_integration(cb):
                cb(self)

    def get_model(self, cfg=None, weights=None, verbose=True):
        return self.model

    @staticmethod
    def _log_epoch(trainer: DetectorTrainer) -> None:
        row = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **(trainer.metrics or {}),
               **getattr(trainer, "lr", {})}
        row = {k: float(v) for k, v in row.items()}
        trainer.history.append({"epoch": trainer.epoch + 1, **row})
        if trainer.tracker is not None:
            trainer.tracker.log_metrics(row, step=trainer.epoch + 1)

    def save_model(self) -> bool:
        """Write last.pt (and best.pt on improvement) from the EMA weights, fp32, our format."""
        meta = {**self.meta, "epoch": self.epoch + 1, "fitness": float(self.fitness or 0.0)}
        model = self.model_to_save()
        save_detector(model, self.last, meta)
        if self.best_fitness == self.fitness:
            save_detector(model, self.best, meta)
        return True

    def model_to_save(self) -> nn.Module:
        """The module ``save_model`` writes: the EMA weights."""
        return self.ema.ema

    def final_eval(self) -> None:
        """Skipped: the caller scores best.pt with the COCO evaluator instead."""


def _overrides(cfg: TrainConfig, data: DataConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    o = dict(model=cfg.model, data=str(data.ultralytics_yaml(out)), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
             optimizer=cfg.optimizer, lr0=cfg.lr0, cos_lr=cfg.cos_lr, warmup_epochs=cfg.warmup_epochs,
             mosaic=cfg.mosaic, close_mosaic=cfg.close_mosaic, patience=cfg.patience, seed=cfg.seed,
             deterministic=True, device=cfg.device, workers=cfg.workers, fraction=cfg.fraction, val=cfg.val,
             project=str(out.parent.resolve()), name=out.name, exist_ok=True, plots=False,
             verbose=cfg.verbose, amp=cfg.device != "cpu")
    if cfg.time is not None:
        o["time"] = cfg.time
    if cfg.augment == "overhead":
        o.update(REPLACED_HYP, augmentations=overhead_augmentations(scale=cfg.aug_scale))
    return o


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; score best.pt with COCO mAP on the val split.

    Returns a summary dict (weights path, final metrics, per-epoch history,
    training seconds), also written to ``out/metrics.json``.
    """
    cfg.check()
    data = load_data_config(cfg.data)
    tracker = Tracker(cfg.experiment, enabled=cfg.track).check()  # a dead store fails here, not after training
    # ultralytics seeds only once its trainer exists, after the model is built: without this the initial
    # weights depended on whatever drew from torch's generator earlier in the process (test order, say).
    torch.manual_seed(cfg.seed)
    model = create_detector(cfg.model, len(data.names), weights=cfg.weights, names=data.names)
    if cfg.device == "cpu":  # ultralytics uses channels_last on CUDA only; on CPU it is 1.5-2x faster too
        model = model.to(memory_format=torch.channels_last)
    out = Path(cfg.out)
    meta = {"imgsz": cfg.imgsz, "rescale": data.rescale, "tile": data.prep.get("tile"),
            "data": str(data.yaml_path.resolve()), "seed": cfg.seed}
    summary_json = data.yaml_path.parent / "summary.json"
    with tracker.run(f"train-{cfg.model}", params={**asdict(cfg), "data_prep": data.prep},
                     tags={"stage": "train", "detector": cfg.model}) as run_id:
        trainer = DetectorTrainer(model, _overrides(cfg, data, out), tracker, meta)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
        weights = trainer.best if trainer.best.is_file() else trainer.last
        final = evaluate(weights, data.yaml_path, split="val", imgsz=cfg.imgsz, device=cfg.device)
        result = {"weights": str(weights), "train_seconds": round(seconds, 1),
                  "epochs_run": len(trainer.history), "final": final, "history": trainer.history,
                  "mlflow_run_id": run_id}
        write_json(out / "metrics.json", result)  # the result first: logging below may fail, it must not cost this
        tracker.log_metrics({"final": {k: v for k, v in final.items() if not isinstance(v, dict)},
                             "train_seconds": seconds})
        tracker.log_artifact(weights, "weights")
        if summary_json.is_file():
            tracker.log_artifact(summary_json, "dataset")
    if tracker.warning():
        print(tracker.warning(), file=sys.stderr)
    return result
