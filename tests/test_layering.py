"""Imports go one way, from low to high layers; an upward import (at module level or inside a function) fails.

The order is the product's data flow: files and settings, tracking, data, detectors,
compression, runtimes (loading checkpoints, ONNX, packed files), engines (train,
evaluate, predict), export, search, command line. A function-level import does not
hide a cycle from this test: it reads every ``import`` in the source.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rsdet_compress"

#: Lowest first. Top-level modules (errors.py, atomic.py...) are named without ".py".
LAYERS = [
    {"errors", "atomic", "settings", "textio", "machine"},
    {"config"},
    {"tracking"},
    {"data"},
    {"detectors"},
    {"compress"},
    {"runtime"},
    {"engine"},
    {"export"},
    {"search"},
    {"cli"},
    {"__init__", "__main__"},  # the public API re-exports from every layer
]


def _layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"rsdet_compress.{name} is in no layer of tests/test_layering.py; add it")


def _unit(module: str) -> str | None:
    """``rsdet_compress.data.prepare`` -> ``data``; ``rsdet_compress`` itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "rsdet_compress" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported rsdet_compress module) for every import in ``path``, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    own = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("rsdet_compress")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(own[: len(own) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if not module.startswith("rsdet_compress"):
                continue
            if module == "rsdet_compress":  # from rsdet_compress import errors
                found += [(node.lineno, f"rsdet_compress.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in _sources():
        _layer(_unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)) or "__init__")


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    src = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)) or "__init__"
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
              for line, module in _imports(path)
              if _unit(module) and _layer(_unit(module)) > _layer(src)]
    assert not upward, "upward import(s):\n" + "\n".join(upward)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The test itself can fail: an upward import inside a function, and a relative one, are found."""
    pkg = tmp_path / "rsdet_compress" / "data"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def g():\n    from rsdet_compress.search.runner import search\n"
                 "from ..cli import main\n", encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "rsdet_compress"
    try:
        found = _imports(f)
    finally:
        PACKAGE = saved
    assert sorted(m for _, m in found) == ["rsdet_compress.cli", "rsdet_compress.search.runner"]
    assert all(_layer(_unit(m)) > _layer("data") for _, m in found)
