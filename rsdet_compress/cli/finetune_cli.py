"""``rsdet-compress finetune``: quantization-aware fine-tuning of a compressed checkpoint."""
from __future__ import annotations

import argparse

from rsdet_compress.cli import add_trust_weights


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="QAT fine-tune a compressed checkpoint, keeping its pruned shapes and bits")
    p.add_argument("--config", help="fine-tune recipe YAML (configs/...); flags win")
    p.add_argument("--weights", help="compressed checkpoint (rsdet-compress compress)")
    p.add_argument("--data", help="dataset YAML the detector was trained on")
    p.add_argument("--epochs", type=int)
    p.add_argument("--time", type=float, help="wall-clock cap in hours")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr0", type=float)
    p.add_argument("--teacher", help="float weights to distil from, or 'auto' (the weights it was compressed from)")
    p.add_argument("--distill", type=float, help="gain of the distillation loss")
    p.add_argument("--fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--out")
    p.add_argument("--parent-run", help="MLflow run to log under (default: the search run in the policy)")
    p.add_argument("--no-track", dest="track", action="store_false", default=None, help="no MLflow logging")
    add_trust_weights(p)


def run_finetune(args: argparse.Namespace) -> None:
    from rsdet_compress.config import load_config, make_config
    from rsdet_compress.engine.finetune import FinetuneConfig, finetune
    opts = {k: v for k, v in vars(args).items() if k not in ("command", "config", "trust_weights")}
    cfg = load_config(args.config, FinetuneConfig, **opts) if args.config else make_config(FinetuneConfig, {}, **opts)
    r = finetune(cfg)
    b, f = r["before"], r["final"]
    print(f"weights: {r['weights']}  ({r['train_seconds']:.0f} s, {r['epochs_run']} epochs, structure kept)")
    print(f"val mAP50 {b['map50']:.4f} -> {f['map50']:.4f}   mAP50-95 {b['map50_95']:.4f} -> {f['map50_95']:.4f}")
