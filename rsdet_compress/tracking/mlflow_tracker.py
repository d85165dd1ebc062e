"""Our MLflow logging. Runs are started and ended here only (ultralytics' own callback is off).

The store defaults to a sqlite file under the runs folder, so ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db`` shows everything; set
``MLFLOW_TRACKING_URI`` to log elsewhere.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsdet_compress.errors import UserError
from rsdet_compress.settings import runs_root

DEFAULT_EXPERIMENT = "rsdet-compress"
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a sqlite store in the runs folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = runs_root().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def clean_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_-. /``: 'metrics/mAP50(B)' -> 'metrics/mAP50_B'."""
    return _BAD_KEY.sub("_", key).strip("_")


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> flat ``a.b`` keys (MLflow params and metrics are flat)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin wrapper over the MLflow fluent API: one place that knows the store and experiment.

    ``enabled=False`` turns every call into a no-op (for library use without a store).
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self._ready = False

    def _setup(self) -> None:
        if self._ready or not self.enabled:
            return
        import mlflow
        try:
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(self.experiment) is None:
                location = None
                if self.uri.startswith("sqlite:///"):  # keep artifacts beside the sqlite file
                    location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
                mlflow.create_experiment(self.experiment, artifact_location=location)
            mlflow.set_experiment(self.experiment)
        except Exception as e:
            raise UserError(f"MLflow store {self.uri} is unreachable ({type(e).__name__}: {str(e)[:100]})") from None
        self._ready = True

    @contextmanager
    def run(self, name: str, params: dict | None = None, tags: dict | None = None,
            nested: bool = False) -> Iterator[str | None]:
        """Start a run (ended on exit, FAILED if an exception escapes); yields its id."""
        if not self.enabled:
            yield None
            return
        self._setup()
        import mlflow
        with mlflow.start_run(run_name=name, nested=nested, tags=tags) as run:
            if params:
                self.log_params(params)
            yield run.info.run_id

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        import mlflow
        flat = {clean_key(k): str(v)[:6000] for k, v in flatten(params).items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (None and non-numbers are skipped)."""
        if not self.enabled:
            return
        import mlflow
        flat = {clean_key(k): float(v) for k, v in flatten(metrics).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if flat:
            mlflow.log_metrics(flat, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            import mlflow
            mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dict(self, data: dict, filename: str) -> None:
        """Store ``data`` as a JSON artifact named ``filename``."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / filename
            p.write_text(json.dumps(data, indent=2, default=str))
            self.log_artifact(p)
