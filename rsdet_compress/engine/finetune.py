"""Quantization-aware fine-tuning of a compressed checkpoint, keeping its structure, with optional distillation.

The compressed model object (physically pruned convs, fake-quantized
``QConv2d`` layers, skipped blocks) goes through the same
:class:`~rsdet_compress.engine.trainer.DetectorTrainer` as training from
scratch: no YAML rebuild, fp32 checkpoints, our MLflow logging only. Weight
fake quantization recomputes its scale from the weights on every step
(straight-through gradients), so the bit-widths hold by construction;
``structure`` records every conv's shape and bits before and after, and the
run fails if anything moved.

Distillation (``teacher``): the float detector the policy was applied to
teaches the compressed one on the same augmented batches. Classification:
BCE of the student's logits against the teacher's sigmoid scores on every
anchor. Boxes: KL divergence of the student's DFL bin distributions from the
teacher's, weighted by the teacher's top class score, so only anchors the
teacher sees an object at teach localisation (the idea of localisation
distillation, LD). The sum, times ``distill``, is a fourth loss term ``kd``.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.quant import QConv2d, bake_weight_steps, learn_weight_steps
from rsdet_compress.data.config import load_data_config
from rsdet_compress.detectors.checkpoint import check_classes, save_detector
from rsdet_compress.engine.scorer import evaluate
from rsdet_compress.engine.trainer import DetectorTrainer, TrainConfig, _overrides
from rsdet_compress.errors import UserError
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.tracking.mlflow_tracker import (
    DEFAULT_EXPERIMENT,
    PARENT_TAG,
    Tracker,
)


@dataclass
class FinetuneConfig:
    """QAT recipe. Every field can come from a YAML in configs/ or a CLI flag."""

    #: compressed checkpoint (``rsdet-compress compress``); a float checkpoint is refused.
    weights: str = ""
    #: dataset YAML (``data prepare``'s or any ultralytics one) the detector was trained on.
    data: str = ""
    #: passes over the training chips; QAT recovers most of the loss in a few (HAQ fine-tunes briefly too).
    epochs: int = 10
    #: wall-clock cap in hours (ultralytics re-plans the epochs to fit it).
    time: float | None = None
    #: images per step; 16 fits a 2-core CPU and keeps BN statistics stable.
    batch: int = 16
    #: ultralytics optimizer; plain SGD by default: "auto" would pick a from-scratch learning rate for short runs.
    optimizer: str = "SGD"
    #: initial learning rate, a fifth of the from-scratch rate: the weights start trained, a large step jumps
    #: quantization grid cells.
    lr0: float = 0.002
    #: warm-up epochs; none by default: warm-up ramps the bias LR from 0.1, which would wreck trained biases.
    warmup_epochs: float = 0.0
    #: mosaic probability, less than training from scratch: the model already knows context; real chips dominate.
    mosaic: float = 0.5
    #: turn mosaic off for the last N epochs (plain chips).
    close_mosaic: int = 2
    #: float teacher weights for distillation; "" = none; "auto" = the float weights the checkpoint was made from.
    teacher: str = ""
    #: gain of the distillation term (box/cls/dfl gains are ultralytics' defaults 7.5/0.5/1.5).
    distill: float = 1.0
    #: keep BatchNorm layers on their running statistics (eval mode) while the weights train: batch statistics
    #: of 16 chips move every BN of a quantized model on each step, undoing a calibration or a ``recover`` fit.
    freeze_bn: bool = False
    #: learn each quantized channel's weight step (LSQ) instead of taking it from max|w| on every step; the
    #: learned grid is baked into the saved weights, so checkpoints and exports are unchanged. Off: after
    #: ``recover`` the steps barely move (its clip already set them) and it gained nothing on the test model.
    learn_steps: bool = False
    #: learning rate of the learned steps (own group, no weight decay): LSQ's rate. Their gradients are scaled
    #: by 1/sqrt(weights per channel x qmax), so at the weights' lr0 they would not move in a 3-epoch run.
    step_lr: float = 0.01
    #: when the fine-tuned model ends below its input on val mAP50, best.pt holds the input's weights instead (last.pt
    #: keeps the fine-tuned ones): a few epochs on a few hundred chips can undo a ``recover`` fit (see
    #: benchmarks/results/recovery_*.md); the val split decides, never the test split.
    keep_better: bool = True
    #: fraction of training chips (quick runs and tests).
    fraction: float = 1.0
    #: validate every epoch (ultralytics metrics); the final COCO evaluation always runs.
    val: bool = True
    #: seeds python, numpy and torch.
    seed: int = 0
    #: "cpu", "0" (first GPU)...
    device: str = "cpu"
    #: output folder: weights/last.pt, weights/best.pt, metrics.json.
    out: str = "runs/finetune/model"
    #: MLflow experiment.
    experiment: str = DEFAULT_EXPERIMENT
    #: log to MLflow (--no-track: no logging).
    track: bool = True
    #: MLflow run to log under; default: the search run recorded in the policy, if any.
    parent_run: str | None = None
    #: print ultralytics' per-batch progress.
    verbose: bool = False

    def check(self) -> None:
        if not self.weights:
            raise UserError("no compressed checkpoint given (--weights)")
        if not self.data:
            raise UserError("no dataset given (--data DATA.yaml)")
        if self.epochs < 1 or self.batch < 1 or self.distill < 0:
            raise UserError("epochs and batch must be >= 1, distill >= 0")
        if self.step_lr <= 0:
            raise UserError(f"--step-lr must be > 0, got {self.step_lr}")
        if self.time is not None and self.time <= 0:
            raise UserError(f"--time must be > 0 hours, got {self.time}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")


def structure(model: nn.Module) -> dict[str, dict]:
    """Every conv's weight shape, and weight/activation bits of quantized ones: what fine-tuning must keep."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            row = {"shape": list(m.weight.shape)}
            if isinstance(m, QConv2d):
                row["weight_bits"] = m.w_bits.tolist()
                row["act_bits"] = int(m.act_quant.bits)
            out[name] = row
    return out


