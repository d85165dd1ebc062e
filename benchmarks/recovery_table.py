"""The accuracy issue's one table, assembled from the recovery runs that measured its rows.

    python benchmarks/recovery_table.py [--config benchmarks/recovery_table.yaml] [--out recovery_table]
    python benchmarks/recovery_table.py --run-missing [--dry-run]

A whole table (two detectors, two data sets, two budgets, three policy kinds, three stages each)
takes many sessions of this 2-core CPU, so ``recovery_compare.py`` measures it a budget and a
policy kind at a time into ``benchmarks/results/<name>.json``. This script gathers those files
as the config lists them: one section per detector, data set and budget, every stage row with
the command that made it, a line per section saying whether the target was met (best final
stage of each policy kind against fp32), and the policy kinds the section still misses with the
command that will measure them. Writes benchmarks/results/<--out>.md.

The config names each source's ``recovery_compare.py`` arguments, so ``--run-missing`` makes the
results files not written yet, one after the other (sections with a target first), and gathers
the table again after each. A run killed midway loses only its policy in flight: searches and
finished policies are kept in the ledger (benchmarks/results/ledger/), and the same command
picks up from there in a later checkout.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from recovery_compare import BITS_SPLIT, markdown

from rsdet_compress.atomic import write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def source(spec: str | dict) -> tuple[str, list[str] | None]:
    """A config source: its results stem, and the recovery_compare.py arguments that make it (None if not given)."""
    if isinstance(spec, str):
        return spec, None
    args = shlex.split(f"{spec.get('base', '')} {spec['args']}") if spec.get("args") else None
    return spec["stem"], (args + ["--out", spec["stem"]] if args else None)


def shown(args: list[str]) -> str:
    return "python benchmarks/recovery_compare.py " + shlex.join(args)


def command_of(stem: str) -> str | None:
    """The benchmark command recorded in ``<stem>.md``'s header (its first backticked line)."""
    md = RESULTS / f"{stem}.md"
    if not md.is_file():
        return None
    found = re.search(r"`(python benchmarks/[^`]+)`", md.read_text())
    return found.group(1) if found else None


def box_counts(stem: str) -> dict[str, int]:
    """Test boxes per class as ``<stem>.md``'s header gives them (``AP50 bus (10 boxes)``): a class AP
    over ten boxes moves the mean by points, so the gathered table shows them too."""
    md = RESULTS / f"{stem}.md"
    return {c: int(n) for c, n in re.findall(r"AP50 (\S+) \((\d+) boxes\)", md.read_text())} if md.is_file() else {}


