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
                if len(bits) != len(keep):
                    raise UserError(f"round8: layer {lname}: {len(bits)} bit-widths for {len(keep)} kept channels")
                old, fill = dict(zip(keep, bits)), _common_bits(bits)
                layers[lname]["weight_bits"] = [old.get(i, fill) for i in new]
        groups[name] = {"keep_idx": new}
        added, changed = added + len(extra), changed + 1
    info = {"groups_changed": changed, "channels_added": added}
    if not changed:
        return policy, info
    rounded = Policy.from_dict({**policy.to_dict(), "groups": groups, "layers": layers}, source="round8 policy")
    return ws.resolve(rounded, source="round8 policy"), info
