"""CLI flags generated from the config dataclasses (cli/options.py): names, types, help, lazy registries."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from rsdet_compress.cli.options import add_config_args, field_help


@dataclass
class _Cfg:
    """A config like ours."""

    #: where the data is
    data: str = ""
    #: passes over it; 100% of them
    epochs: int = 3
    size: int | None = None  # input side; None = the model's own
    #: fractions, e.g. 0.8,0.1,0.1
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    track: bool = True
    options: dict = field(default_factory=dict)
    kind: str = field(default="a", metadata={"help": "from metadata"})


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    add_config_args(p, _Cfg, **kw)
    return p


def test_every_field_gets_a_typed_flag_whose_default_leaves_the_dataclass_default():
    args = _parser().parse_args([])
    assert vars(args) == {"data": None, "epochs": None, "size": None, "split": None, "track": None, "kind": None}
    args = _parser().parse_args(["--data", "d", "--epochs", "5", "--size", "320", "--split", "0.7,0.2,0.1",
                                 "--no-track", "--kind", "b"])
    assert vars(args) == {"data": "d", "epochs": 5, "size": 320, "split": (0.7, 0.2, 0.1), "track": False,
                          "kind": "b"}
    assert _parser().parse_args(["--track"]).track is True


def test_help_comes_from_the_comments_and_percent_signs_survive():
    assert field_help(_Cfg) == {"data": "where the data is", "epochs": "passes over it; 100% of them",
                                "size": "input side; None = the model's own", "split": "fractions, e.g. 0.8,0.1,0.1",
                                "kind": "from metadata"}
    text = _parser().format_help()
    assert "passes over it; 100% of them" in text and "input side" in text


def test_skip_rename_extra_and_lazy_choices():
    asked = []

    def names():
        asked.append(1)
        return ["a", "b"]

    p = _parser(skip=("data",), rename={"epochs": "runs"}, choices={"kind": names},
                extra={"split": {"type": None, "action": "append"}})
    args = p.parse_args(["--runs", "2", "--split", "x", "--split", "y", "--kind", "zzz"])
    assert args.epochs == 2 and args.split == ["x", "y"] and args.kind == "zzz"  # the library refuses bad names
    assert not hasattr(args, "data") and not asked  # the registry is read only for --help
    assert "from metadata (one of: a, b)" in " ".join(p.format_help().split()) and asked


def test_existing_flags_keep_their_names():
    from rsdet_compress.cli.main import _command, build_parser

    def flags(argv):
        p = build_parser(_command(argv))
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
        if argv[0] == "data":
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices["prepare"]
        return {s for a in sub._actions for s in a.option_strings}

    assert {"--format", "--src", "--out", "--config", "--tile", "--overlap", "--rescale", "--min-visibility",
            "--split", "--seed", "--keep-empty", "--classes", "--missing-labels", "--overwrite",
            "--quiet"} <= flags(["data", "prepare"])
    assert {"--config", "--model", "--data", "--weights", "--epochs", "--time", "--imgsz", "--batch", "--device",
            "--seed", "--fraction", "--out", "--no-track", "--trust-weights"} <= flags(["train"])
    assert {"--config", "--weights", "--data", "--epochs", "--time", "--batch", "--lr0", "--teacher", "--distill",
            "--fraction", "--seed", "--device", "--out", "--parent-run", "--no-track"} <= flags(["finetune"])
    assert {"--weights", "--data", "--agent", "--budget", "--episodes", "--seed", "--reward", "--metric",
            "--criterion", "--calib-images", "--reward-images", "--act-bits", "--channel-multiple", "--experiment",
            "--resume", "--out", "--quiet"} <= flags(["search"])
    assert {"--weights", "--onnx", "--batch", "--runs", "--warmup", "--imgsz", "--threads", "--device", "--out",
            "--json", "--no-track"} <= flags(["benchmark"])
    assert {"--weights", "--format", "--out", "--data", "--split", "--calib-images", "--tolerance", "--round8",
            "--opset", "--batch", "--json"} <= flags(["export"])


@pytest.mark.parametrize("argv", [["data", "prepare", "--help"], ["compare", "--help"], ["--help"]])
def test_parsers_of_light_commands_import_neither_torch_nor_ultralytics(argv):
    code = ("import sys; from rsdet_compress.cli.main import build_parser, _command; "
            f"argv = {argv!r}; "
            "p = build_parser(_command(argv)); p.format_help(); "
            "print(sorted(m for m in ('torch', 'ultralytics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
