"""Candidate evaluation for a search: reward chips decoded once, mAP after calibration (or recovery), timed.

The reward split is taken from the TRAINING chips (the reporting split is
never touched): a seeded shuffle of the training images gives ``calib``
chips for BN/activation calibration and a disjoint set of ``reward`` chips
scored with pycocotools. Both are decoded and letterboxed once per search.

Recovery modes (:data:`RECOVERY`): ``none`` scores the calibrated candidate;
``fast`` first runs a short block reconstruction
(:mod:`rsdet_compress.compress.reconstruct`) on the calibration chips, so the
reward is what the candidate will be worth after ``recover``, not the
near-zero mAP every aggressive candidate has after calibration alone.
"""
from __future__ import annotations

import random
import time

import torch

from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.reconstruct import ReconstructConfig, reconstruct
from rsdet_compress.compress.units import build_units
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet, load_coco
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.errors import UserError


def train_subsets(data_yaml: str, imgsz: int, calib: int, reward: int, seed: int = 0) -> tuple[EvalSet, EvalSet]:
    """(calibration set, reward set): disjoint, seeded samples of the training chips."""
    cfg = load_data_config(data_yaml)
    coco_json, image_dir = cfg.split_coco("train"), cfg.split_images("train")
    ids = sorted(load_coco(coco_json).getImgIds())
    if len(ids) < calib + reward:
        raise UserError(f"{data_yaml}: {len(ids)} training chips, fewer than --calib-images {calib} + "
                        f"--reward-images {reward}")
    random.Random(seed).shuffle(ids)
    return (EvalSet.from_coco(coco_json, image_dir, imgsz, image_ids=ids[:calib]),
            EvalSet.from_coco(coco_json, image_dir, imgsz, image_ids=ids[calib:calib + reward]))


#: candidate evaluation modes of ``search --recover``
RECOVERY = ("none", "fast")


#: chips a fast candidate's least squares, range searches and error checks run on: they cost most of its recovery,
#: and 16 gave the same reward as 32 in 58% of the time (YOLOv8n airbus w4a8p30: 0.431 vs 0.427 mAP50, 95 vs 163 s)
FAST_PROBE_IMAGES = 16


def fast_recovery(iters: int) -> ReconstructConfig:
    """The short reconstruction a search candidate gets: the recover defaults with ``iters`` steps per layer."""
    return ReconstructConfig(iters=iters, probe_images=FAST_PROBE_IMAGES)


def build_evaluator(settings: dict, ws: Workspace | None = None) -> CandidateEvaluator:
    """The candidate evaluator of a search with ``settings`` (``asdict(SearchConfig)``), in the driver or a worker.

    Pass the driver's ``ws`` to share it; its gradient set becomes the calibration chips (the
    importance scores need them).
    """
    ws = ws or Workspace.from_weights(settings["weights"])
    calib, reward = train_subsets(settings["data"], ws.view.imgsz, settings["calib_images"],
                                  settings["reward_images"], settings["seed"])
    ws.grad_set = calib
    recovery = fast_recovery(settings["recover_iters"]) if settings["recover"] == "fast" else None
    return CandidateEvaluator(ws, calib, reward, device=settings["device"], recovery=recovery)


class CandidateEvaluator:
    """``policy -> metrics``: apply to the shared float model, calibrate, (recover,) score on the reward chips."""

    def __init__(self, ws: Workspace, calib: EvalSet, reward: EvalSet, batch: int = 16, device: str = "cpu",
                 recovery: ReconstructConfig | None = None):
        self.ws, self.calib, self.recovery = ws, calib, recovery
        self.evaluator = Evaluator(reward, batch=batch, device=device)
        self.device = device
        self.seconds: list[float] = []
        #: the calibration chips as float 0..1 on the device, converted once for every recovered candidate
        self._recovery_images = calib.images.to(device).float().div_(255) if recovery is not None else None

    def __call__(self, policy: Policy) -> dict:
        t0 = time.perf_counter()
        # recovery trains the candidate's own tensors: it must not share them with the float model
        model = self.ws.apply(policy, self.calib, share_weights=self.recovery is None).to(self.device)
        extra = {}
        if self.recovery is not None:
            units = build_units(self.ws.view.model, model, self.ws.view, model.policy)
            rows = reconstruct(units, self._recovery_images, self.recovery)
            extra["recover_seconds"] = round(time.perf_counter() - t0, 2)
            extra["output_error"] = rows[-1]["error_after"]
        m = self.evaluator(model)
        self.seconds.append(time.perf_counter() - t0)
        return {"map50": m["map50"], "map50_95": m["map50_95"], "eval_seconds": self.seconds[-1], **extra}

    @torch.inference_mode()
    def forward_seconds(self, repeats: int = 2) -> float:
        """Bare batched forward pass of the float model over the reward chips (best of ``repeats``)."""
        model = self.ws.view.model.to(self.device).eval()
        es, batch = self.evaluator.evalset, self.evaluator.batch
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(es), batch):
                model(es.images[i:i + batch].to(self.device).float().div_(255))
            best = min(best, time.perf_counter() - t0)
        return best
