"""Recovery benchmark: what calibration, block reconstruction (``recover``) and QAT each give back, per policy.

    python benchmarks/recovery_compare.py --weights runs/baselines/yolov8n/weights/best.pt \
        --data runs/data/airbus/data.yaml --split test --policy ajpq=runs/search/<id>/best_policy.json \
        --uniform w4a8p25 --images 256 --iters 300 --qat-epochs 3
    python benchmarks/recovery_compare.py --weights ... --data ... --budget size=0.125,flops=0.5 \
        --searches ajpq,two-stage --episodes 24 --search-recover fast --uniform-bits w4a8 --qat-epochs 3

With ``--budget``, the policies are found at that budget: one search per ``--searches``
agent (its best policy; a search that finished earlier is reused) and, per ``--uniform-bits``,
the uniform bit-widths with the least uniform pruning (5% steps) that meets the budget; so
the search's contribution is separated from recovery's. A latency budget (``latency=0.3``) is
predicted as the search predicts it, on ``--latency-runtime`` (OpenVINO by default).

For each policy (a searched policy JSON given as NAME=PATH, and/or built-in uniform ones
``w<bits>a<bits>p<percent pruned>``): compress (64 calibration chips) -> test mAP;
recover -> test mAP; optionally QAT from the recovered weights (distilled from fp32) -> test
mAP of the fine-tuned weights (last.pt, even where finetune's val check keeps its input as
best.pt). Columns: mAP50, mAP50-95, AP50 of each class, the mAP50 difference against fp32 with a
95% paired bootstrap interval over test images, size / FLOPs / BOPs ratios, and each stage's
wall minutes on this machine. Stage outputs are kept under runs/bench/recovery/<name>/ and
reused on a rerun with the same settings. Each search's record and each policy's finished rows
also go to the ledger (benchmarks/results/ledger/, committed): a later checkout reuses them and
makes only what is missing. Writes benchmarks/results/<--out>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from kept_search import add_search_args, cached_search, gpu_suffix
from ledger import digest, kept
from pycocotools.cocoeval import COCOeval

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.compressor import Workspace, compress
from rsdet_compress.compress.cost import estimate
from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.rounding import round_policy
from rsdet_compress.config import load_config
from rsdet_compress.data.config import load_data_config
from rsdet_compress.data.evalset import EvalSet
from rsdet_compress.engine.evaluator import Evaluator, coco_evaluated, resampled_metrics
from rsdet_compress.engine.finetune import FinetuneConfig, finetune
from rsdet_compress.engine.recovery import RecoverConfig, recover
from rsdet_compress.machine import cpu_label
from rsdet_compress.runtime.latency_table import LatencyTable
from rsdet_compress.runtime.loader import load_model
from rsdet_compress.search.budget import Budget
from rsdet_compress.search.latency_cost import LatencyCost
from rsdet_compress.settings import runs_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = runs_root() / "bench" / "recovery"  # $RSDET_RUNS/bench/recovery: stage outputs, reused on reruns
MAX_DET = 300


def uniform_policy(ws: Workspace, spec: str) -> Policy:
    """``w4a8p25``: every quantizable layer at 4-bit weights / 8-bit activations, every group 25% pruned.

    ``w4a8p40dw8``: the same with depthwise convs' weights at 8 bits (a few % of a depthwise-separable
    detector's weights; the usual int8-depthwise exception of mobile quantizers).
    """
    m = re.fullmatch(r"w(\d+)a(\d+)p(\d+)(?:dw(\d+))?", spec)
    if not m:
        raise SystemExit(f"error: --uniform {spec!r}: expected w<bits>a<bits>p<percent>[dw<bits>], e.g. w4a8p25")
    wb, ab, pruned = (int(g) for g in m.groups()[:3])
    dwb = int(m.group(4)) if m.group(4) else wb
    v = ws.view
    groups = {g: {"keep": 1 - pruned / 100} for g in v.groups} if pruned else {}
    return Policy(detector=v.detector, imgsz=v.imgsz, groups=groups,
                  layers={n: {"weight_bits": dwb if v.layers[n].kind == "depthwise" else wb, "act_bits": ab}
                          for n in v.quantizable})


def budget_cost(ws: Workspace, budget: Budget, args):
    """What a policy is held to ``budget`` by: ``estimate``, or with a latency budget the latency table's prediction
    on ``--latency-runtime`` (as the search predicts it)."""
    if "latency" not in budget.as_dict():
        return estimate
    return LatencyCost.measured(ws, LatencyTable(args.latency_runtime, None))


def uniform_at_budget(ws: Workspace, bits: str, budget: Budget, cost=estimate) -> tuple[str, Policy]:
    """``w4a8`` (or ``w4a8dw8``) with the least uniform pruning, in 5% steps, that meets ``budget`` by ``cost``."""
    ref = cost(ws.view)
    m = re.fullmatch(r"(w\d+a\d+)(dw\d+)?", bits)
    if not m:
        raise SystemExit(f"error: --uniform-bits {bits!r}: expected w<bits>a<bits>[dw<bits>], e.g. w4a8")
    for pruned in range(0, 95, 5):
        spec = f"{m.group(1)}p{pruned}{m.group(2) or ''}"
        policy = uniform_policy(ws, spec)
        if budget.met(cost(ws.view, ws.resolve(policy)), ref):
            return spec, policy
    raise SystemExit(f"error: --uniform-bits {bits}: no uniform pruning up to 90% meets {budget}")


def add_stage_args(ap: argparse.ArgumentParser, iters: int) -> None:
    """The recover / QAT settings both benchmarks pass to ``make_stages``."""
    ap.add_argument("--qat-config", default="configs/finetune-after-recover.yaml",
                    help="QAT recipe YAML (FinetuneConfig fields) for the QAT stage")
    ap.add_argument("--images", type=int, default=256, help="recover: training chips")
    ap.add_argument("--iters", type=int, default=iters, help="recover: steps per layer")
    ap.add_argument("--recover-minutes", type=float, default=None,
                    help="recover: wall-clock cap (--budget-minutes), spread over the layers")
    ap.add_argument("--qat-epochs", type=int, default=0, help="QAT epochs after recovery (0: none)")
    ap.add_argument("--round8", action="store_true",
                    help="round kept channel counts up to multiples of 8 when compressing (what int8 CPU kernels "
                         "run fast; the deployed structure, for latency tables)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or 0 for the first GPU: searches, recover, QAT and scoring run there (compress on "
                         "CPU); stage outputs then go to <name>-gpu folders, so their minutes are never mixed")


def paired_bootstrap(ref: COCOeval, got: COCOeval, image_ids: list[int], n: int = 200,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of mAP50(got) - mAP50(ref), resampling test images with replacement (paired).

    Both sides come matched (``score``); a resample only re-accumulates (``resampled_metrics``),
    so 200 resamples cost seconds, not the ~20 minutes of re-running COCOeval on every one.
    """
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        sample = rng.choice(image_ids, size=len(image_ids), replace=True)
        a, b = (resampled_metrics(ev, sample, MAX_DET)["map50"] for ev in (got, ref))
        diffs.append(a - b)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def timed(path: Path, make) -> tuple[float, str | None]:
    """Run ``make()`` unless ``path`` exists: the wall minutes it took and the CPU it ran on.

    Both are kept beside it (``<path>.minutes``), so reruns report them, and minutes measured on
    another machine of a later session are never taken for this one's. Records written before the
    CPU was kept give None for it.
    """
    record = path.with_name(path.name + ".minutes")
    if not path.exists() or not record.is_file():
        t0 = time.time()
        make()
        record.write_text(f"{(time.time() - t0) / 60:.3f}\n{cpu_label()}\n")
    lines = record.read_text().splitlines()
    return float(lines[0]), (lines[1].strip() or None) if len(lines) > 1 else None


