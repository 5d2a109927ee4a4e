"""Channel groups read from a signature's graph, and the rewrite into a smaller SavedModel.

A library like ``worker/pruning``: a ``ModelHandle`` and arrays in, a model directory out; no Celery, no store.
``find_groups`` says which channels must go together (and which cannot go, and why); ``compact`` writes the
SavedModel without the channels a keep vector drops, computing what the masked model computes.
"""

from worker.structure.channel_groups import ChannelGroup, GroupAnalysis, Member, find_groups
from worker.structure.compact import CompactResult, compact, max_abs_diff, probe_inputs
from worker.structure.masks import group_masks

__all__ = [
    "ChannelGroup",
    "CompactResult",
    "GroupAnalysis",
    "Member",
    "compact",
    "find_groups",
    "group_masks",
    "max_abs_diff",
    "probe_inputs",
]
