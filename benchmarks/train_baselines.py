"""Foundation benchmark: prepare a data set, train SkyNet and YOLOv8n on CPU, score on the held-out split.

    python benchmarks/train_baselines.py                 # airbus: prepare + train + score both
    python benchmarks/train_baselines.py --skip-train    # re-score existing weights
    python benchmarks/train_baselines.py --dataset kit --models yolov8n

Writes benchmarks/results/baselines.md and .json (airbus; baselines_<dataset> for others).
Recipes: configs/<dataset>-prepare.yaml and configs/<dataset>-<model>.yaml (fixed seed).
The weights land where each recipe's ``out`` says (runs/baselines/...) and are what the
compression benchmarks start from.

Every table is measured on these weights, so they are kept in the repository
(benchmarks/weights/<dataset>-<model>.pt, with the training record beside it): a time-capped
CPU training does not repeat bit for bit, and a fresh checkout restores them into
runs/baselines/ instead of training again (``--retrain`` trains anyway and replaces them).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from ledger import digest

from rsdet_compress.atomic import atomic_path, write_json, write_text
from rsdet_compress.config import load_config
from rsdet_compress.data.prepare import PrepareConfig, prepare
from rsdet_compress.engine.scorer import evaluate
from rsdet_compress.engine.trainer import TrainConfig, train
from rsdet_compress.machine import cpu_label

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KEPT = REPO / "benchmarks" / "weights"  # the weights every table was measured on (committed)


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def keep(dataset: str, model: str, out: Path) -> None:
    """Copy a finished training's best.pt and record into benchmarks/weights/."""
    _copy(out / "weights" / "best.pt", KEPT / f"{dataset}-{model}.pt")
    _copy(out / "metrics.json", KEPT / f"{dataset}-{model}.metrics.json")


def restore(dataset: str, model: str, out: Path) -> bool:
    """Put the kept weights and record back where the recipe's ``out`` says; False if none are kept."""
    kept = KEPT / f"{dataset}-{model}.pt"
    if not kept.is_file():
        return False
    _copy(kept, out / "weights" / "best.pt")
    _copy(kept.with_suffix(".metrics.json"), out / "metrics.json")
    print(f"{model}: restored {kept.relative_to(REPO)} into {out}")
    return True


def _prepare(dataset: str) -> Path:
    cfg = load_config(REPO / "configs" / f"{dataset}-prepare.yaml", PrepareConfig)
    data_yaml = Path(cfg.out) / "data.yaml"
    if not data_yaml.is_file():
        print(prepare(cfg).format())
    return data_yaml


def _row(model: str, train_result: dict | None, weights: Path, data_yaml: Path) -> dict:
    test = evaluate(weights, data_yaml, split="test")
    return {
        "model": model, "params": test["params"], "gflops": test["gflops"], "imgsz": test["imgsz"],
        "test_map50": test["map50"], "test_map50_95": test["map50_95"],
        "val_map50": train_result["final"]["map50"] if train_result else None,
        "epochs": train_result["epochs_run"] if train_result else None,
        "train_minutes": round(train_result["train_seconds"] / 60, 1) if train_result else None,
        "test_ap50_per_class": {c: (ap or {}).get("ap50") for c, ap in test["per_class"].items()},
        "test_images": test["images"], "images_per_second": round(test["images_per_second"], 2),
        "weights": str(weights), "sha256": digest(weights),
    }


def _merge(path: Path, rows: list[dict]) -> list[dict]:
    """The earlier table's rows with this run's in place: ``--models skynet`` must not drop YOLOv8n's row."""
    earlier = json.loads(path.read_text()) if path.is_file() else []
    new = {r["model"]: r for r in rows}
    merged = [new.pop(r["model"], r) for r in earlier]
    return merged + list(new.values())


def _markdown(rows: list[dict], command: str, dataset: str) -> str:
    classes = list(rows[0]["test_ap50_per_class"]) if rows else []
    head = ("| model | params | GFLOPs | imgsz | mAP50 (test) | mAP50-95 (test) | "
            + "".join(f"AP50 {c} | " for c in classes)
            + "epochs | train min | inference img/s |\n|" + "---|" * (9 + len(classes)) + "\n")
    body = "".join(
        f"| {r['model']} | {r['params']:,} | {r['gflops']:.2f} | {r['imgsz']} | {r['test_map50']:.4f} "
        f"| {r['test_map50_95']:.4f} | "
        + "".join("- | " if r["test_ap50_per_class"][c] is None else f"{r['test_ap50_per_class'][c]:.4f} | "
                  for c in classes)  # a class with no test boxes has no AP
        + f"{r['epochs']} | {r['train_minutes']} | {r['images_per_second']} |\n"
        for r in rows)
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_label()}; "
           "inference = batch 16 forward + NMS on the test chips (CPU)")
    kept = "".join(f"- {r['model']}: `benchmarks/weights/{dataset}-{r['model']}.pt` (sha256 {r['sha256'][:16]})\n"
                   for r in rows)
    return (f"# Baselines: {dataset}, trained from scratch on CPU\n\n{head}{body}\n{env}\n\n"
            f"Weights every compression table of this data set starts from:\n{kept}\nCommand: `{command}`\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="airbus", help="configs/<dataset>-prepare.yaml and <dataset>-<model>.yaml")
    ap.add_argument("--models", default="yolov8n,skynet")
    ap.add_argument("--skip-train", action="store_true", help="score existing runs/baselines weights")
    ap.add_argument("--retrain", action="store_true", help="train even where finished weights exist")
    args = ap.parse_args()
    data_yaml = _prepare(args.dataset)
    rows = []
    for model in args.models.split(","):
        cfg = load_config(REPO / "configs" / f"{args.dataset}-{model}.yaml", TrainConfig)
        result = None
        out = Path(cfg.out)
        metrics = out / "metrics.json"
        if not (args.retrain or metrics.is_file()):
            restore(args.dataset, model, out)
        if not args.skip_train and (args.retrain or not metrics.is_file()):
            t0 = time.time()
            result = train(cfg)
            print(f"{model}: trained in {(time.time() - t0) / 60:.1f} min")
            keep(args.dataset, model, out)
        else:  # finished earlier: reuse its weights and training record
            result = json.loads(metrics.read_text()) if metrics.is_file() else None
            if result and not (KEPT / f"{args.dataset}-{model}.pt").is_file():
                keep(args.dataset, model, out)
        weights = out / "weights" / "best.pt"
        rows.append(_row(model, result, weights, data_yaml))
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["benchmarks/train_baselines.py", *sys.argv[1:]])
    stem = "baselines" if args.dataset == "airbus" else f"baselines_{args.dataset}"
    rows = _merge(RESULTS / f"{stem}.json", rows)
    write_json(RESULTS / f"{stem}.json", rows)
    write_text(RESULTS / f"{stem}.md", _markdown(rows, command, args.dataset))
    print(_markdown(rows, command, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
