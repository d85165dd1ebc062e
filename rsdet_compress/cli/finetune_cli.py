"""``rsdet-compress finetune``: quantization-aware fine-tuning of a compressed checkpoint."""
from __future__ import annotations

import argparse

from rsdet_compress.cli import add_trust_weights
from rsdet_compress.cli.options import add_config_args

HELP = "QAT fine-tune a compressed checkpoint, keeping its pruned shapes and bits"


def add_finetune(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.engine.finetune import FinetuneConfig
    p.add_argument("--config", help="fine-tune recipe YAML (configs/...); flags win")
    add_config_args(p, FinetuneConfig)
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
