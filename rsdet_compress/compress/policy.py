"""The compression policy: one JSON file carrying pruning, per-channel bits and block skips.

AJPQ's idea: pruning is quantization to 0 bits. A policy says, per channel
group, which channels keep any bits (a keep ratio ranked by an importance
criterion, or an explicit list); per conv layer, the bit-width of each kept
output channel and of its input activations; per residual block, keep or
skip. It is the single hand-off between search, fine-tune and export.

Schema (version 1)::

    {"schema": "rsdet-compress/policy", "version": 1,
     "detector": "yolov8n", "imgsz": 640, "weights": "<sha256 prefix of the float weights>",
     "criterion": "l1", "min_channels": 1,
     "groups": {"model.2.cv1a.conv": {"keep": 0.5} | {"keep_idx": [0, 3, ...]}},
     "layers": {"model.2.cv1a.conv": {"weight_bits": 4 | [4, 8, ...], "act_bits": 8}},
     "blocks": {"model.2.m.0": "skip"},
     "default_weight_bits": 32, "default_act_bits": 32}

Missing entries mean "leave as is": all channels kept, float weights and
activations, block kept. ``weight_bits`` as a list gives one width per KEPT
output channel, in ascending channel order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rsdet_compress.atomic import write_text
from rsdet_compress.compress.importance import CRITERIA, DEFAULT_CRITERION
from rsdet_compress.compress.quant import FLOAT_BITS
from rsdet_compress.errors import UserError

SCHEMA = "rsdet-compress/policy"
VERSION = 1
#: allowed weight bit-widths; 32 = leave in float. (0 = pruned is expressed by the group's keep.)
WEIGHT_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)
#: allowed activation bit-widths.
ACT_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)


def fingerprint(model: nn.Module) -> str:
    """Short sha256 of a model's floating-point tensors: ties a policy to the weights it was made for."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if v.is_floating_point():
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Policy:
    """A versioned compression policy (see module docstring for the JSON schema)."""

    detector: str
    imgsz: int = 640
    weights: str | None = None
    criterion: str = DEFAULT_CRITERION
    min_channels: int = 1
    groups: dict[str, dict] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    blocks: dict[str, str] = field(default_factory=dict)
    default_weight_bits: int = FLOAT_BITS
    default_act_bits: int = FLOAT_BITS
    #: MLflow run id of the search that found this policy (fine-tuning logs as its child); None if hand-made
    search_run: str | None = None

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "policy") -> Policy:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UserError(f"{source}: not an rsdet-compress policy (field 'schema' must be {SCHEMA!r})")
        if data.get("version") != VERSION:
            raise UserError(f"{source}: policy version {data.get('version')!r} not supported (expected {VERSION})")
        body = {k: v for k, v in data.items() if k not in ("schema", "version")}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(body) - known)
        if unknown:
            raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}")
        if "detector" not in body:
            raise UserError(f"{source}: field 'detector' missing")
        for key, typ in (("groups", dict), ("layers", dict), ("blocks", dict)):
            if not isinstance(body.get(key, {}), typ):
                raise UserError(f"{source}: field '{key}' must be an object")
        return cls(**body)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (complete or absent, never half-written)."""
        return write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: policy file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(data, source=str(path))

    # ---------------------------------------------------------- validation
    def validate(self, view, weights: str | None = None, source: str = "policy") -> None:
        """Check the policy against a :class:`CompressibleView` (and the weights' fingerprint).

        Errors name the layer/group/block and the problem, on one line.
        """
        if view.detector and self.detector != view.detector:
            raise UserError(f"{source}: policy is for detector {self.detector!r}, not {view.detector!r}")
        if weights and self.weights and self.weights != weights:
            raise UserError(f"{source}: policy was made for other weights "
                            f"(fingerprint {self.weights}, these are {weights})")
        if self.criterion not in CRITERIA:
            raise UserError(f"{source}: unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.min_channels < 1:
            raise UserError(f"{source}: min_channels must be >= 1")
        for key, allowed in (("default_weight_bits", WEIGHT_BITS), ("default_act_bits", ACT_BITS)):
            if getattr(self, key) not in allowed:
                raise UserError(f"{source}: {key} {getattr(self, key)} not in {allowed}")
        for name, spec in self.groups.items():
            where = f"{source}: group {name}"
            group = view.groups.get(name)
            if group is None:
                raise UserError(f"{where}: unknown channel group")
            keys = {"keep", "keep_idx"}
            if not isinstance(spec, dict) or len(set(spec) & keys) != 1 or set(spec) - keys:
                raise UserError(f"{where}: give exactly one of 'keep' (ratio) or 'keep_idx' (list)")
            if "keep" in spec:
                r = spec["keep"]
                if not isinstance(r, (int, float)) or not 0 < r <= 1:
                    raise UserError(f"{where}: keep ratio must be in (0, 1], got {r!r} (a group cannot be empty)")
            else:
                idx = spec["keep_idx"]
                if (not isinstance(idx, list) or not idx or len(set(idx)) != len(idx)
                        or not all(isinstance(i, int) and 0 <= i < group.size for i in idx)):
                    raise UserError(f"{where}: keep_idx must be distinct channel numbers in 0..{group.size - 1}, "
                                    "at least one")
        for name, spec in self.layers.items():
            where = f"{source}: layer {name}"
            layer = view.layers.get(name)
            if layer is None:
                raise UserError(f"{where}: unknown layer")
            if layer.protected:
                raise UserError(f"{where}: layer is protected (never pruned or quantized)")
            if not isinstance(spec, dict) or set(spec) - {"weight_bits", "act_bits"}:
                raise UserError(f"{where}: allowed keys are weight_bits and act_bits")
            bits = spec.get("weight_bits", self.default_weight_bits)
            values = bits if isinstance(bits, list) else [bits]
            bad = [b for b in values if b not in WEIGHT_BITS]
            if bad:
                raise UserError(f"{where}: weight bits {bad[0]!r} not in {WEIGHT_BITS}")
            if isinstance(bits, list):
                try:
                    kept = view.kept(name, "out", self)
                except ValueError:  # depends on which channels the ranking keeps: checked when applied
                    continue
                if len(bits) != kept:
                    raise UserError(f"{where}: {len(bits)} weight bit-widths for {kept} kept output channels")
            if spec.get("act_bits", self.default_act_bits) not in ACT_BITS:
                raise UserError(f"{where}: act bits {spec.get('act_bits')!r} not in {ACT_BITS}")
        names = {b.name for b in view.blocks}
        for name, action in self.blocks.items():
            if name not in names:
                raise UserError(f"{source}: block {name}: unknown skippable block")
            if action not in ("skip", "keep"):
                raise UserError(f"{source}: block {name}: action must be 'skip' or 'keep', got {action!r}")

    def kept_count(self, view, group_name: str | None, full: int) -> int:
        """How many channels of ``group_name`` this policy keeps (``full`` if it is not pruned)."""
        spec = self.groups.get(group_name) if group_name else None
        if not spec:
            return full
        if "keep_idx" in spec:
            return len(spec["keep_idx"])
        size = view.groups[group_name].size
        return min(size, max(self.min_channels, round(size * spec["keep"])))

    @property
    def skipped(self) -> list[str]:
        return sorted(n for n, a in self.blocks.items() if a == "skip")

    def changes_structure(self, view) -> bool:
        """Whether any channel is pruned or any block skipped (quantization alone keeps the structure)."""
        return bool(self.skipped) or any(self.kept_count(view, name, view.groups[name].size) < view.groups[name].size
                                         for name in self.groups)


def resolve(policy: Policy, view, scores: dict[str, torch.Tensor] | None = None) -> Policy:
    """A copy of ``policy`` with every keep ratio turned into an explicit, sorted ``keep_idx``.

    ``scores`` maps group name -> importance per channel (higher = keep);
    groups with a ratio need it. The resolved policy is what a compressed
    checkpoint stores, so reloading needs no importance computation.
    """
    out = Policy(**{**asdict(policy), "groups": {}})
    for name, spec in policy.groups.items():
        if "keep_idx" in spec:
            out.groups[name] = {"keep_idx": sorted(spec["keep_idx"])}
            continue
        if scores is None or name not in scores:
            raise ValueError(f"group {name} has a keep ratio but no importance scores were given")
        n = policy.kept_count(view, name, view.groups[name].size)
        order = torch.argsort(scores[name], descending=True, stable=True)[:n]
        out.groups[name] = {"keep_idx": sorted(int(i) for i in order)}
    return out