def score(path: Path, evaluator: Evaluator) -> tuple[dict, COCOeval]:
    """Test metrics of a checkpoint, and its matched COCOeval for ``paired_bootstrap``."""
    model, _ = load_model(path)
    dets, _ = evaluator.predict(model.to(evaluator.device))
    ev = coco_evaluated(evaluator.evalset.coco, dets, MAX_DET, evaluator.evalset.image_ids)
    return resampled_metrics(ev, evaluator.evalset.image_ids, MAX_DET), ev


def row(name: str, stage: str, m: dict, made: tuple[float, str | None] | None, ratios: dict, ci: tuple | None,
        ref: dict) -> dict:
    """One table row; ``made``: the stage's (wall minutes, CPU) from :func:`timed`."""
    minutes, cpu = made or (None, None)
    return {"policy": name, "stage": stage, "map50": m["map50"], "map50_95": m["map50_95"],
            "ap50": {c: (v or {}).get("ap50") for c, v in m["per_class"].items()},
            "dmap50": m["map50"] - ref["map50"], "ci95": ci, "minutes": minutes, "cpu": cpu, **ratios}


def box_counts(evalset: EvalSet) -> dict[str, int]:
    """Ground-truth boxes per class in ``evalset``: a class's AP over a handful of boxes moves in big steps."""
    coco = evalset.coco
    return {name: len(coco.getAnnIds(imgIds=evalset.image_ids, catIds=[cid]))
            for name, cid in zip(evalset.class_names, evalset.category_ids, strict=True)}


