"""What limits a recovered policy's accuracy: quantization, pruning, which channels, the chips it was fitted on.

    python benchmarks/recovery_limits.py --weights runs/baselines/skynet/weights/best.pt \\
        --data runs/data/airbus/data.yaml --policy <work>/policy.json --recovered <work>/recovered.pt
    python benchmarks/recovery_limits.py ... --policy ledger:<search record> --recovered <sha256>

Each row answers one question with one measurement, on the val and test splits (mAP50):

1. ``--recovered`` as given, then with every quantizer switched off (its recovered weights in
   float): what quantization still costs after recovery.
2. fp32 and ``--recovered`` on the training chips the recovery fitted (``--fit-images``, its
   seed): a gap that closes there but not on val/test is generalization (more chips would help),
   a gap that stays is what layer-wise fitting cannot reach with the channels left.
3. Variants of ``--policy``, each compressed (64 calibration chips) and given the same short
   recovery (``--iters`` steps per layer on ``--images`` chips): as searched; the same kept-channel
   counts and bits with the channels chosen by each ``--criteria``; its pruning in float; its
   quantization without pruning; with each droppable branch kept (SkyNet's reorg bypass). Those
   compare with each other, not with row 1 (whose recovery was longer), and the as-searched
   variant gives the scale: how far the short recovery is from the full one.

Each row goes to the ledger (benchmarks/results/ledger/), keyed by the weights, policy and
settings, so a rerun measures only what is missing; a later checkout names the policy by its
search's ledger record and the recovered checkpoint by the digest its rows were kept under.
Writes benchmarks/results/<--out>.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from ledger import LEDGER, digest, digest_of, kept
from recovery_compare import RESULTS

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.compressor import Workspace
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.quant import FLOAT_BITS, QConv2d
from rsdet_compress.compress.reconstruct import reconstruct
from rsdet_compress.compress.units import build_units
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.engine.evaluator import Evaluator
from rsdet_compress.engine.recovery import training_chips
from rsdet_compress.runtime.loader import load_model
from rsdet_compress.search.evaluation import fast_recovery, train_subsets
from rsdet_compress.search.latency_cost import droppable_branches

SPLITS = ("val", "test")


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every weight and activation quantizer off (in place): its weights as float."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.w_bits.fill_(FLOAT_BITS)
            m.act_quant.bits = FLOAT_BITS
    return model


def variants(ws: Workspace, policy: Policy, criteria: list[str]) -> dict[str, Policy]:
    """The policy as searched and the variants that each change one thing about it (see module doc)."""
    base = ws.resolve(policy).to_dict()
    out = {f"as searched ({policy.criterion})": Policy.from_dict(base)}
    for crit in criteria:
        if crit == policy.criterion:
            continue
        d = copy.deepcopy(base)
        d["criterion"] = crit
        scores = ws.scores(crit)
        for g, spec in d["groups"].items():
            top = torch.argsort(scores[g], descending=True)[:len(spec["keep_idx"])]
            d["groups"][g] = {"keep_idx": sorted(int(i) for i in top)}
        out[f"same counts, channels by {crit}"] = Policy.from_dict(d)
    d = copy.deepcopy(base)
    d["layers"], d["default_weight_bits"], d["default_act_bits"] = {}, FLOAT_BITS, FLOAT_BITS
    out["its pruning only (float)"] = Policy.from_dict(d)
    d = copy.deepcopy(base)
    d["groups"] = {}
    out["its quantization only (no pruning)"] = Policy.from_dict(d)
    for module, (group, channels) in droppable_branches(ws.view).items():
        kept_idx = set(base["groups"].get(group, {}).get("keep_idx", range(ws.view.groups[group].size)))
        if channels - kept_idx:
            d = copy.deepcopy(base)
            d["groups"][group] = {"keep_idx": sorted(kept_idx | channels)}
            out[f"with branch {module} kept whole"] = Policy.from_dict(d)
    return out


def load_policy(spec: str) -> tuple[Policy, str]:
    """A policy JSON, or ``ledger:<search record>`` for the best policy of a search kept in the ledger;
    with the digest of its JSON file (the same bytes either way: ``Policy.save`` is deterministic)."""
    if spec.startswith("ledger:"):
        record = LEDGER / f"{spec.removeprefix('ledger:')}.json"
        if not record.is_file():
            raise SystemExit(f"error: {record}: no such ledger record")
        policy = Policy.from_dict(json.loads(record.read_text())["value"]["best_policy"])
        with tempfile.TemporaryDirectory() as tmp:  # Policy.save's own bytes, so the digest follows its format
            return policy, digest(policy.save(Path(tmp) / "policy.json"))
    return Policy.load(spec), digest(Path(spec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="float checkpoint")
    ap.add_argument("--data", required=True, help="dataset YAML")
    ap.add_argument("--policy", required=True,
                    help="the searched policy JSON, or ledger:<search record> for that search's best policy")
    ap.add_argument("--recovered", default=None,
                    help="the policy's recovered checkpoint (rows 1 and 2), or its sha256 where the ledger has them")
    ap.add_argument("--fit-images", type=int, default=256, help="chips the recovered checkpoint was fitted on")
    ap.add_argument("--fit-seed", type=int, default=0, help="recover's seed: which chips those were")
    ap.add_argument("--criteria", default="l1,bn_scale,taylor", help="channel criteria for the same kept counts")
    ap.add_argument("--images", type=int, default=64, help="variants: calibration and recovery chips")
    ap.add_argument("--iters", type=int, default=30, help="variants: recovery steps per layer")
    ap.add_argument("--out", default="recovery_limits", help="results file stem in benchmarks/results/")
    args = ap.parse_args()
    weights, data = Path(args.weights), Path(args.data)
    ws = Workspace.from_weights(weights)
    imgsz = int(ws.view.imgsz)
    cfg = load_data_config(data)
    evaluators = {s: Evaluator(EvalSet.from_coco(cfg.split_coco(s), cfg.split_images(s), imgsz), batch=16)
                  for s in SPLITS}
    policy, policy_digest = load_policy(args.policy)
    base_key = {"weights": digest(weights), "data": str(data), "policy": policy.to_dict()}
    float_cost = estimate(ws.view)
    stem = f"limits-{ws.view.detector}-{policy_digest[:12]}"

    def scored(model, splits=SPLITS) -> dict:
        return {s: evaluators[s](model)["map50"] for s in splits}

    ref = kept(f"{stem}-fp32", {**base_key, "row": "fp32"}, lambda: scored(ws.view.model))
    rows = [{"row": "fp32", "calibrated": None, "recovered": ref, "flops": 1.0, "seconds": None}]
    if args.recovered:
        rec = Path(args.recovered)
        key = {**base_key, "recovered": digest_of(args.recovered), "fit": [args.fit_images, args.fit_seed]}

        def recovered_rows() -> list[dict]:
            if not rec.is_file():
                raise SystemExit(f"error: the ledger has no rows for the recovered checkpoint {args.recovered} "
                                 "under these settings: give the checkpoint itself")
            fit = Evaluator(training_chips(data, imgsz, args.fit_images, args.fit_seed), batch=16)
            model, _ = load_model(rec)
            q = {**scored(model), "fit chips": fit(model)["map50"]}
            f = scored(dequantized(model))
            ref_fit = {"fit chips": fit(ws.view.model)["map50"]}
            return [{"row": "fp32 on the recovery's fit chips", "recovered": ref_fit},
                    {"row": f"recovered ({rec.name})", "recovered": q},
                    {"row": "recovered, quantizers off", "recovered": f}]
        rows += kept(f"{stem}-recovered", key, recovered_rows)
    calib, _ = train_subsets(str(data), imgsz, args.images, 0)
    ws.grad_set = calib  # the data-driven criteria (taylor) score on these chips
    images = calib.images.float().div(255)
    for name, variant in variants(ws, policy, args.criteria.split(",")).items():
        def run(variant=variant) -> dict:
            t0 = time.perf_counter()
            model = ws.apply(variant, calib, share_weights=False)
            before = scored(model)
            reconstruct(build_units(ws.view.model, model, ws.view, model.policy), images, fast_recovery(args.iters))
            return {"calibrated": before, "recovered": scored(model), "seconds": time.perf_counter() - t0,
                    "flops": estimate(ws.view, variant).ratios(float_cost)["flops"]}
        key = {**base_key, "variant": variant.to_dict(), "images": args.images, "iters": args.iters}
        rows.append({"row": name, **kept(f"{stem}-{re.sub(r'[^A-Za-z0-9_.]+', '-', name).strip('-')}", key, run)})
        print(name, rows[-1], flush=True)
    cols = ["row", *[f"calibrated {s}" for s in SPLITS], *[f"recovered {s}" for s in SPLITS], "fit chips",
            "FLOPs x", "s"]
    out = [f"# Recovery limits: {args.policy}\n",
           f"`python benchmarks/recovery_limits.py {shlex.join(sys.argv[1:])}`  ",
           f"mAP50. Variants: compressed with {args.images} training chips, then {args.iters} recovery steps per "
           f"layer on them. fp32: val {ref['val']:.4f}, test {ref['test']:.4f}.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(d, k, p=4):
        v = (d or {}).get(k)
        return "-" if v is None else f"{v:.{p}f}"
    for r in rows:
        out.append("| " + " | ".join([r["row"], *[f(r.get("calibrated"), s) for s in SPLITS],
                                      *[f(r.get("recovered"), s) for s in SPLITS], f(r.get("recovered"), "fit chips"),
                                      "-" if r.get("flops") is None else f"{r['flops']:.2f}",
                                      "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"]) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / f"{args.out}.md", "\n".join(out) + "\n")
    write_text(RESULTS / f"{args.out}.json", json.dumps(rows, indent=2))
    print("\n".join(out))


if __name__ == "__main__":
    main()
