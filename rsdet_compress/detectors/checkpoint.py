"""The checkpoint file: writing it, and reading it back safely (ours, or a local ultralytics ``.pt``).

Our checkpoint is a plain dict of tensors and builtins (loadable with
``torch.load(weights_only=True)``), always fp32, carrying the detector name
and, for ultralytics models, their model YAML as a dict (``arch``,
:mod:`rsdet_compress.detectors.arch`), so the structure is rebuilt from code
or that description (any YOLO detect model, registered or not), never from a
pickled module. A
compressed model's checkpoint also carries its resolved policy; rebuilding
that structure needs the compression code, so :func:`load_float_detector`
(what training and compression start from) refuses it and
:func:`rsdet_compress.runtime.checkpoint.load_detector` loads both kinds.

Nothing is ever fully unpickled unless the caller opts in: a ``.pt`` is a
pickle, and a crafted one runs code the moment it is loaded. ultralytics
checkpoints (which do pickle their modules) go through ultralytics' own
restricted loader (``weights_only=True`` plus an allow-list built from the
torch.nn and ultralytics.nn module classes the file names), and anything else
is refused naming the offending global. :func:`trusted_weights` (the CLI's
``--trust-weights``) is the explicit way out for files the user vouches for.
"""
from __future__ import annotations

import contextlib
import contextvars
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.nn.tasks import DetectionModel, torch_safe_load

from rsdet_compress.atomic import atomic_path
from rsdet_compress.detectors.arch import arch_name, arch_of, check_detect
from rsdet_compress.detectors.registry import DETECTORS, build_detector
from rsdet_compress.errors import UserError

CHECKPOINT_FORMAT = "rsdet-compress"
CHECKPOINT_VERSION = 1

#: whether weights may be fully unpickled (set only through :func:`trusted_weights`)
_TRUST = contextvars.ContextVar("rsdet_trust_weights", default=False)
#: the global torch's restricted unpickler refused ("... GLOBAL posix.system ...")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@contextlib.contextmanager
def trusted_weights(enabled: bool = True) -> Iterator[None]:
    """Within this block, weights files that the restricted loader refuses are fully unpickled.

    Only for files the user made or vouches for: unpickling can run any code the file carries.
    """
    token = _TRUST.set(enabled)
    try:
        yield
    finally:
        _TRUST.reset(token)


