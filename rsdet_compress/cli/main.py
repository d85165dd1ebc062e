"""``rsdet-compress`` command line: a thin layer over the public Python API.

Bad input ends with one line ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from rsdet_compress.cli import (
    add_trust_weights,
    benchmark_cli,
    choices,
    export_cli,
    finetune_cli,
    recover_cli,
    search_cli,
    trust_scope,
)
from rsdet_compress.cli.benchmark_cli import run_benchmark
from rsdet_compress.cli.export_cli import run_export
from rsdet_compress.cli.finetune_cli import run_finetune
from rsdet_compress.cli.options import ChoicesHelp, add_config_args
from rsdet_compress.cli.recover_cli import run_recover
from rsdet_compress.cli.search_cli import run_compare, run_search
from rsdet_compress.errors import UserError


def _add_prepare(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.data.prepare import PrepareConfig
    p.add_argument("--config", help="YAML with any of the options below (flags win)")
    add_config_args(p, PrepareConfig, choices={"format": choices.readers})
    p.add_argument("--quiet", action="store_true")


def _add_train(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.engine.trainer import AUGMENTATIONS, TrainConfig
    p.add_argument("--config", help="training recipe YAML (configs/...); flags win")
    add_config_args(p, TrainConfig, choices={"model": choices.detectors, "augment": lambda: AUGMENTATIONS})
    add_trust_weights(p)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.data.split import SPLITS
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-track", dest="track", action="store_false", help="do not log to MLflow")
    p.add_argument("--policy", help="also apply this policy and report float vs compressed side by side")
    add_trust_weights(p)


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True)
    p.add_argument("--source", required=True, help="an image or a folder of images")
    p.add_argument("--out", required=True)
    p.add_argument("--imgsz", type=int, help="inference size (default: from the image and the training scale)")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--slice", type=int, help="sliced inference: window side in model-input pixels (at the "
                   "training scale, like `data prepare --tile`); default: automatic for large images")
    p.add_argument("--overlap", type=float, default=0.2, help="overlap of neighbouring windows (0..<1)")
    p.add_argument("--merge", default="nms", metavar="NAME",
                   help=ChoicesHelp("merge windows' boxes (wbf: weighted box fusion); one of: %(choices)s",
                                    choices.merge_methods))
    p.add_argument("--full-pass", action="store_true", help="also run the whole image at reduced resolution")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_trust_weights(p)


def _add_policy(p: argparse.ArgumentParser) -> None:
    from rsdet_compress.compress.importance import DEFAULT_CRITERION
    from rsdet_compress.compress.quant import FLOAT_BITS
    p.add_argument("--weights", required=True, help="float weights the policy is for")
    p.add_argument("--uniform-bits", type=int, default=FLOAT_BITS, help="weight bits of every quantizable layer")
    p.add_argument("--act-bits", type=int, help="activation bits (default: same as --uniform-bits)")
    p.add_argument("--prune", type=float, default=0.0, help="fraction of channels removed from every group")
    p.add_argument("--criterion", default=DEFAULT_CRITERION, metavar="NAME",
                   help=ChoicesHelp("channel ranking, one of: %(choices)s", choices.criteria))
    p.add_argument("--imgsz", type=int)
    p.add_argument("--out", required=True)
    add_trust_weights(p)


def _add_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="dataset YAML: calibrate BN and activation ranges on training chips")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--round8", action="store_true",
                   help="round kept channel counts up to multiples of 8 (int8 kernel granularity) before applying")
    add_trust_weights(p)


#: sub-command -> (help, function adding its flags); "data" holds sub-commands of its own
PARSERS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None]] = {
    "data": ("data set tools", None),
    "train": ("train a detector (CPU or GPU) and score it with COCO mAP", _add_train),
    "evaluate": ("COCO mAP, AP by size and class, params and GFLOPs", _add_evaluate),
    "predict": ("detect objects, draw them, write COCO-style JSON", _add_predict),
    "policy": ("write a policy: a baseline, or a template listing every group/layer/block", _add_policy),
    "compress": ("apply a policy: a physically pruned, fake-quantized checkpoint", _add_compress),
    "models": ("list registered detectors", None),
    "search": (search_cli.SEARCH_HELP, search_cli.add_search),
    "recover": (recover_cli.HELP, recover_cli.add_recover),
    "finetune": (finetune_cli.HELP, finetune_cli.add_finetune),
    "compare": (search_cli.COMPARE_HELP, search_cli.add_compare),
    "export": (export_cli.HELP, export_cli.add_export),
    "benchmark": (benchmark_cli.HELP, benchmark_cli.add_benchmark),
}
DATA_PARSERS = {"prepare": ("convert a raw data set into tiled YOLO chips + COCO ground truth", _add_prepare)}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command; with ``command``, only that one gets its flags.

    A sub-command's flags come from its config dataclass, which lives beside torch or ultralytics: building
    all of them would make every command (and ``--help``) pay for imports it does not need.
    """
    parser = argparse.ArgumentParser(prog="rsdet-compress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add) in PARSERS.items():
        p = sub.add_parser(name, help=text)
        if name == "data":
            data = p.add_subparsers(dest="data_command", required=True)
            for dname, (dtext, dadd) in DATA_PARSERS.items():
                dp = data.add_parser(dname, help=dtext)
                if command in (None, name):
                    dadd(dp)
        elif add is not None and command in (None, name):
            add(p)
    return parser


def _command(argv: list[str]) -> str:
    """The sub-command named in ``argv`` ("" if none: the top-level parser answers)."""
    return next((a for a in argv if not a.startswith("-")), "")


def _options(args: argparse.Namespace, *skip: str) -> dict:
    return {k: v for k, v in vars(args).items()
            if k not in {"command", "data_command", "config", "trust_weights", *skip}}


def _run_prepare(args) -> None:
    from rsdet_compress.config import load_config, make_config
    from rsdet_compress.data.prepare import PrepareConfig, prepare
    opts = _options(args, "quiet")
    cfg = load_config(args.config, PrepareConfig, **opts) if args.config else make_config(PrepareConfig, {}, **opts)
    summary = prepare(cfg, progress=not args.quiet)
    print(summary.format())
    print(f"wrote {cfg.out}/data.yaml")


def _run_train(args) -> None:
    from rsdet_compress.config import load_config, make_config
    from rsdet_compress.engine.trainer import TrainConfig, train
    opts = _options(args)
    cfg = load_config(args.config, TrainConfig, **opts) if args.config else make_config(TrainConfig, {}, **opts)
    result = train(cfg)
    f = result["final"]
    print(f"weights: {result['weights']}  ({result['train_seconds']:.0f} s)")
    print(f"val mAP50={f['map50']:.4f} mAP50-95={f['map50_95']:.4f} params={f['params']} GFLOPs={f['gflops']}")


def _run_policy(args) -> None:
    from rsdet_compress.compress.compressor import Workspace
    from rsdet_compress.compress.cost import estimate, format_cost
    from rsdet_compress.compress.policy import Policy
    ws = Workspace.from_weights(args.weights, args.imgsz)
    view, abits = ws.view, args.act_bits if args.act_bits is not None else args.uniform_bits
    if not 0.0 <= args.prune < 1.0:
        raise UserError(f"--prune must be in [0, 1), got {args.prune}")
    policy = Policy(detector=view.detector, imgsz=view.imgsz, weights=ws.weights_fp, criterion=args.criterion,
                    groups={g: {"keep": round(1.0 - args.prune, 6)} for g in view.groups},
                    layers={n: {"weight_bits": args.uniform_bits, "act_bits": abits} for n in view.quantizable},
                    blocks={b.name: "keep" for b in view.blocks})
    resolved = ws.resolve(policy)
    policy.save(args.out)
    print(view.summary())
    print(format_cost(estimate(view, resolved), estimate(view)))
    print(f"wrote {args.out}")


def _run_compress(args) -> None:
    from rsdet_compress.compress.compressor import compress
    from rsdet_compress.compress.cost import estimate, format_cost
    r = compress(args.weights, args.policy, args.out, data=args.data, calib_images=args.calib_images,
                 round8=args.round8)
    view = r["workspace"].view
    print(format_cost(estimate(view, r["policy"]), estimate(view)))
    if r["round8"]:
        print(f"round8: {r['round8']['channels_added']} channels added in {r['round8']['groups_changed']} groups")
    hint = "" if args.data else "  (not calibrated: pass --data to calibrate BN and activations)"
    print(f"wrote {args.out}{hint}")


def _print_side_by_side(r: dict) -> None:
    print(f"{'':12}{'float':>12}{'compressed':>12}")
    for k in ("map50", "map50_95", "params", "size_mb", "gflops", "gbops"):
        a, b = r["float"][k], r["compressed"][k]
        fmt = (lambda v: f"{v:12,d}") if isinstance(a, int) else (lambda v: f"{v:12.4f}")
        print(f"{k:12}{fmt(a)}{fmt(b)}")
    print("x smaller: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))


def _run_evaluate(args) -> None:
    if args.policy:
        from rsdet_compress.engine.scorer import evaluate_policy
        r = evaluate_policy(args.weights, args.policy, args.data, split=args.split, batch=args.batch,
                            device=args.device)
        print(json.dumps(r)) if args.json else _print_side_by_side(r)
        return
    from rsdet_compress.engine.scorer import evaluate
    from rsdet_compress.tracking.mlflow_tracker import Tracker
    tracker = Tracker(enabled=args.track).check()  # a dead store: one line in seconds, before any work
    r = evaluate(args.weights, args.data, split=args.split, imgsz=args.imgsz, batch=args.batch, device=args.device)
    _print_evaluation(r, args)  # the result first: logging may still fail, it must not cost the result
    with tracker.run(f"evaluate-{r['detector']}", params={"weights": args.weights, "data": args.data,
                                                          "split": args.split, "imgsz": r["imgsz"]},
                     tags={"stage": "evaluate"}):
        tracker.log_metrics({k: v for k, v in r.items() if not isinstance(v, dict)})
        tracker.log_dict(r, "evaluation.json")
    if tracker.warning():
        print(tracker.warning(), file=sys.stderr)


def _print_evaluation(r: dict, args) -> None:
    if args.json:
        print(json.dumps(r), flush=True)
        return
    print(f"{r['detector']} on {args.split} ({r['images']} images at {r['imgsz']} px)")
    for k in ("map50", "map50_95", "ap_small", "ap_medium", "ap_large"):
        v = r[k]
        print(f"  {k:10} {'n/a' if v is None else f'{v:.4f}'}")
    for name, ap in r["per_class"].items():
        a50, a = ap["ap50"], ap["ap50_95"]
        print(f"  AP {name:20} 50: {'n/a' if a50 is None else f'{a50:.4f}'}  "
              f"50-95: {'n/a' if a is None else f'{a:.4f}'}")
    print(f"  params {r['params']}  GFLOPs {r['gflops']}", flush=True)
    if "ratios" in r:
        x = r["ratios"]
        print(f"  size {r['size_mb']:.3f} MB (float {r['float_size_mb']:.3f} MB) | vs float: "
              f"{x['size']:.2f}x smaller, {x['flops']:.2f}x fewer FLOPs, {x['bops']:.2f}x fewer BOPs, "
              f"{x['params']:.2f}x fewer params", flush=True)


def _run_predict(args) -> None:
    import warnings

    from rsdet_compress.engine.geo import GeoreferenceWarning
    from rsdet_compress.engine.predictor import SkippedImageWarning, predict
    coco = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", GeoreferenceWarning)
            warnings.simplefilter("always", SkippedImageWarning)
            coco = predict(args.weights, args.source, args.out, imgsz=args.imgsz, conf=args.conf, iou=args.iou,
                           device=args.device, slice_size=args.slice, overlap=args.overlap, merge=args.merge,
                           full_pass=args.full_pass, batch=args.batch, overwrite=args.overwrite)
    finally:
        for w in caught:  # ours as one `warning: ...` line each, others as Python shows them
            if issubclass(w.category, (GeoreferenceWarning, SkippedImageWarning)):
                if coco is not None:  # after a failure nothing was written: the error line alone says why
                    print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    skipped = len(coco["info"]["skipped"])
    print(f"{len(coco['annotations'])} detections in {len(coco['images'])} image(s) -> {args.out}"
          + (f"; {skipped} unreadable image(s) skipped (listed in detections.json info.skipped)" if skipped else ""))


def _run_models(args) -> None:
    from rsdet_compress.detectors.registry import list_detectors
    print("\n".join(list_detectors()))


COMMANDS = {"data": _run_prepare, "train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict,
            "policy": _run_policy, "compress": _run_compress, "search": run_search, "compare": run_compare,
            "export": run_export, "finetune": run_finetune, "recover": run_recover, "benchmark": run_benchmark,
            "models": _run_models}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        with trust_scope(args):
            COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
