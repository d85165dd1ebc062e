"""Results that take hours, kept in the repository so a later checkout goes on from them.

A whole compression table (searches of two dozen recovered candidates, then compress ->
recover -> QAT per policy) takes longer on this 2-core CPU than one working session, and a
session starts from a clean checkout: its run folders are gone. So each finished piece (a
search's record with its candidates' policies, one policy's stage rows, one ranked
candidate's scores) is written to ``benchmarks/results/ledger/<name>.json`` with the key it
was made under (the float weights' digest and every setting that changes it), and a rerun
with the same key reuses it instead of making it again. A different key makes it again and
replaces it. The ledger holds numbers and policies only, never checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsdet_compress.atomic import write_text

LEDGER = Path(__file__).resolve().parent / "results" / "ledger"


def digest(path: Path) -> str:
    """sha256 of a file: the key's part that says which weights a record was measured on."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_of(spec: str) -> str:
    """The digest of a file, or ``spec`` itself where it is already one (64 hex digits): rows measured on a
    checkpoint an earlier checkout made can be named by the digest their ledger key holds."""
    if Path(spec).is_file():
        return digest(Path(spec))
    if re.fullmatch(r"[0-9a-f]{64}", spec):
        return spec
    raise SystemExit(f"error: {spec}: no such file (nor a sha256 digest of one)")


def _plain(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples as lists, numpy scalars and paths as text)."""
    return json.loads(json.dumps(obj, default=str))


def kept(name: str, key: dict, make: Callable[[], Any]) -> Any:
    """The value ``make()`` returned under ``key`` in an earlier run, or ``make()``'s now (then kept)."""
    path = LEDGER / f"{name}.json"
    key = _plain(key)
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            print(f"ledger: {path.name} reused", flush=True)
            return record["value"]
    value = _plain(make())
    write_text(path, json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value