def markdown(rows: list[dict], header: str, boxes: dict[str, int] | None = None) -> str:
    classes = list(rows[0]["ap50"])
    boxes = boxes or {}
    cols = ["policy", "stage", "mAP50", "mAP50-95",
            *[f"AP50 {c}" + (f" ({boxes[c]} boxes)" if c in boxes else "") for c in classes],
            "ΔmAP50 vs fp32 [95% CI]",
            "size x", "FLOPs x", "BOPs x", "stage min"]
    out = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, p=4):
        return "-" if v is None else f"{v:.{p}f}"
    cpus = list(dict.fromkeys(r["cpu"] for r in rows if r.get("cpu") and r["minutes"] is not None))
    marks = {c: chr(ord("a") + i) for i, c in enumerate(cpus)}

    def minutes(r):  # minutes compare only on one CPU: each is marked with the one it ran on
        return f(r["minutes"], 1) + (f" ({marks[r['cpu']]})" if r.get("cpu") in marks else "")
    for r in rows:
        ci = f"{r['dmap50']:+.4f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else f"{r['dmap50']:+.4f}"
        out.append("| " + " | ".join([r["policy"], r["stage"], f(r["map50"]), f(r["map50_95"]),
                                      *[f(r["ap50"][c]) for c in classes], ci, f(r["size"], 2), f(r["flops"], 2),
                                      f(r["bops"], 2), minutes(r)]) + " |")
    if cpus:
        unmarked = any(r["minutes"] is not None and r.get("cpu") not in marks for r in rows)
        out += ["", "Stage minutes ran on: " + "; ".join(f"({m}) {c}" for c, m in marks.items())
                + ("; unmarked: CPU not recorded" if unmarked else "") + "."]
    return "\n".join(out) + "\n"

#: the note a two-stage row's policy name carries when its search used --stage-split bits (recovery_table's kinds)
BITS_SPLIT = "bits split"


def check_work(work: Path, policy: Policy) -> None:
    """Stage files in ``work`` are reused by path: refuse a folder whose stages were made from another policy."""
    record = work / "policy.json"
    if record.is_file() and Policy.load(record).to_dict() != policy.to_dict():
        raise SystemExit(f"error: {work} holds the stages of another policy ({record}); move it away or rename "
                         "the policy")
    if not record.is_file():
        policy.save(record)


