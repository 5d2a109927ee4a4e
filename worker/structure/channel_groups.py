"""Channel groups read from a signature's graph (never from layer names).

Every signature of the model is frozen (``frozen.py``) and walked in topological order (``graph_walk.py``);
each op type has a rule (``rules.py``) saying how the channels (last axis, NHWC) of its inputs relate to those
of its outputs and which weight axes they index. Coupled channels end up in one union-find class; each class
with a member weight is a ``ChannelGroup``. Whatever a rule cannot explain (an op with no rule, a reduction or
normalisation over the channel axis, a weight read in a way no rule tracks, a signature input or output)
*freezes* the classes it touches: they are reported with the reason and never removed, so an unknown op never
yields a wrong model. All signatures are walked into the same classes, because the compact model must serve
all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.models.handle import ModelHandle
from worker.structure.frozen import FrozenSignature, freeze_signature
from worker.structure.graph_walk import ConsumerUse, Key, Role, RuleTable, ShapePatch, Walker
from worker.structure.layout import Layout, Spaces
from worker.structure.rules import DEFAULT_RULES

__all__ = ["ChannelGroup", "GroupAnalysis", "Member", "find_groups"]


@dataclass(frozen=True)
class Member:
    """One weight axis indexed by a group's channels."""

    variable: str
    axis: int
    role: Role
    positions: np.ndarray | None = None  # (channels, k) indices along ``axis``; None = channel c is index c
    tied: bool = False  # a depthwise kernel: its input channels are its output channels (not a source)

    def indices(self, channels: np.ndarray) -> np.ndarray:
        """Indices along ``axis`` of the given channel numbers."""
        if self.positions is None:
            return np.asarray(channels, dtype=np.int64)
        return self.positions[np.asarray(channels, dtype=np.int64)].ravel()


@dataclass
class ChannelGroup:
    id: str
    channels: int
    members: list[Member]
    prunable: bool
    reason: str | None
    constants: list[Member] = field(default_factory=list)  # frozen (non-variable) consts sliced with it

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]


@dataclass
class GroupAnalysis:
    groups: list[ChannelGroup]
    signature: str
    frozen: dict[str, FrozenSignature] = field(repr=False, default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # signature -> the identical one analysed
    bindings: dict[Key, Layout] = field(repr=False, default_factory=dict)
    dims: dict[Key, int] = field(repr=False, default_factory=dict)
    consumers: list[ConsumerUse] = field(repr=False, default_factory=list)
    patches: list[ShapePatch] = field(repr=False, default_factory=list)
    group_of_space: dict[int, str] = field(repr=False, default_factory=dict)
    spaces: Spaces = field(repr=False, default_factory=Spaces)

    def group(self, group_id: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def summary(self) -> list[dict[str, object]]:
        """JSON-ready view for metrics: id, channels, prunable/reason and members."""
        return [
            {
                "id": g.id,
                "channels": g.channels,
                "prunable": g.prunable,
                "reason": g.reason,
                "members": [{"variable": m.variable, "axis": m.axis, "role": m.role} for m in g.members],
            }
            for g in self.groups
        ]


def find_groups(handle: ModelHandle, signature: str, rules: RuleTable = DEFAULT_RULES) -> GroupAnalysis:
    """Channel groups of ``handle`` read from every signature's graph, ``signature`` first (its groups are
    listed in its topological order); a group is prunable only if every signature allows it. ``rules``: what
    the walk knows about ops (``rules.DEFAULT_RULES``)."""
    handle.function(signature)  # PipelineError signature_not_found
    names = [signature] + [n for n in sorted(handle.signatures) if n != signature]
    walker = Walker(handle, rules)
    frozen: dict[str, FrozenSignature] = {}
    aliases: dict[str, str] = {}
    seen: dict[bytes, str] = {}
    for name in names:
        mark = _fingerprint(handle, name)
        if mark in seen:  # Keras 3 export: `serve` and `serving_default` wrap the same call
            aliases[name] = seen[mark]
            continue
        seen[mark] = name
        frozen[name] = freeze_signature(handle, name)
        walker.walk(frozen[name])
    analysis = _collect(walker, signature, frozen)
    analysis.aliases = aliases
    return analysis


def _fingerprint(handle: ModelHandle, name: str) -> bytes:
    """Equal for two signatures whose wrapper graphs (inputs, the call, outputs) and captures are equal."""
    fn = handle.function(name)
    gdef = fn.graph.as_graph_def()
    del gdef.library.function[:]
    del gdef.library.gradient[:]
    for node in gdef.node:
        node.ClearField("device")
    captures = ",".join(str(id(ext)) for ext, _ in fn.graph.captures)
    return (
        gdef.SerializeToString(deterministic=True) + captures.encode() + repr(fn.structured_outputs).encode()
    )


def _collect(walker: Walker, signature: str, frozen: dict[str, FrozenSignature]) -> GroupAnalysis:
    spaces = walker.spaces
    variables = {nv.name for nv in walker.handle.variables()}
    for (wkey, axis), where in walker.untracked.items():
        for key, layout in walker.bindings.items():
            if key[0] == wkey and (axis == -1 or key[1] == axis):
                spaces.freeze_layout(layout, f"weight {wkey} is also read by {where}")
    by_root: dict[int, dict[Key, list[np.ndarray]]] = {}
    first: dict[int, int] = {}
    for rank, key in enumerate(walker.order):
        layout = walker.bindings.get(key)
        if layout is None:
            continue
        for seg in layout.segments:
            root = spaces.find(seg.space)
            by_root.setdefault(root, {}).setdefault(key, []).append(seg.positions)
            first.setdefault(root, rank)
    groups: list[ChannelGroup] = []
    group_of_space: dict[int, str] = {}
    for root in sorted(by_root, key=lambda r: first[r]):
        members: list[Member] = []
        constants: list[Member] = []
        for key, parts in by_root[root].items():
            pos = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            channels = spaces.size[root]
            identity = (
                pos.shape == (channels, 1)
                and walker.dims[key] == channels
                and np.array_equal(pos[:, 0], np.arange(channels))
            )
            member = Member(key[0], key[1], walker.roles[key], None if identity else pos, key in walker.tied)
            (members if key[0] in variables else constants).append(member)
        if not members:  # constants only (shape vectors, folded-in tensors): nothing a user can prune
            continue
        producers = [m for m in members if m.role == "producer"]
        # The reasons a person can act on least come first (only three are shown): a recurrent loop.
        reasons = sorted(spaces.reasons(root), key=lambda r: 0 if "While at" in r else 1)
        if not reasons and not producers:
            reasons = ["no layer's weights produce these channels"]
        if not reasons and spaces.size[root] <= 1:
            reasons = ["a single channel: removing it would remove the layer"]
        label = (producers or members)[0].variable
        gid = f"g{len(groups)}:{label}"
        group_of_space[root] = gid
        groups.append(
            ChannelGroup(
                id=gid,
                channels=spaces.size[root],
                members=members,
                prunable=not reasons,
                reason="; ".join(reasons[:3]) if reasons else None,
                constants=constants,
            )
        )
    return GroupAnalysis(
        groups=groups,
        signature=signature,
        frozen=frozen,
        bindings=walker.bindings,
        dims=walker.dims,
        consumers=walker.consumers,
        patches=walker.patches,
        group_of_space=group_of_space,
        spaces=spaces,
    )
