"""The one way outputs are written: complete or absent, never half-written.

Files are written to a hidden sibling and renamed over the target (``os.replace``
is atomic within a folder), so a crash, kill -9 or a full disk leaves either the
old file or the new one, never a truncated file that looks complete. Output
folders are assembled in a hidden ``.partial`` sibling under an exclusive lock
(two writers into one ``--out`` cannot both succeed), and stale partials left by
a killed run are removed by the next run that takes the lock.

Every writer in the package goes through :func:`atomic_path` / :func:`write_text`
/ :func:`write_bytes` / :func:`write_json` (files) or :func:`staged_dir` (folders).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsdet_compress.errors import UserError

#: Suffix of a folder being assembled; anything ending in it is never a finished output.
PARTIAL = ".partial"


def _os_error(path: Path, e: OSError) -> UserError:
    """One line for a file-system failure (read-only, full, permission), naming the path."""
    reason = e.strerror or str(e)
    if e.errno == errno.EROFS:
        reason = "read-only file system"
    return UserError(f"{path}: cannot write ({reason})")


def _parent(path: Path) -> Path:
    """Create ``path``'s folder, refusing a parent that is a file, in one line."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{parent}: not a folder (a file of that name exists)") from None
    except NotADirectoryError:
        raise UserError(f"{parent}: not a folder (a file is in the path)") from None
    except OSError as e:
        raise _os_error(parent, e) from None
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it is renamed to ``path``.

    For writers that need a file name (``torch.save``, ``onnx.save``, OpenCV). The
    temporary file gets the permissions a plain ``open`` would give (not mkstemp's
    0600). A ``path`` that is an existing folder is refused before anything is written.
    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    parent = _parent(path)
    tmp = parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer produced no file at {tmp}")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole write; a second writer fails at once."""
    lock_path = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _os_error(out, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another run is writing this output now; wait for it "
                            "or choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock; the lock file stays (removing it would race a waiter)


def stale_partials(out: Path) -> list[Path]:
    """Hidden partial folders of ``out`` left by earlier runs (only safe to remove under the lock)."""
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.*{PARTIAL}"))


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False,
               protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield an empty hidden folder to fill; on success it becomes ``out``.

    - ``out`` existing without ``overwrite`` is refused before any work;
      ``out`` that is a file is refused even with ``overwrite``.
    - ``protect``: input paths (source data sets, weights) that ``out`` must not
      be, contain or lie inside, so ``--overwrite`` can never delete an input.
    - An exclusive lock on ``out`` is held throughout: a concurrent writer into
      the same ``out`` gets one line and exit 2 instead of silently replacing.
    - Partials left by a killed earlier run are removed first.
    - On any exception the partial folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    resolved = out.resolve()
    for p in protect:
        src = Path(p).resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise UserError(f"{out}: output would overwrite or lie inside the input {p}; "
                            "choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: output folder exists (use --overwrite to replace it)")
    parent = _parent(out)
    with _lock(out):
        for stale in stale_partials(out):
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists() and not overwrite:  # another run finished while we were starting
            raise UserError(f"{out}: output folder exists (use --overwrite to replace it)")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=parent))
        except OSError as e:
            raise _os_error(out, e) from None
        try:
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=PARTIAL, dir=parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _os_error(out, e) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
