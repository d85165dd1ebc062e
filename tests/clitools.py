"""Helpers shared by the command-line tests: the one-line error contract and raw KIT copies."""
from __future__ import annotations

import shutil
from pathlib import Path

from rsdet_compress.cli.main import main

#: Four real KIT aerial-cars images (1764 x 430): small enough for CLI tests on a CPU.
KIT_IMAGES = ["MOS155", "MOS156", "MOS157", "MOS158"]


def run_error(capsys, argv: list, *needles: str) -> str:
    """Run ``main(argv)``; assert exit code 2 and exactly one ``error:`` line naming every needle, no traceback."""
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}; stdout={out[-500:]!r} stderr={err[-2000:]!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err + out
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in {lines[0]!r}"
    return lines[0]


def copy_kit(kit_dir: Path, dst: Path, stems: list[str] = KIT_IMAGES) -> Path:
    """A raw YOLO-layout data set of a few real KIT images: images/, labels/, classes.txt."""
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    shutil.copy(kit_dir / "classes.txt", dst / "classes.txt")
    for s in stems:
        shutil.copy(kit_dir / "images" / f"{s}.png", dst / "images")
        shutil.copy(kit_dir / "labels" / f"{s}.txt", dst / "labels")
    return dst
