"""Our MLflow logging, the one MLflow layer. Runs are started and ended here only (ultralytics' own callback is off).

Two users share what is here (store URI and check, client, experiment with its
artifact root, flat clean keys, param/metric values and batched logging to an
explicit run): :class:`Tracker` (train, evaluate, finetune, benchmark: the
fluent API, one run at a time) and the search logbook
(:mod:`rsdet_compress.search.logbook`: explicit run ids, candidates, resume,
outage queue).

The store defaults to a sqlite file under the runs folder, so ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db`` shows everything; set
``MLFLOW_TRACKING_URI`` to log elsewhere.

Tracking must never cost a result, nor minutes of waiting: a command checks
the store up front (:func:`check_store`, seconds, one error line) before any
work, and a store that fails later (server gone mid-run) turns the
remaining logging into no-ops and one warning (:attr:`Tracker.error`); the
caller prints or writes its result first. mlflow's own HTTP defaults (7
retries with exponential back-off, 120 s timeouts) would wait ~4 minutes per
call on a dead server, so calls here run with short ones unless the user set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rsdet_compress.errors import UserError
from rsdet_compress.settings import runs_root

DEFAULT_EXPERIMENT = "rsdet-compress"
#: the tag that nests a run under another in the MLflow UI (search candidates, a fine-tune under its search)
PARENT_TAG = "mlflow.parentRunId"
#: the run description the MLflow UI shows and edits (markdown)
NOTE_TAG = "mlflow.note.content"
#: MLflow 3's experiment kind: without it the UI may infer a GenAI experiment and open on its traces overview
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
#: retries and seconds of the up-front check: a live store answers at once
CHECK_HTTP = ("0", "10")
#: retries and seconds of each logging call (unless the user set them): one blip survives, a dead server costs seconds
LOG_HTTP = ("1", "10")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or a sqlite store in the runs folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = runs_root().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


@contextmanager
def http_limits(retries: str, timeout: str, force: bool) -> Iterator[None]:
    """mlflow's HTTP retries/timeout for the calls inside (``force``: even over the user's own settings)."""
    saved = {k: os.environ.get(k) for k in _HTTP_ENV}
    for k, v in zip(_HTTP_ENV, (retries, timeout)):
        if force or saved[k] is None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def logging_limits():
    """Short HTTP limits for logging calls (unless the user set their own): a dead server costs seconds, not minutes."""
    return http_limits(*LOG_HTTP, force=False)


def quiet_sqlite_logs() -> None:
    import logging
    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..." is noise
        logging.getLogger(name).setLevel(logging.WARNING)


def check_store(uri: str | None = None) -> str:
    """The tracking URI, or a one-line UserError within seconds if the store cannot be reached.

    Every command that logs calls this before any work, so a dead server costs
    seconds and no result (``search`` and ``compare``; ``train``/``evaluate``/
    ``finetune``/``benchmark`` through :meth:`Tracker.check`).
    """
    uri = uri or default_tracking_uri()
    try:
        with http_limits(*CHECK_HTTP, force=True):
            store_client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any backend failure means "unreachable"
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise UserError(f"MLflow store {uri} is unreachable ({type(e).__name__}: {reason}); "
                        "fix MLFLOW_TRACKING_URI or pass --no-track") from None
    return uri


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


#: MLflow's limit on one param value
PARAM_CHARS = 6000
#: params per ``log_batch`` call (MLflow refuses more)
PARAM_BATCH = 100


def param_values(params: dict) -> dict[str, str]:
    """Nested params -> flat, clean keys with string values (cut to MLflow's length limit)."""
    return {clean_key(k): str(v)[:PARAM_CHARS] for k, v in flatten(params).items()}


def metric_values(metrics: dict) -> dict[str, float]:
    """Nested metrics -> flat, clean keys; only real numbers (None, bools, NaN and text are skipped)."""
    return {clean_key(k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)}


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite store's file; the server's default otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def store_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (sqlite setup noise silenced)."""
    from mlflow import MlflowClient
    quiet_sqlite_logs()
    return MlflowClient(uri)


def experiment_id(client, name: str, uri: str) -> str:
    """Id of experiment ``name``, created (artifacts per :func:`artifact_location`) when missing.

    Our experiments carry MLflow 3's experiment kind of model training, so its UI opens them on the
    runs table rather than on its GenAI (traces) overview.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def log_params_to(client, run_id: str, params: dict) -> None:
    """Log nested ``params`` to run ``run_id`` in batches (explicit run, no active-run state)."""
    from mlflow.entities import Param
    flat = [Param(k, v) for k, v in param_values(params).items()]
    for i in range(0, len(flat), PARAM_BATCH):
        client.log_batch(run_id, params=flat[i:i + PARAM_BATCH])


def log_metrics_to(client, run_id: str, metrics: dict, step: int = 0) -> None:
    """Log the numeric entries of nested ``metrics`` to run ``run_id`` (explicit run, no active-run state)."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    flat = [Metric(k, v, now, step) for k, v in metric_values(metrics).items()]
    if flat:
        client.log_batch(run_id, metrics=flat)


class Tracker:
    """Thin wrapper over the MLflow fluent API: one place that knows the store and experiment.

    ``enabled=False`` turns every call into a no-op (for library use without a
    store). Logging failures never raise: the first one is kept in
    :attr:`error` and the rest of the logging is skipped (each further call
    would wait on the same dead store); callers print :meth:`warning`.
    """

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.uri = uri or default_tracking_uri()
        self.experiment = experiment
        self.error: str | None = None
        self._ready = False

    def check(self) -> Tracker:
        """Before any work: a one-line UserError within seconds if the store is unreachable."""
        if self.enabled:
            check_store(self.uri)
        return self

    @property
    def active(self) -> bool:
        return self.enabled and self.error is None

    def warning(self) -> str | None:
        """One line for stderr when logging failed (None when it did not)."""
        if self.error is None:
            return None
        return f"warning: MLflow logging to {self.uri} failed, the rest of this run was not logged ({self.error})"

    def _call(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(...)`` with short HTTP limits; on failure remember the error, skip all later calls, return None."""
        if not self.active:
            return None
        try:
            with logging_limits():
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises, the result comes first
            text = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            self.error = f"{type(e).__name__}: {text}"
            return None

    def _setup(self) -> None:
        if self._ready or not self.active:
            return
        import mlflow
        quiet_sqlite_logs()

        def setup() -> bool:
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(experiment_id=experiment_id(store_client(self.uri), self.experiment, self.uri))
            return True
        self._ready = bool(self._call(setup))

    @contextmanager
    def run(self, name: str, params: dict | None = None, tags: dict | None = None,
            nested: bool = False) -> Iterator[str | None]:
        """Start a run (ended on exit, FAILED if an exception escapes); yields its id (None: not logging)."""
        self._setup()
        import mlflow
        run = self._call(mlflow.start_run, run_name=name, nested=nested, tags=tags) if self._ready else None
        if run is None:
            yield None
            return
        status = "FAILED"
        try:
            if params:
                self.log_params(params)
            yield run.info.run_id
            status = "FINISHED"
        finally:
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id:
                try:
                    with logging_limits():
                        mlflow.end_run(status)  # pops the run before talking to the store
                except Exception as e:  # noqa: BLE001
                    self.error = self.error or f"{type(e).__name__}: {str(e).strip()[:120]}"

    def log_params(self, params: dict) -> None:
        import mlflow
        self._call(mlflow.log_params, param_values(params))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log the numeric entries of ``metrics`` (None and non-numbers are skipped)."""
        import mlflow
        flat = metric_values(metrics)
        if flat:
            self._call(mlflow.log_metrics, flat, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        import mlflow
        self._call(mlflow.log_artifact, str(path), artifact_path=folder)

    def log_dict(self, data: dict, filename: str) -> None:
        """Store ``data`` as a JSON artifact named ``filename``."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / filename
            p.write_text(json.dumps(data, indent=2, default=str))
            self.log_artifact(p)