def gather(sources: list) -> tuple[list[dict], list[str], list[str], dict[str, int]]:
    """Rows of the ``sources`` that exist (a policy's stage once: the first file that has it), their
    commands, the sources not written yet (with the command that makes each, where the config has it),
    and the test boxes per class."""
    rows, seen, commands, missing, boxes = [], set(), [], [], {}
    for spec in sources:
        stem, args = source(spec)
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            missing.append(f"{stem}" + (f": `{shown(args)}`" if args else ""))
            continue
        commands.append(command_of(stem) or f"(no command recorded in {stem}.md)")
        boxes = boxes or box_counts(stem)
        recovered = {}  # policy -> its recover stage in this file: what its QAT row started from
        for r in json.loads(path.read_text()):
            if r["stage"].startswith("+ recover ("):
                recovered[r["policy"]] = r["stage"]
            elif r["stage"].startswith("+ recover + QAT") and r["policy"] in recovered:
                # two files may QAT two recoveries of one policy (300 and 600 steps): name which one
                r = {**r, "stage": recovered[r["policy"]] + r["stage"].removeprefix("+ recover")}
            key = (r["policy"], r["stage"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows, commands, missing, boxes


def kind(policy: str) -> str:
    """The policy kind a row's name belongs to: its agent, or uniform with its bits (``uniform w4a8``)."""
    name = policy.split(" @ ")[0]
    if name.startswith("uniform"):
        bits = re.match(r"uniform (w\d+a\d+)", name)
        return f"uniform {bits.group(1)}" if bits else "uniform"
    agent = name.split(" ")[0]
    if agent == "two-stage" and BITS_SPLIT not in name:  # its stages' budgets as --stage-split half shares them
        return "two-stage (half split)"
    return agent


def finals(rows: list[dict]) -> dict[str, dict]:
    """Per policy kind, its best row after a recovery stage (recover, or recover + QAT)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["policy"] == "fp32" or "recover" not in r["stage"]:
            continue
        k = kind(r["policy"])
        if k not in best or r["map50"] > best[k]["map50"]:
            best[k] = r
    return best


def section(spec: dict, target_points: float) -> list[str]:
    rows, commands, missing_files, boxes = gather(spec["sources"])
    if not rows:
        return [f"## {spec['title']}", "", "Not measured yet.", "", *[f"- {m}" for m in missing_files], ""]
    out = markdown(rows, f"## {spec['title']}", boxes).splitlines() + [""]
    best = finals(rows)
    for k, r in sorted(best.items(), key=lambda kv: -kv[1]["map50"]):
        verdict = ""
        if spec.get("target"):
            met = r["dmap50"] >= -target_points / 100
            verdict = f": target (within {target_points:g} point) {'met' if met else 'missed'}"
        out.append(f"- best {k}: {r['map50']:.4f} ({100 * r['dmap50']:+.2f} points, {r['stage']}){verdict}")
    absent = [k for k in spec.get("expect", []) if k not in best]
    if absent:
        out.append(f"- not measured yet: {', '.join(absent)}")
    out += [f"- {n}" for n in spec.get("notes", [])]  # what limits a missed target, measured elsewhere
    out += ["", "Made by:", *[f"- `{c}`" for c in commands]]
    if missing_files:
        out += ["", "Not written yet:", *[f"- {m}" for m in missing_files]]
    return out + [""]


def ranking(stems: list[str]) -> list[str]:
    out = ["## How well each reward form ranks a search's candidates", ""]
    for stem in stems:
        md = RESULTS / f"{stem}.md"
        if not md.is_file():
            out += [f"({stem} not written yet)", ""]
            continue
        # the ranking file's header and its first table (reward form -> Spearman rho, eval time)
        parts = md.read_text().replace("\n# ", "\n### ").removeprefix("# ").split("\n\n")[:3]
        out += ["### " + "\n\n".join(parts), ""]
    return out


def missing_runs(cfg: dict) -> list[tuple[str, list[str]]]:
    """(stem, recovery_compare.py arguments) of every source not written yet: sections with a target first."""
    sections = sorted(cfg["sections"], key=lambda spec: not spec.get("target"))
    runs = [source(s) for spec in sections for s in spec["sources"]]
    return [(stem, args) for stem, args in runs if args and not (RESULTS / f"{stem}.json").is_file()]


def run_missing(cfg: dict, dry_run: bool, table) -> None:
    """Make each missing results file with recovery_compare.py, the table regathered after each."""
    for stem, args in missing_runs(cfg):
        weights = Path(args[args.index("--weights") + 1]) if "--weights" in args else None
        if not dry_run and weights is not None and not (REPO / weights).is_file():
            raise SystemExit(f"error: {stem} needs {weights}: run `python benchmarks/train_baselines.py "
                             "--dataset <its data set>` first (it restores the kept baselines)")
        print(f"{stem}: {shown(args)}", flush=True)
        if dry_run:
            continue
        rc = subprocess.call([sys.executable, str(HERE / "recovery_compare.py"), *args], cwd=REPO)
        if rc != 0:
            raise SystemExit(f"error: {stem} failed (exit {rc}); its finished searches and policies stay in "
                             "the ledger, so rerunning picks up from there")
        table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "recovery_table.yaml"))
    ap.add_argument("--out", default="recovery_table", help="results file stem in benchmarks/results/")
    ap.add_argument("--run-missing", action="store_true",
                    help="make the results files not written yet (hours each on a 2-core CPU), then gather")
    ap.add_argument("--dry-run", action="store_true", help="with --run-missing: print the commands only")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.run_missing:
        run_missing(cfg, args.dry_run, lambda: write_table(cfg, args))
    write_table(cfg, args, echo=not args.run_missing)


def write_table(cfg: dict, args, echo: bool = False) -> None:
    lines = ["# Recovery: fp32 vs calibrated vs recovered vs recovered + QAT, per detector, data set and budget", "",
             "Test split of each data set. Stage minutes: wall time on the 2-core CPU of the run that made the stage "
             "(the CPU named below each table; minutes compare only on one CPU).",
             f"`python benchmarks/recovery_table.py --config {Path(args.config).relative_to(HERE.parent)}`", ""]
    for spec in cfg["sections"]:
        lines += section(spec, float(cfg.get("target_points", 1.0)))
    lines += ranking(cfg.get("ranking", []))
    write_text(RESULTS / f"{args.out}.md", "\n".join(lines))
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
