"""Channel spaces and layouts: the bookkeeping behind channel groups.

A *space* is a set of channels that must be removed together (a union-find class: a producer's output channels
and everything coupled to them). A *layout* says how the last axis of one tensor (or one axis of one weight) is
made of spaces: a list of segments ``(space, positions)`` where ``positions[c]`` are the indices along that axis
holding channel ``c`` of the space. A plain conv output is one segment with ``positions[c] = [c]``; a concat
shifts its inputs' positions by their offsets; a flatten repeats them once per spatial position; a depthwise
conv with multiplier ``m`` maps channel ``c`` to ``c*m .. c*m+m-1``. Torch-Pruning's index mappings play the
same role (for NCHW); here the channel axis is always the last one (NHWC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    space: int
    positions: np.ndarray  # (channels of the space, k) int64 indices along the axis


@dataclass(frozen=True)
class Layout:
    length: int
    segments: tuple[Segment, ...]

    def shifted(self, offset: int) -> tuple[Segment, ...]:
        return tuple(Segment(s.space, s.positions + offset) for s in self.segments)

    def tiled(self, repeats: int) -> Layout:
        """The layout after flattening ``repeats`` leading positions into this axis (row-major)."""
        segs = []
        for s in self.segments:
            blocks = [s.positions + r * self.length for r in range(repeats)]
            segs.append(Segment(s.space, np.concatenate(blocks, axis=1)))
        return Layout(self.length * repeats, tuple(segs))

    def multiplied(self, mult: int) -> Layout:
        """The layout of a depthwise conv's output with channel multiplier ``mult`` (index ``c*mult + m``)."""
        segs = []
        for s in self.segments:  # each position p becomes p*mult .. p*mult + mult-1, in that order
            pos = s.positions[:, :, None] * mult + np.arange(mult)[None, None, :]
            segs.append(Segment(s.space, pos.reshape(s.positions.shape[0], -1)))
        return Layout(self.length * mult, tuple(segs))

    def divided(self, inner: int) -> Layout | None:
        """The inverse of ``multiplied``: the layout of the outer axis when this axis is split into
        ``(length // inner, inner)`` row-major (attention heads: ``[.., heads * head_dim] -> [.., heads,
        head_dim]``). None unless every channel covers whole blocks of ``inner`` consecutive indices (then
        removing a channel removes whole outer indices)."""
        if inner <= 0 or self.length % inner:
            return None
        segs = []
        for s in self.segments:
            pos = np.sort(s.positions, axis=1)
            if pos.shape[1] % inner:
                return None
            blocks = pos.reshape(pos.shape[0], -1, inner)
            base = blocks[:, :, :1]
            if np.any(base % inner) or not np.array_equal(blocks, base + np.arange(inner)[None, None, :]):
                return None
            segs.append(Segment(s.space, base[:, :, 0] // inner))
        return Layout(self.length // inner, tuple(segs))


class Spaces:
    """Union-find over channel spaces; a frozen space keeps the reasons it cannot be pruned."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.size: list[int] = []
        self._reasons: dict[int, list[str]] = {}

    def new(self, size: int, reason: str | None = None) -> int:
        sid = len(self._parent)
        self._parent.append(sid)
        self.size.append(size)
        if reason:
            self._reasons[sid] = [reason]
        return sid

    def identity(self, size: int, reason: str | None = None) -> Layout:
        sid = self.new(size, reason)
        return Layout(size, (Segment(sid, np.arange(size, dtype=np.int64)[:, None]),))

    def find(self, sid: int) -> int:
        root = sid
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[sid] != root:
            self._parent[sid], sid = root, self._parent[sid]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"cannot couple spaces of {self.size[ra]} and {self.size[rb]} channels")
        keep, drop = min(ra, rb), max(ra, rb)
        self._parent[drop] = keep
        moved = self._reasons.pop(drop, [])
        if moved:
            self._reasons.setdefault(keep, []).extend(
                r for r in moved if r not in self._reasons.get(keep, [])
            )
        return keep

    def freeze(self, sid: int, reason: str) -> None:
        reasons = self._reasons.setdefault(self.find(sid), [])
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, sid: int) -> list[str]:
        return list(self._reasons.get(self.find(sid), []))

    def freeze_layout(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            for seg in layout.segments:
                self.freeze(seg.space, reason)


def substituted(layout: Layout, find: Callable[[int], int], root: int, coarse: Layout) -> Layout:
    """``layout`` with every segment of space class ``root`` re-expressed through ``coarse``: a layout over
    that space's channels whose segments say which of them each coarser channel covers (grouped-query
    attention: query head ``g*r + j`` belongs to key/value group ``g``)."""
    segs: list[Segment] = []
    for seg in layout.segments:
        if find(seg.space) != root:
            segs.append(seg)
            continue
        for part in coarse.segments:  # part.positions[s] = fine channels of coarse channel s
            segs.append(
                Segment(part.space, seg.positions[part.positions].reshape(part.positions.shape[0], -1))
            )
    return Layout(layout.length, tuple(segs))


def same_structure(a: Layout, b: Layout) -> bool:
    """Two layouts whose segments line up one to one (same lengths and positions)."""
    if a.length != b.length or len(a.segments) != len(b.segments):
        return False
    return all(
        sa.positions.shape == sb.positions.shape and np.array_equal(sa.positions, sb.positions)
        for sa, sb in zip(a.segments, b.segments, strict=True)
    )
