"""Helpers shared by the command-line tests: the one-line error contract."""
from __future__ import annotations

from rsdet_compress.cli.main import main


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