class DistillLoss:
    """The student's own detection loss plus ``gain`` x (class + localisation distillation from ``teacher``)."""

    def __init__(self, base, teacher: nn.Module, gain: float) -> None:
        self.base, self.teacher, self.gain = base, teacher.eval(), gain

    @staticmethod
    def _outputs(preds):
        return preds[1] if isinstance(preds, tuple) else preds

    def __call__(self, preds, batch: dict):
        loss, items = self.base(preds, batch)
        s = self._outputs(preds)
        with torch.no_grad():
            t = self._outputs(self.teacher(batch["img"]))
        kd = self.kd(s, t)
        bs = s["scores"].shape[0]
        return torch.cat([loss, (self.gain * kd * bs).reshape(1)]), {**items, "kd": (self.gain * kd).detach()}

    @staticmethod
    def kd(s: dict, t: dict) -> torch.Tensor:
        """Distillation between raw head outputs: ``scores`` (B, nc, N) logits, ``boxes`` (B, 4*reg_max, N)."""
        cls = nn.functional.binary_cross_entropy_with_logits(s["scores"].float(), t["scores"].float().sigmoid())
        b, c, n = s["boxes"].shape
        reg = c // 4
        s_log = s["boxes"].float().view(b, 4, reg, n).log_softmax(2)
        t_prob = t["boxes"].float().view(b, 4, reg, n).softmax(2)
        kl = (t_prob * (t_prob.clamp_min(1e-9).log() - s_log)).sum(2).mean(1)  # (B, N)
        w = t["scores"].float().sigmoid().amax(1)  # (B, N): teacher's confidence that an object is there
        return cls + (kl * w).sum() / w.sum().clamp_min(1.0)


class FinetuneTrainer(DetectorTrainer):
    """DetectorTrainer whose loss gets a distillation term (when a teacher is given)."""

    def __init__(self, model, overrides: dict, tracker=None, meta=None, teacher: nn.Module | None = None,
                 gain: float = 1.0, freeze_bn: bool = False, step_lr: float = 0.01):
        super().__init__(model, overrides, tracker, meta)
        self.teacher, self.gain, self.freeze_bn, self.step_lr = teacher, gain, freeze_bn, step_lr

    def build_optimizer(self, model, *args, **kwargs):
        """Ultralytics' optimizer, with learned weight steps (if any) moved to a group of their own."""
        opt = super().build_optimizer(model, *args, **kwargs)
        steps = {id(m.weight_step): m.weight_step for m in model.modules()
                 if getattr(m, "weight_step", None) is not None}
        if steps:
            for group in opt.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in steps]
            opt.add_param_group({"params": list(steps.values()), "lr": self.step_lr, "weight_decay": 0.0})
        return opt

    def model_to_save(self) -> nn.Module:
        """The EMA weights, with learned weight steps (if any) baked in: a plain compressed checkpoint."""
        ema = self.ema.ema
        if not any(getattr(m, "weight_step", None) is not None for m in ema.modules()):
            return ema
        baked = copy.deepcopy(ema)
        bake_weight_steps(baked)
        return baked

    def _model_train(self):
        """Train mode at each epoch's start; with ``freeze_bn`` every BatchNorm stays on its running statistics."""
        super()._model_train()
        if self.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _setup_train(self):
        super()._setup_train()
        if self.teacher is not None:
            self.teacher.to(self.device)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.model.criterion = DistillLoss(self.model.init_criterion(), self.teacher, self.gain)


def _teacher(path: str, student_meta: dict) -> nn.Module:
    teacher, meta = load_detector(path)
    if meta.get("compressed"):
        raise UserError(f"{path}: the teacher must be a float checkpoint, not a compressed one")
    if meta.get("detector") != student_meta.get("detector") or meta.get("num_classes") != student_meta.get(
            "num_classes"):
        raise UserError(f"{path}: teacher is {meta.get('detector')} with {meta.get('num_classes')} classes; "
                        f"the student is {student_meta.get('detector')} with {student_meta.get('num_classes')}")
    return teacher.float().eval()


