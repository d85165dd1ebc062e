"""The compressible view of a detector: layers, coupled channel groups, skippable blocks.

Built once per detector (and weights) with torch-pruning's DependencyGraph; a
policy then names what to do with each group, layer and block by stable
names (module paths). The view also keeps, per group, the precomputed map
from the group's channels to every coupled tensor dimension, so applying a
policy is index selection, with no graph tracing per candidate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from ultralytics.nn.modules import Detect
from ultralytics.nn.modules.block import Attention, Bottleneck, PSABlock

from rsdet_compress.compress.blocks import make_prunable
from rsdet_compress.compress.cost import kept_channels
from rsdet_compress.compress.pruners import CUSTOM_PRUNERS
from rsdet_compress.errors import UserError


@dataclass(frozen=True)
class LayerInfo:
    """A conv layer as the cost model and the agent see it (shapes at the view's input size)."""

    name: str
    kind: str  # "conv" | "depthwise" | "pointwise"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    #: channel group that the OUTPUT channels follow (None: not prunable).
    out_group: str | None
    #: a channel group the INPUT channels follow (None: image input or not prunable). A concat's
    #: consumer reads several groups: count its kept inputs with ``CompressibleView.kept``.
    in_group: str | None
    protected: bool
    has_bias: bool
    #: the BatchNorm that normalises this conv's output (folded into it for deployment), if any.
    bn: str | None = None

    @property
    def macs(self) -> int:
        kh, kw = self.kernel
        return self.out_hw[0] * self.out_hw[1] * self.out_channels * (self.in_channels // self.groups) * kh * kw

    @property
    def params(self) -> int:
        """Weights, bias and the following BatchNorm's affine parameters (as nn.Module counts them)."""
        kh, kw = self.kernel
        extra = (1 if self.has_bias else 0) + (2 if self.bn else 0)
        return self.out_channels * ((self.in_channels // self.groups) * kh * kw + extra)


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together (residual adds, concats, depthwise)."""

    name: str  # the first conv (in module order) whose output channels are this group
    size: int
    #: conv layers whose output channels are this group (the bit-width owners).
    layers: list[str]
    #: pruning plan: (module path, torch-pruning handler, [(dep idx, group channel)]) per coupled tensor.
    plan: list = field(default_factory=list, repr=False)
    #: the conv torch-pruning traced the group from; "group channel" numbers are its output channels.
    root: str = ""


@dataclass(frozen=True)
class SkippableBlock:
    """A residual block ``x + f(x)`` whose removal (f := 0) leaves a valid network."""

    name: str
    layers: tuple[str, ...]


def layer_patterns(patterns: list[str], flag: str = "--unprunable") -> list[re.Pattern]:
    """``patterns`` compiled; one that is not a regular expression is refused in one line naming ``flag``."""
    out = []
    for pattern in patterns:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise UserError(f"{flag} {pattern!r}: not a regular expression ({e})") from None
    return out


def _protected_modules(model: nn.Module, extra: list[str]) -> set[nn.Module]:
    """Detect's final prediction convs, DFL, attention internals, plus user patterns (regex on names)."""
    keep: set[nn.Module] = set()
    for m in model.modules():
        if isinstance(m, Detect):
            for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
                for seq in getattr(m, branch, None) or []:
                    keep.add(seq[-1])
            keep.update(c for c in m.dfl.modules() if isinstance(c, nn.Conv2d))
        if isinstance(m, Attention):  # head-reshaped channels: torch-pruning's index maps explode here
            keep.update(c for c in m.modules() if isinstance(c, nn.Conv2d))
    # a depthwise conv on the image itself: its channels are the RGB input, which cannot shrink
    image = torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device)
    first: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: first.append(mod) if args[0] is image else None)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:  # not inference mode: see probe
        with torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
    keep.update(m for m in first if _conv_kind(m) == "depthwise")
    patterns = layer_patterns(extra, "protect")
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and any(p.search(name) for p in patterns):
            keep.add(m)
    return keep


def _conv_kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise"
    if conv.kernel_size == (1, 1):
        return "pointwise"
    return "conv"


def probe(model: nn.Module, hooks: list, imgsz: int = 64) -> None:
    """One no-grad forward of a blank ``imgsz`` image through ``model``; ``hooks`` (handles) removed after."""
    try:  # not inference mode: the head caches anchors at this size, which a traced forward must be able to use
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()


def _shapes(model: nn.Module, imgsz: int) -> dict[nn.Module, tuple[tuple[int, int], tuple[int, int]]]:
    """(input hw, output hw) of every conv for one forward at imgsz x imgsz."""
    shapes = {}
    probe(model, [m.register_forward_hook(lambda mod, i, o: shapes.__setitem__(mod, (tuple(i[0].shape[-2:]),
                                                                                     tuple(o.shape[-2:]))))
                  for m in model.modules() if isinstance(m, nn.Conv2d)], imgsz)
    return shapes


def _matching_convs(model: nn.Module, patterns: list[str], flag: str) -> set[nn.Module]:
    """Conv layers whose module path matches one of ``patterns`` (regex search); each must match one."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    found: set[nn.Module] = set()
    for pattern, rx in zip(patterns, layer_patterns(patterns, flag)):
        hits = [m for n, m in convs.items() if rx.search(n)]
        if not hits:
            raise UserError(f"{flag} {pattern!r}: matches no conv layer of this detector "
                            f"(its last ones: {', '.join(list(convs)[-3:])})")
        found.update(hits)
    return found


class CompressibleView:
    """What can be compressed in a detector, by stable module paths.

    ``layers``: every conv (protected ones included, for costing);
    ``groups``: prunable channel groups; ``blocks``: skippable residual blocks;
    ``protected``: layers never pruned or quantized (kept float);
    ``unprunable`` (regex patterns on conv names, e.g. ``model\\.22\\.`` for a head): layers whose
    output channels stay whole but may still be quantized, as torch-pruning's ``ignored_layers``.
    ``model`` is the detector with splitting blocks rewritten (see
    :func:`make_prunable`): the float reference every policy applies to.
    """

    def __init__(self, model: nn.Module, imgsz: int = 640, protect: list[str] | None = None,
                 unprunable: list[str] | None = None):
        self.detector = getattr(model, "detector_name", None)
        self.imgsz = imgsz
        was_training = model.training
        model.eval()
        make_prunable(model)
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        protected = _protected_modules(model, protect or [])
        self.protected = sorted(self.names[m] for m in protected)
        example = torch.zeros(1, 3, imgsz, imgsz, device=next(model.parameters()).device)
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                           customized_pruners=CUSTOM_PRUNERS)
        # channels that stay whole but may still be quantized (e.g. SkyNet's reorg source)
        fixed = {model.get_submodule(n) for n in getattr(model, "unprunable_layers", ())}
        fixed |= _matching_convs(model, list(unprunable or []), "--unprunable")
        self.groups: dict[str, ChannelGroup] = {}
        out_group, in_group = {}, {}
        for g in self.graph.get_all_groups(ignored_layers=list(protected | fixed), root_module_types=[nn.Conv2d]):
            root = self.names[g[0].dep.target.module]
            group = ChannelGroup(root, len(g[0].idxs), [], root=root)
            for item in g:
                dep, mod = item.dep, item.dep.target.module
                if mod not in self.names:
                    continue  # functional nodes (concat, split) carry no parameters
                name = self.names[mod]
                group.plan.append((name, dep.handler, list(zip(item.idxs, item.root_idxs))))
                if isinstance(mod, nn.Conv2d):
                    if self.graph.is_out_channel_pruning_fn(dep.handler):
                        out_group[name] = group
                        if name not in group.layers:
                            group.layers.append(name)
                    else:
                        in_group[name] = group
            order = {n: k for k, n in enumerate(self.names.values())}
            group.layers.sort(key=order.__getitem__)
            group.name = group.layers[0] if group.layers else root
            self.groups[group.name] = group
        for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]:
            if _conv_kind(conv) == "depthwise" and name in out_group:
                in_group[name] = out_group[name]  # a depthwise conv's input is its output group
        out_group = {k: g.name for k, g in out_group.items()}  # groups are named once all members are known
        in_group = {k: g.name for k, g in in_group.items()}
        bn_of = {}
        for m, node in self.graph.module2node.items():
            if isinstance(m, nn.BatchNorm2d):
                convs = [i.module for i in node.inputs if isinstance(i.module, nn.Conv2d)]
                if len(convs) == 1:
                    bn_of[self.names[convs[0]]] = self.names[m]
        shapes = _shapes(model, imgsz)
        self.layers: dict[str, LayerInfo] = {}
        for m, name in self.names.items():
            if isinstance(m, nn.Conv2d) and m in shapes:
                in_hw, out_hw = shapes[m]
                self.layers[name] = LayerInfo(
                    name, _conv_kind(m), m.in_channels, m.out_channels, tuple(m.kernel_size), m.stride[0],
                    m.groups, in_hw, out_hw, out_group.get(name), in_group.get(name), m in protected,
                    m.bias is not None, bn_of.get(name))
        self.blocks = [SkippableBlock(self.names[m], tuple(n for n in self.layers
                                                           if n.startswith(self.names[m] + ".")))
                       for m in model.modules() if isinstance(m, (Bottleneck, PSABlock)) and getattr(m, "add", False)]
        model.train(was_training)

    def kept(self, layer: str, dim: str, policy) -> int:
        """Channels of ``layer``'s ``dim`` ("out" or "in") that ``policy`` keeps (see cost.kept_channels)."""
        return kept_channels(self, layer, dim, policy)

    @property
    def quantizable(self) -> list[str]:
        """Conv layers a policy gives bit-widths to (all but the protected ones)."""
        return [n for n, layer in self.layers.items() if not layer.protected]

    def summary(self) -> str:
        """Counts for the terminal."""
        params = sum(layer.params for layer in self.layers.values())
        return (f"{self.detector}: {len(self.layers)} conv layers ({len(self.quantizable)} quantizable, "
                f"{len(self.protected)} protected), {len(self.groups)} prunable channel groups, "
                f"{len(self.blocks)} skippable blocks, {params:,} conv params")