def save_detector(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``model`` as an fp32 checkpoint (atomically: temp file, then rename)."""
    path = Path(path)
    names = getattr(model, "names", None) or {}
    arch = arch_of(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "detector": getattr(model, "detector_name", None) or (arch_name(arch) if arch else None),
        "arch": arch,
        "num_classes": int(model.model[-1].nc),
        "names": [str(names[i]) for i in sorted(names)],
        "state_dict": {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                       for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    policy = getattr(model, "policy", None)
    if policy is not None:  # a compressed model: its structure is rebuilt from the resolved policy
        ckpt["policy"] = policy.to_dict()
    if ckpt["detector"] is None:
        raise ValueError("model has neither a detector_name nor an ultralytics YAML; build it with build_detector()")
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def read_checkpoint(path: str | Path, trust: bool | None = None) -> dict:
    """The dict a weights file holds, loaded without running code unless trusted.

    Either one of our checkpoints (``format`` is :data:`CHECKPOINT_FORMAT`; version
    and detector name checked) or an ultralytics one (turn it into a model with
    :func:`from_ultralytics`). ``trust`` (default: inside :func:`trusted_weights` or
    not) allows a full unpickle of an ultralytics file the restricted loader refuses.
    """
    path = Path(path)
    trust = _TRUST.get() if trust is None else trust
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # pickled modules (ultralytics), or something worse
        return _read_ultralytics(path, trust)
    except Exception as e:  # truncated zip, not a torch file at all...
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") != CHECKPOINT_FORMAT and _ultralytics_module(ckpt) is not None:
        # an ultralytics restricted load earlier in this process allow-listed its classes for every later load
        return ckpt
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not an rsdet-compress or ultralytics checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt['version']} is newer than this rsdet-compress")
    if ckpt.get("detector") not in DETECTORS and not isinstance(ckpt.get("arch"), dict):
        raise UserError(f"{path}: unknown detector {ckpt.get('detector')!r} in checkpoint, "
                        "and no architecture description to rebuild it from")
    return ckpt


def skeleton(ckpt: dict) -> nn.Module:
    """The float detector one of our checkpoints was saved from, with fresh weights.

    Rebuilt from its stored architecture when it has one (exactly what was saved, whatever the
    registry holds now), else from the registered name.
    """
    return build_detector(str(ckpt["detector"]), int(ckpt.get("num_classes") or 0), names=ckpt.get("names"),
                          arch=ckpt.get("arch"))


def load_state(model: nn.Module, ckpt: dict, path: str | Path) -> tuple[nn.Module, dict]:
    """``model`` (built for ``ckpt``) holding the checkpoint's weights, in eval mode, and its metadata.

    Metadata holds ``detector``, ``num_classes``, ``names``, ``compressed`` and
    whatever the writer stored in ``meta`` (image size, data-set scale, metrics).
    """
    name, nc = ckpt.get("detector"), ckpt.get("num_classes")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: weights do not fit detector {name!r} ({str(e).splitlines()[0][:100]})") from None
    meta = {**ckpt.get("meta", {}), "detector": name, "num_classes": nc, "names": ckpt.get("names"),
            "compressed": "policy" in ckpt}
    return model.eval(), meta


def load_float_detector(path: str | Path, trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Load a float checkpoint or a local ultralytics ``.pt`` -> (model in eval mode, metadata).

    A compressed checkpoint is refused: start from the float weights, or load it
    with :func:`rsdet_compress.runtime.checkpoint.load_detector`.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, trust)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        return from_ultralytics(ckpt, path)
    if "policy" in ckpt:
        raise UserError(f"{path}: already compressed; start from the float weights")
    return load_state(skeleton(ckpt), ckpt, path)


def check_classes(meta: dict, names: list[str], weights: str | Path, data: str | Path) -> None:
    """Refuse weights whose classes are not the data set's (scores would file planes under "car").

    Names are compared when the checkpoint has real ones (not the placeholders "0", "1"...).
    """
    ours = [str(n) for n in (meta.get("names") or [])]
    nc = meta.get("num_classes", len(ours) or None)
    placeholder = ours == [str(i) for i in range(len(ours))]
    if nc is None or (nc == len(names) and (placeholder or ours == [str(n) for n in names])):
        return

    def show(ns: list[str]) -> str:
        return ", ".join(ns[:6]) + (", ..." if len(ns) > 6 else "")
    raise UserError(f"{weights}: weights detect {nc} classes ({show(ours) if ours else 'unnamed'}) but {data} "
                    f"has {len(names)} ({show([str(n) for n in names])}); use weights trained on this data set")


def _ultralytics_module(ckpt: dict) -> nn.Module | None:
    """The model an ultralytics checkpoint holds: the EMA weights of a training checkpoint, else ``model``."""
    return next((m for m in (ckpt.get("ema"), ckpt.get("model")) if isinstance(m, nn.Module)), None)


def _read_ultralytics(path: Path, trust: bool) -> dict:
    """A local ultralytics .pt (pickled DetectionModel), through ultralytics' restricted loader unless trusted."""
    try:
        if trust:  # the user vouched for the file: a plain unpickle (what ultralytics does by default)
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            ckpt, _ = torch_safe_load(path, safe_only=True)
    except Exception as e:
        refused = next((m.group(1) for c in (e, e.__cause__, e.__context__) if c is not None
                        for m in [_REFUSED_GLOBAL.search(str(c))] if m), None)
        if refused and not trust:
            raise UserError(f"{path}: refused to unpickle global '{refused}': not a tensor, plain data or a "
                            "torch/ultralytics module class, so loading it could run code (if you trust "
                            "this file, pass --trust-weights)") from None
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable ultralytics checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") == CHECKPOINT_FORMAT:  # ours never need unpickling
        raise UserError(f"{path}: not an rsdet-compress or ultralytics checkpoint")
    return ckpt


def from_ultralytics(ckpt: dict, path: Path) -> tuple[nn.Module, dict]:
    """(fp32 model in eval mode, metadata) from a loaded ultralytics checkpoint dict; name from its YAML.

    Any ultralytics detect model works (any scale, head or class count): its model YAML travels
    into every checkpoint made from it. Segment / pose / OBB / end-to-end models are refused.
    """
    model = _ultralytics_module(ckpt)
    if not isinstance(model, DetectionModel):
        kind = type(model).__name__ if model is not None else "no model"
        raise UserError(f"{path}: ultralytics checkpoint is not a detection model ({kind})")
    check_detect(model, str(path))
    args = ckpt.get("train_args") if isinstance(ckpt.get("train_args"), dict) else {}
    model = model.float()
    model.args = {**DEFAULT_CFG_DICT, **args}  # what ultralytics' load_checkpoint attaches
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    arch = arch_of(model)
    if arch is None:
        raise UserError(f"{path}: ultralytics model carries no model YAML, so its architecture is unknown")
    model.detector_name = arch_name(arch)
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    meta = {"detector": model.detector_name, "num_classes": int(model.model[-1].nc),
            "names": [str(names[i]) for i in sorted(names)], "imgsz": args.get("imgsz"),
            "source": "ultralytics"}
    return model.eval(), meta
