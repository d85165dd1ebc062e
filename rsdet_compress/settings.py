"""Process-wide settings read from the environment (data root, outputs, MLflow)."""
from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that points at a folder of raw data sets (one sub-folder each).
DATA_ENV = "RSDET_DATA"
#: Environment variable for the outputs folder (trained weights, prepared data, MLflow store).
RUNS_ENV = "RSDET_RUNS"


def data_root() -> Path:
    """Folder holding raw data sets: ``$RSDET_DATA`` or ``./datasets``."""
    return Path(os.environ.get(DATA_ENV, "datasets")).expanduser()


def runs_root() -> Path:
    """Folder for outputs: ``$RSDET_RUNS`` or ``./runs`` (git-ignored)."""
    return Path(os.environ.get(RUNS_ENV, "runs")).expanduser()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve a data-set path: as given if it exists, else relative to the data root.

    Lets users write ``--src airbus-aircraft`` instead of the full path.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidate = data_root() / p
    return candidate if candidate.exists() else p