def make_stages(policy: Policy, weights: Path, data: Path, work: Path, args,
                ablate_least_squares: bool = False) -> list[tuple[str, Path, tuple[float, str | None]]]:
    """Compress -> recover (-> QAT) for one policy: (stage, checkpoint, (wall minutes, CPU)) each.

    With ``ablate_least_squares`` it also recovers without the LS re-fit (Adam alone); QAT
    starts from the LS recovery."""
    comp = work / "compressed.pt"
    stages = [("calibrated", comp, timed(comp, lambda: compress(weights, policy, comp, data=data, calib_images=64,
                                                                round8=getattr(args, "round8", False))))]
    for ls in sorted({True, not ablate_least_squares}):
        cap = f"-m{args.recover_minutes:g}" if args.recover_minutes else ""
        rec = work / f"recovered-i{args.images}-s{args.iters}{cap}{'-ls' if ls else ''}.pt"
        cfg = RecoverConfig(weights=str(comp), data=str(data), images=args.images, iters=args.iters, out=str(rec),
                            least_squares=ls, budget_minutes=args.recover_minutes, val=False,
                            device=args.device, experiment="rsdet-compress-bench")
        steps = f"{args.iters} steps" + (f", {args.recover_minutes:g} min cap" if args.recover_minutes else "")
        stages.append((f"+ recover ({'LS + ' if ls else ''}{steps})", rec,
                       timed(rec, lambda cfg=cfg: recover(cfg))))
    if args.qat_epochs:
        recipe = Path(args.qat_config)
        ft_dir = work / f"{rec.stem}-qat{args.qat_epochs}-{recipe.stem}"
        made = timed(ft_dir, lambda: finetune(load_config(
            recipe, FinetuneConfig, weights=str(rec), data=str(data), epochs=args.qat_epochs, val=False,
            out=str(ft_dir), device=args.device, experiment="rsdet-compress-bench")))
        stages.append((f"+ recover + QAT {args.qat_epochs} ep", ft_dir / "weights" / "last.pt", made))
    return stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="float checkpoint")
    ap.add_argument("--data", required=True, help="dataset YAML")
    ap.add_argument("--split", default="test")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=PATH", help="searched policy JSON")
    ap.add_argument("--uniform", action="append", default=[], metavar="w4a8p25", help="uniform policy")
    ap.add_argument("--budget", default="", help="find the policies at this budget, e.g. size=0.125,flops=0.5")
    ap.add_argument("--searches", default="ajpq,two-stage", help="with --budget: search agents, comma-separated")
    ap.add_argument("--uniform-bits", action="append", default=[], metavar="w4a8",
                    help="with --budget: uniform bits, pruned uniformly until the budget holds")
    ap.add_argument("--ablate-least-squares", action="store_true", help="also recover without the LS re-fit")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--out", default="recovery_compare", help="results file stem in benchmarks/results/")
    add_search_args(ap)
    add_stage_args(ap, iters=300)
    args = ap.parse_args()
    weights, data = Path(args.weights), Path(args.data)
    cfg = load_data_config(data)
    ws = Workspace.from_weights(weights)
    evalset = EvalSet.from_coco(cfg.split_coco(args.split), cfg.split_images(args.split), int(ws.view.imgsz))
    evaluator = Evaluator(evalset, max_det=MAX_DET, device=args.device)
    float_cost = estimate(ws.view)
    ref, ref_ev = score(weights, evaluator)
    ones = {"size": 1.0, "flops": 1.0, "bops": 1.0}
    rows = [row("fp32", "-", ref, None, ones, None, ref)]
    policies = [(n, Policy.load(p)) for n, p in (s.split("=", 1) for s in args.policy)]
    policies += [(f"uniform {u}", uniform_policy(ws, u)) for u in args.uniform]
    if args.budget:
        budget = Budget.parse(args.budget.split(","))
        for agent in filter(None, args.searches.split(",")):
            found = cached_search(agent, weights, data, budget, args)
            notes = [n for n, on in (("uniform start", args.uniform_start),
                                     (BITS_SPLIT, agent == "two-stage" and args.stage_split == "bits"),
                                     (f"unpruned {'|'.join(args.unprunable)}", bool(args.unprunable))) if on]
            start = f" ({', '.join(notes)})" if notes else ""
            policies.append((f"{agent}{start} @ {args.budget}", Policy.from_dict(found["best_policy"])))
        cost = budget_cost(ws, budget, args) if args.uniform_bits else estimate
        for bits in args.uniform_bits:
            spec, policy = uniform_at_budget(ws, bits, budget, cost)
            policies.append((f"uniform {spec} @ {args.budget}", policy))
    stage_settings = {k: getattr(args, k) for k in ("images", "iters", "recover_minutes", "qat_epochs",
                                                     "qat_config", "ablate_least_squares", "device", "bootstrap")}
    if args.round8:  # another structure: other stage folders and ledger records than the unrounded policy's
        stage_settings["round8"] = True
        policies = [(f"{name}, kept x8", policy) for name, policy in policies]
    for name, policy in policies:
        work = WORK / (re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{weights.parent.parent.name}-{name}") + gpu_suffix(args))
        resolved = ws.resolve(policy)
        resolved = round_policy(ws, resolved)[0] if args.round8 else resolved  # what compress(round8=True) applies
        ratios = {k: v for k, v in estimate(ws.view, resolved).ratios(float_cost).items()
                  if k in ("size", "flops", "bops")}

        def policy_rows(name=name, policy=policy, work=work, ratios=ratios) -> list[dict]:
            out = []
            work.mkdir(parents=True, exist_ok=True)
            check_work(work, policy)
            for stage, path, made in make_stages(policy, weights, data, work, args, args.ablate_least_squares):
                m, ev = score(path, evaluator)
                ci = paired_bootstrap(ref_ev, ev, evalset.image_ids, args.bootstrap) if args.bootstrap else None
                out.append(row(name, stage, m, made, ratios, ci, ref))
                print(f"{name:24} {stage:28} mAP50 {m['map50']:.4f}  ({m['map50'] - ref['map50']:+.4f})", flush=True)
            return out
        key = {"weights": digest(weights), "data": str(data), "split": args.split, "policy": policy.to_dict(),
               "stages": stage_settings}
        # other recovery chips or steps: a record of their own beside the default recovery's, not in its place
        default = (ap.get_default("images"), ap.get_default("iters"))
        recipe = "" if (args.images, args.iters) == default else f"-i{args.images}-s{args.iters}"
        rows += kept(f"rows-{work.name}{recipe}", key, policy_rows)
    header = (f"# Recovery: {weights} on the {args.split} split of {data} ({len(evalset)} images)\n\n"
              f"`python benchmarks/recovery_compare.py {shlex.join(sys.argv[1:])}`  \n"
              f"Stage minutes: wall time of the run that made the stage, on the CPU named below the table"
              f"{'' if args.device == 'cpu' else f' (device {args.device}; compress on CPU)'}.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    boxes = box_counts(evalset)
    write_text(RESULTS / f"{args.out}.md", markdown(rows, header, boxes))
    write_text(RESULTS / f"{args.out}.json", json.dumps(rows, indent=2))
    print(markdown(rows, header, boxes))


if __name__ == "__main__":
    main()
