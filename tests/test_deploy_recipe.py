"""The team deployment recipe (Dockerfile, docker-compose.yml, README) is consistent with the code it runs.

No Docker daemon here or in CI, so nothing is built: instead the compose file is validated against
the Compose Specification's JSON schema (tests/fixtures/compose-spec.json, from
github.com/compose-spec/compose-spec at 170098ba, Apache-2.0), every service's command line is
parsed by the very CLI it calls (``ray start``, ``mlflow server``, ``rsdet-compress``; flags that do
not exist fail here), the Dockerfile copies files that exist and installs extras that exist, and the
image's entry point dispatches as documented.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
_DEFAULT = re.compile(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}")


def _interpolate(text: str) -> str:
    """``${VAR:-default}`` as compose reads it with nothing set (``${VAR:?...}``: a placeholder)."""
    return _DEFAULT.sub(lambda m: m.group(2) if m.group(2) is not None else f"<{m.group(1)}>", text)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _argv(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return [_interpolate(a) for a in cmd] if isinstance(cmd, list) else shlex.split(_interpolate(cmd))


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` with the CLI it names, as the image's entry point would run it; raises on unknown flags."""
    if argv[0] == "ray":
        import ray.scripts.scripts as ray_cli
        getattr(ray_cli, argv[1]).make_context(argv[1], argv[2:])
    elif argv[0] == "mlflow":
        import mlflow.cli as mlflow_cli
        getattr(mlflow_cli, argv[1]).make_context(argv[1], argv[2:])
    else:  # rsdet-compress, the image's default program
        from rsdet_compress.cli.main import build_parser
        args = argv[1:] if argv[0] == "rsdet-compress" else argv
        if args == ["--help"]:
            return
        build_parser(args[0]).parse_args(args)


def test_compose_file_follows_the_compose_specification():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "tests/fixtures/compose-spec.json").read_text())
    jsonschema.validate(_compose(), schema)
    broken = {**_compose(), "services": {"mlflow": {"image": "x", "ports": {"5000": 5000}}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema does catch a malformed file
        jsonschema.validate(broken, schema)


def test_compose_has_every_role_and_each_command_parses():
    services = _compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "rsdet"} <= set(services)
    ours = {name: s for name, s in services.items() if "rsdet-compress" in _interpolate(s.get("image", ""))}
    assert set(ours) == {"mlflow", "ray-head", "ray-worker", "rsdet"}
    for service in ours.values():
        _parse(_argv(service))
    assert _argv(ours["ray-head"])[:3] == ["ray", "start", "--head"]
    assert "ray-head:6379" in _argv(ours["ray-worker"])
    server = _argv(ours["mlflow"])
    assert server[server.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert "mlflow:5000" in server[server.index("--allowed-hosts") + 1]  # the name the others use
    for name in ("ray-head", "ray-worker", "rsdet"):  # one token, the same mounts on every Ray node
        env = ours[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {_interpolate(v).split(":")[1] for v in ours[name]["volumes"]} == {"/data", "/app/runs"}
    with pytest.raises(Exception, match="bogus"):  # the parsing does catch a flag that does not exist
        _parse(["ray", "start", "--bogus"])


def test_readme_cluster_commands_parse():
    """The README's docker commands for the search driver and the nodes are what the CLIs accept."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Deploying for a team"):]
    section = section[:section.index("\n## ")]
    found = 0
    for line in re.sub(r"\\\n\s*", " ", section).splitlines():  # continued lines joined
        m = re.search(r"rsdet-compress(?::\w+)? ((?:search|ray start|mlflow server)[^`#;]*)", line)
        if not m:
            continue
        argv = shlex.split(_interpolate(m.group(1)))
        argv = [a for a in argv if not a.startswith("$")]  # shell variables stand for values already checked
        _parse(argv)
        found += 1
    assert found >= 3, section


def test_dockerfile_copies_what_exists_and_installs_extras_that_exist():
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = re.search(r"^ARG EXTRAS=(\S+)$", text, flags=re.M).group(1).split(",")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared) and {"server", "cluster"} <= set(extras)
    assert re.search(r"^ARG BASE=python:3\.1\d-slim$", text, flags=re.M)  # CPU by default, CUDA as an argument
    from rsdet_compress.settings import DATA_ENV, RUNS_ENV
    assert f"{DATA_ENV}=/data" in text and f"{RUNS_ENV}=/app/runs" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in ("rsdet_compress", "configs", "scripts", "pyproject.toml", "README.md"):
        assert path not in ignored
    # the Ray token lives in .env beside the compose file: never in the image, never in git
    assert ".env" in ignored and ".env" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.parametrize("argv, expect", [(["ray", "--version"], "ray, version"),
                                          (["mlflow", "--version"], "mlflow, version"),
                                          (["--help"], "usage: rsdet-compress")])
def test_entrypoint_dispatches(argv, expect):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["sh", str(ROOT / "scripts/docker-entrypoint.sh"), *argv], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert expect in out.stdout
