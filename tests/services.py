"""Real services for the tests, on 127.0.0.1 only: a PostgreSQL cluster, an S3-compatible object store
(moto's server) and an MLflow tracking server on them.

Both are started from what the machine has (the distribution's PostgreSQL packages, which
``.ci/run`` installs when missing, and the venv's ``mlflow``), in a throwaway folder, on free
ports, and stopped with everything they started: ``mlflow server`` (3.x) spawns job runners in
sessions of their own, so job execution and periodic tasks are switched off and the server
runs in a process group of its own that is killed whole.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(tool: str) -> str | None:
    """Path of a PostgreSQL server tool (``initdb``, ``pg_ctl``): on PATH or in Debian's versioned folder."""
    found = shutil.which(tool)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return hits[-1] if hits else None


class Postgres:
    """A private PostgreSQL cluster listening on 127.0.0.1:``port`` with trust auth, one database ``mlflow``.

    PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` user.
    """

    def __init__(self, database: str = "mlflow"):
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="rsdet-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.user: str | None = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        cmd = ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL server tools not found (apt-get install postgresql)")
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}")
        self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """A new, empty database in this cluster; returns its URL."""
        createdb = Path(postgres_bin("pg_ctl")).with_name("createdb")
        self._run(str(createdb) if createdb.exists() else "createdb",
                  "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url_of(name)

    def stop(self) -> None:
        pg_ctl = postgres_bin("pg_ctl")
        if pg_ctl and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class S3Store:
    """An S3-compatible object store on 127.0.0.1 (moto's server) with one bucket, and the settings to reach it."""

    def __init__(self, bucket: str = "rsdet-artifacts"):
        self.bucket, self.port = bucket, free_port()
        self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client (here: ``mlflow server``) needs to write to this store."""
        return {"MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        env = self.env
        return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])

    def start(self) -> S3Store:
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class MlflowServer:
    """``mlflow server`` on ``backend`` (a database URI), artifacts proxied to ``artifacts`` (a folder, or an
    ``s3://`` URI reached with ``env``); stop() kills it whole."""

    def __init__(self, backend: str, artifacts: Path | str, port: int | None = None, log_dir: Path | None = None,
                 env: dict[str, str] | None = None):
        self.backend, self.artifacts = backend, str(artifacts)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.env = dict(env or {})
        self.log = Path(log_dir or Path(artifacts).parent) / f"mlflow-server-{self.port}.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false", **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--backend-store-uri", self.backend, "--artifacts-destination",
                 self.artifacts, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None
