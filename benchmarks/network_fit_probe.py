"""Probe: a network-wise fit after `recover` (all parameters, MSE of the raw head outputs against the float model).

    python benchmarks/network_fit_probe.py RECOVERED.pt STEPS LR [CHIPS]

Airbus only (data path and 416 px fixed: a probe for SkyNet, not a tool). Layer-wise recovery
leaves SkyNet 2 points under fp32 on the very chips it fitted; this asks whether fitting the
whole network end to end on the same chips closes that. Prints val / test / fit-chip mAP50
before and after. Measured result and command in the issue-16 closing note of 2026-12-02.
"""
from __future__ import annotations

import sys
import time

import torch

from rsdet_compress.compress.reconstruct import _flat
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.engine.recovery import training_chips
from rsdet_compress.runtime.checkpoint import load_detector
from rsdet_compress.runtime.loader import load_model

DATA, IMGSZ, BATCH = "runs/data/airbus/data.yaml", 416, 8


def main() -> None:
    torch.manual_seed(0)
    rec, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 256  # recover's default chips, drawn with its seed
    model, meta = load_detector(rec)
    float_model, _ = load_model(meta["float_weights"])
    cfg = load_data_config(DATA)
    splits = {s: Evaluator(EvalSet.from_coco(cfg.split_coco(s), cfg.split_images(s), IMGSZ), batch=16)
              for s in ("val", "test")}
    chips = training_chips(DATA, IMGSZ, n, 0)
    fit = Evaluator(chips, batch=16)
    x = chips.images.float().div(255)
    float_model.eval()
    model.eval()  # BN statistics stay the recovered ones

    def report(tag: str) -> None:
        got = {s: round(e(model)["map50"], 4) for s, e in splits.items()}
        print(tag, got, "fit", round(fit(model)["map50"], 4), flush=True)
    with torch.no_grad():
        targets = [[t.half() for t in _flat(float_model(x[i:i + 16]))] for i in range(0, len(x), 16)]
    report("before")
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": others, "lr": lr * 10}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen).tolist()
        out = _flat(model(x[idx]))
        tgt = [torch.cat([targets[i // 16][k][i % 16:i % 16 + 1] for i in idx]).float() for k in range(len(out))]
        loss = sum(((o - t) ** 2).mean() / (t ** 2).mean() for o, t in zip(out, tgt, strict=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(step, float(loss.detach()), f"{time.time() - t0:.0f}s", flush=True)
    report(f"after {steps} steps at lr {lr}")


if __name__ == "__main__":
    main()
