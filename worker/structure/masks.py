"""Masks that zero whole channel groups, the way compaction expects a masked model to look.

Zeroing a group's producers' slices makes its channels input-independent; zeroing the carriers too (bias,
BatchNorm gamma/beta, per-channel scales) makes them exactly zero, so nothing needs folding. Consumers (the next
layer's input slices) are left alone: their values do not matter once the channel is zero, and compaction drops
them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from worker.models.handle import ModelHandle
from worker.structure.channel_groups import GroupAnalysis


def group_masks(
    handle: ModelHandle,
    analysis: GroupAnalysis,
    keep: Mapping[str, np.ndarray],
    carriers: bool = True,
) -> dict[str, np.ndarray]:
    """Variable name -> 0/1 mask (its dtype and shape) for the channels ``keep`` drops in prunable groups;
    variables no group touches are absent."""
    shapes = {nv.name: (nv.shape, nv.var.dtype.as_numpy_dtype) for nv in handle.variables()}
    masks: dict[str, np.ndarray] = {}
    for group in analysis.groups:
        if group.id not in keep or not group.prunable:
            continue
        drop = np.flatnonzero(~np.asarray(keep[group.id], dtype=bool))
        if drop.size == 0:
            continue
        for member in group.members:
            if member.role == "consumer" or (member.role == "carrier" and not carriers):
                continue
            shape, dtype = shapes[member.variable]
            mask = masks.setdefault(member.variable, np.ones(shape, dtype=dtype))
            view = np.moveaxis(mask, member.axis, 0)
            view[member.indices(drop)] = 0
    return masks
