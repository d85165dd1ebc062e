"""A detector's top-level layers as reconstruction units, and how a compressed unit's channels map to the float's.

Reconstruction (:mod:`rsdet_compress.compress.reconstruct`) fits each
top-level layer of the compressed detector (``model.model[i]``: a Conv, C2f,
SPPF, Concat or Detect of YOLO; a bundle, pool, reorg or the head of SkyNet)
to reproduce the float detector's output of the same layer. Pruning removed
channels, so a compressed layer's output holds a subset of the float output's
channels. :func:`build_units` gives that subset per layer, in float numbering,
from the resolved policy and the view's pruning plan (the same plan that cut
the channels), so the float output can be sliced into the compressed layer's
target exactly.

A unit's output follows the last module inside it that sets channels (a conv,
or a module with a pruning handler such as SkyNet's reorg); a unit with none
(pooling, upsampling) passes its input's channels on; a concat joins its
inputs'. Detect heads output whole predictions (their last convs are never
pruned): no map.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from ultralytics.nn.modules import Detect

from rsdet_compress.compress.policy import Policy
from rsdet_compress.compress.view import CompressibleView, probe


@dataclass
class Unit:
    """One top-level layer, float and compressed side by side."""

    index: int
    name: str
    #: where its input comes from (ultralytics' ``m.f``): -1 the previous layer, an index, or a list of them.
    source: int | list[int]
    float: nn.Module
    compressed: nn.Module
    #: kept output channels in float numbering; None: the output has all of the float's channels.
    out_map: torch.Tensor | None
    #: a Detect head: its output is the raw prediction dict.
    head: bool
    #: kept output channels of the pruned modules inside the unit (float numbering), by module path.
    module_maps: dict[str, list[int]] = field(default_factory=dict)
    #: conv path -> the BatchNorm path that follows it, inside the unit.
    bn_of: dict[str, str] = field(default_factory=dict)


def out_channel_maps(view: CompressibleView, policy: Policy) -> dict[str, list[int]]:
    """Kept output channels (float numbering) of every module whose output side the policy prunes."""
    cut: dict[str, set[int]] = {}
    for gname, spec in policy.groups.items():
        group = view.groups[gname]
        pruned = set(range(group.size)) - set(spec["keep_idx"])
        if not pruned:
            continue
        for module_name, handler, pairs in group.plan:
            if view.graph.is_out_channel_pruning_fn(handler):
                cut.setdefault(module_name, set()).update(i for i, root in pairs if root in pruned)
    maps = {}
    for name, idxs in cut.items():
        size = view.graph.get_out_channels(view.model.get_submodule(name))
        maps[name] = [i for i in range(int(size)) if i not in idxs]
    return maps


def _last_producers(model: nn.Module, producers: set[str], imgsz: int) -> dict[int, str]:
    """For each top-level layer, the last channel-setting module it ran in one probe forward."""
    last: dict[int, str] = {}
    hooks = []
    for i, unit in enumerate(model.model):
        for name, m in unit.named_modules(prefix=f"model.{i}"):
            if name in producers or isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(lambda mod, a, o, i=i, name=name: last.__setitem__(i, name)))
    probe(model, hooks, imgsz)
    return last


def _out_channels(model: nn.Module, imgsz: int) -> dict[int, int]:
    """Channels of each top-level layer's tensor output (heads excluded) for one probe forward."""
    sizes: dict[int, int] = {}
    probe(model, [unit.register_forward_hook(
        lambda mod, a, o, i=i: sizes.__setitem__(i, o.shape[1]) if isinstance(o, torch.Tensor) else None)
        for i, unit in enumerate(model.model)], imgsz)
    return sizes


def build_units(float_model: nn.Module, compressed: nn.Module, view: CompressibleView, policy: Policy,
                probe: int = 64) -> list[Unit]:
    """The units of a compressed detector and its float original (the view's model, rewritten the same way).

    Raises ValueError when the two don't line up layer for layer, or a map disagrees with the
    compressed layer's channel count (a policy that does not belong to these weights).
    """
    if len(float_model.model) != len(compressed.model):
        raise ValueError(f"float model has {len(float_model.model)} layers, compressed {len(compressed.model)}")
    maps = out_channel_maps(view, policy)
    last = _last_producers(float_model, set(maps), probe)
    float_ch, comp_ch = _out_channels(float_model, probe), _out_channels(compressed, probe)
    units: list[Unit] = []
    out_maps: dict[int, torch.Tensor | None] = {}
    for i, (fm, cm) in enumerate(zip(float_model.model, compressed.model, strict=True)):
        source = fm.f
        prev = i - 1
        inputs = [prev if j == -1 else j for j in (source if isinstance(source, list) else [source])]
        head = isinstance(fm, Detect)
        if head:
            omap = None
        elif i in last:
            kept = maps.get(last[i])
            # long even when empty: a concat group may drop every channel of one input (SkyNet's reorg)
            omap = torch.tensor(kept, dtype=torch.long) if kept is not None else None
        elif len(inputs) > 1:  # concat: the inputs' maps, offset by the float channels before each
            parts, offset = [], 0
            for j in inputs:
                m = out_maps[j]
                parts.append((m if m is not None else torch.arange(float_ch[j])) + offset)
                offset += float_ch[j]
            joined = torch.cat(parts)
            omap = None if len(joined) == offset else joined
        else:
            omap = out_maps.get(inputs[0]) if inputs[0] >= 0 else None
        if not head and i in comp_ch:
            expect = len(omap) if omap is not None else float_ch[i]
            if expect != comp_ch[i]:
                raise ValueError(f"layer model.{i}: compressed output has {comp_ch[i]} channels, the policy "
                                 f"keeps {expect} of {float_ch[i]}")
        out_maps[i] = omap
        name = f"model.{i}"
        inside = {k: v for k, v in maps.items() if k.startswith(name + ".")}
        bns = {k: layer.bn for k, layer in view.layers.items() if layer.bn and k.startswith(name + ".")}
        units.append(Unit(i, name, source, fm, cm, omap, head, inside, bns))
    return units


def select(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """``x``'s channels (dim 1) at ``index`` (all when None)."""
    return x if index is None else x.index_select(1, index.to(x.device))