def _keep_input(src: str, dst: Path, save_meta: dict, base: dict, tuned: dict) -> Path:
    """Write the input checkpoint's weights as ``dst``, recording why (the fine-tune lowered val mAP50)."""
    model, _ = load_detector(src)
    scores = {"input_val_map50": base["map50"], "finetuned_val_map50": tuned["map50"]}
    return save_detector(model, dst, {**save_meta, "finetune_not_kept": scores})


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune a compressed checkpoint with fake quantization on; returns a summary (also ``out/metrics.json``).

    Scores the input and the fine-tuned model with COCO mAP on the val split,
    and raises if any conv's shape or bit-width changed.
    """
    cfg.check()
    tracker = Tracker(cfg.experiment, enabled=cfg.track).check()  # a dead store fails here, not after training
    model, meta = load_detector(cfg.weights)
    policy = getattr(model, "policy", None)
    if not meta.get("compressed") or policy is None:
        raise UserError(f"{cfg.weights}: not a compressed checkpoint; apply a policy first (rsdet-compress compress)"
                        " or train it with rsdet-compress train")
    data = load_data_config(cfg.data)
    check_classes(meta, data.names, cfg.weights, cfg.data)
    teacher_path = meta.get("float_weights", "") if cfg.teacher == "auto" else cfg.teacher
    if cfg.teacher == "auto" and not (teacher_path and Path(teacher_path).is_file()):
        raise UserError(f"{cfg.weights}: --teacher auto: the float weights it was compressed from "
                        f"({teacher_path or 'not recorded'}) are not there; give --teacher FLOAT.pt")
    teacher = _teacher(teacher_path, meta) if teacher_path else None
    before = structure(model)
    steps = learn_weight_steps(model) if cfg.learn_steps else []
    imgsz = int(meta.get("imgsz") or 640)
    out = Path(cfg.out)
    tcfg = TrainConfig(model=meta.get("detector", ""), data=cfg.data, epochs=cfg.epochs, time=cfg.time, imgsz=imgsz,
                       batch=cfg.batch, optimizer=cfg.optimizer, lr0=cfg.lr0, warmup_epochs=cfg.warmup_epochs,
                       mosaic=cfg.mosaic, close_mosaic=cfg.close_mosaic, seed=cfg.seed, device=cfg.device,
                       fraction=cfg.fraction, val=cfg.val, out=str(out), verbose=cfg.verbose)
    save_meta = {**{k: v for k, v in meta.items() if k not in ("detector", "num_classes", "names", "compressed")},
                 "finetuned_from": str(Path(cfg.weights).resolve()), "distilled_from": teacher_path or None}
    parent = cfg.parent_run or getattr(policy, "search_run", None)
    tags = {"stage": "finetune", "detector": meta.get("detector", "")}
    if parent:
        tags[PARENT_TAG] = parent
    base = evaluate(cfg.weights, data.yaml_path, split="val", imgsz=imgsz, device=cfg.device)
    with tracker.run(f"finetune-{meta.get('detector', '')}", params=asdict(cfg), tags=tags) as run_id:
        trainer = FinetuneTrainer(model, _overrides(tcfg, data, out), tracker, save_meta, teacher, cfg.distill,
                                  cfg.freeze_bn, cfg.step_lr)
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
        weights = trainer.best if trainer.best.is_file() else trainer.last
        tuned, _ = load_detector(weights)
        after = structure(tuned)
        moved = sorted(n for n in before if before[n] != after.get(n))
        if moved or set(after) != set(before):
            raise UserError(f"{weights}: fine-tuning changed the compressed structure at {', '.join(moved[:5])}")
        final = evaluate(weights, data.yaml_path, split="val", imgsz=imgsz, device=cfg.device)
        tuned_final, kept_input = final, cfg.keep_better and final["map50"] < base["map50"]
        if kept_input:
            weights = _keep_input(cfg.weights, out / "weights" / "best.pt", save_meta, base, final)
            final = base
            print(f"finetune: val mAP50 fell from {base['map50']:.4f} to {tuned_final['map50']:.4f}; {weights} "
                  "holds the input's weights (the fine-tuned ones are in last.pt; --no-keep-better keeps them)",
                  file=sys.stderr)
        result = {"weights": str(weights), "train_seconds": round(seconds, 1), "epochs_run": len(trainer.history),
                  "before": base, "final": final, "kept_input": kept_input, "tuned_final": tuned_final,
                  "history": trainer.history, "mlflow_run_id": run_id,
                  "parent_run": parent, "structure_kept": True, "learned_step_convs": len(steps)}
        write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))  # before logging, which may fail
        scalar = {k: v for k, v in final.items() if not isinstance(v, dict)}
        tracker.log_metrics({"final": scalar, "before": {k: v for k, v in base.items() if not isinstance(v, dict)},
                             "train_seconds": seconds})
        tracker.log_artifact(weights, "weights")
    if tracker.warning():
        print(tracker.warning(), file=sys.stderr)
    return result
