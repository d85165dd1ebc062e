"""Round a resolved policy's kept channels up to a multiple of 8 (int8 SIMD / tensor-core granularity).

A 61-channel conv costs as much as a 64-channel one in int8 kernels, so the
three extra channels are free accuracy. Every pruned group's kept count is
rounded up (never beyond the group's float size) by re-adding the next most
important channels under the policy's own criterion, ranked on the float
weights; added channels get their layer's most common bit-width. Used by
``compress --round8`` (before fine-tuning, so QAT trains the final structure)
and ``export --round8`` (for checkpoints that were not fine-tuned).
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from rsdet_compress.compress.policy import Policy
from rsdet_compress.errors import UserError

#: channel multiple of int8 SIMD lanes (AVX-512 VNNI: 16 x int8 per 4-byte group) and tensor-core tiles
CHANNEL_MULTIPLE = 8


def _common_bits(bits: list[int]) -> int:
    counts = Counter(bits)
    return max(counts, key=lambda b: (counts[b], b))


def _out_pairs(view, group: str, layer: str) -> list[tuple[int, int]]:
    """(output channel of ``layer``, channel of ``group``) pairs, by output channel.

    A layer whose output is one slice of a wider group (SkyNet: a conv
    concatenated with a reorg before a depthwise conv) owns only some of the
    group's channels, so its per-channel bit list is not indexed by group channel.
    """
    is_out = view.graph.is_out_channel_pruning_fn
    pairs = {(int(i), int(r)) for mod, handler, ps in view.groups[group].plan
             if mod == layer and is_out(handler) for i, r in ps}
    return sorted(pairs)


def _rebit(view, group: str, layer: str, bits: list[int], keep: set[int], new: set[int]) -> list[int]:
    """``layer``'s per-channel bit list for group channels ``new`` instead of ``keep``.

    Added channels get the common width.
    """
    pairs = _out_pairs(view, group, layer) or [(r, r) for r in range(view.groups[group].size)]
    if len(pairs) != view.layers[layer].out_channels:
        raise UserError(f"round8: layer {layer}: output channels follow more than group {group}")
    old = [i for i, r in pairs if r in keep]
    if len(bits) != len(old):
        raise UserError(f"round8: layer {layer}: {len(bits)} bit-widths for {len(old)} kept channels")
    bit_of, fill = dict(zip(old, bits)), _common_bits(bits)
    return [bit_of.get(i, fill) for i, r in pairs if r in new]


def round_policy(ws, policy: Policy, multiple: int = CHANNEL_MULTIPLE) -> tuple[Policy, dict]:
    """A resolved ``policy`` (``keep_idx`` per group) with kept counts rounded up to ``multiple``.

    ``ws`` is the :class:`~rsdet_compress.compress.compressor.Workspace` of the float
    weights (its ``grad_set`` feeds gradient criteria). Returns the re-resolved policy
    and ``{"groups_changed", "channels_added"}``.
    """
    groups, layers, added, changed = {}, {k: dict(v) for k, v in policy.layers.items()}, 0, 0
    scores = None
    for name, spec in policy.groups.items():
        if "keep_idx" not in spec:
            raise UserError(f"round8 needs a resolved policy (keep_idx per group); group {name} has none")
        keep = sorted(spec["keep_idx"])
        size = ws.view.groups[name].size
        target = min(size, math.ceil(len(keep) / multiple) * multiple)
        if target <= len(keep):
            groups[name] = {"keep_idx": keep}
            continue
        scores = ws.scores(policy.criterion) if scores is None else scores
        order = torch.argsort(scores[name], descending=True, stable=True).tolist()
        kept = set(keep)
        extra = [i for i in order if i not in kept][:target - len(keep)]
        new = sorted(keep + extra)
        for lname in ws.view.groups[name].layers:  # per-channel bit lists follow the kept channels
            bits = layers.get(lname, {}).get("weight_bits")
            if isinstance(bits, list):
                layers[lname]["weight_bits"] = _rebit(ws.view, name, lname, bits, set(keep), set(new))
        groups[name] = {"keep_idx": new}
        added, changed = added + len(extra), changed + 1
    info = {"groups_changed": changed, "channels_added": added}
    if not changed:
        return policy, info
    rounded = Policy.from_dict({**policy.to_dict(), "groups": groups, "layers": layers}, source="round8 policy")
    return ws.resolve(rounded, source="round8 policy"), info
