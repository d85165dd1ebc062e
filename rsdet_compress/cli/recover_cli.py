"""``rsdet-compress recover``: block-reconstruction recovery of a compressed checkpoint against its float model."""
from __future__ import annotations

import argparse
import json

from rsdet_compress.cli import add_trust_weights
from rsdet_compress.cli.options import add_config_args

HELP = "recover a compressed checkpoint's accuracy by fitting it layer by layer to its float model"


def add_recover(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.engine.recovery import RecoverConfig
    p.add_argument("--config", help="recovery recipe YAML (configs/...); flags win")
    add_config_args(p, RecoverConfig)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_trust_weights(p)


def run_recover(args: argparse.Namespace) -> None:
    from rsdet_compress.config import load_config, make_config
    from rsdet_compress.engine.recovery import RecoverConfig, recover
    opts = {k: v for k, v in vars(args).items() if k not in ("command", "config", "trust_weights", "json")}
    cfg = load_config(args.config, RecoverConfig, **opts) if args.config else make_config(RecoverConfig, {}, **opts)
    r = recover(cfg)
    if args.json:
        print(json.dumps(r, default=str))
        return
    worst = max(r["layers"], key=lambda row: row["error_before"])
    print(f"weights: {r['weights']}  ({r['seconds']:.0f} s on {r['images']} training chips, structure kept)")
    print(f"largest layer error {worst['layer']}: {worst['error_before']:.4f} -> {worst['error_after']:.4f}; "
          f"output {r['layers'][-1]['error_before']:.4f} -> {r['layers'][-1]['error_after']:.4f}")
    if "after" in r:
        b, a = r["before"], r["after"]
        print(f"val mAP50 {b['map50']:.4f} -> {a['map50']:.4f}   mAP50-95 {b['map50_95']:.4f} -> {a['map50_95']:.4f}")
