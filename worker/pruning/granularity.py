"""Granularities: how element scores of one variable become a keep-mask (what is removed together).

A restored SavedModel only gives variables (a name and a shape), so the granularity first needs the variable's
*kind* -- which axis holds output channels, which axis is the reduction (input) axis. ``infer_kind`` derives it
from the shape plus name hints, and from the paired bias's size when names are silent.

Kinds (``Kind``) and the rules ``infer_kind`` applies, in order (``leaf`` = last ``/`` component of the name
without ``:N``; ``layer`` = the component before it):

==================  ===============================  ======================================================
kind                shape                            recognised by (first rule that matches)
==================  ===============================  ======================================================
``vector``          rank 0 or 1                      rank (biases, BatchNorm gamma/beta, ...)
``bias``            any rank                         ``bias`` in ``leaf`` (GRU's bias is ``[2, 3*units]``)
``other``           rank > 5                         rank: no known kernel layout
``recurrent``       ``[k..., in, gates*units]``      ``leaf == "recurrent_kernel"`` or ``layer`` is an
                                                     ``lstm``/``gru``/``rnn``/``*_cell`` (LSTM/GRU, ConvLSTM)
``embedding``       ``[vocab, dim]``                 rank 2 and ``embedding`` in ``leaf`` (or in ``layer``
                                                     when ``leaf`` is not ``kernel``)
``dense``           ``[in, out]``                    any other rank 2 (also plain ``tf.Module`` matrices)
``einsum``          rank 3-5                         ``einsum``/``attention``/``query|key|value`` in
                                                     ``layer`` or ``leaf``: EinsumDense /
                                                     MultiHeadAttention, axis roles unknown
``depthwise``       ``[k..., in, mult]``             ``depthwise`` in ``leaf``, or ``leaf == "kernel"`` and
                                                     ``depthwise`` in ``layer`` (Keras 3 names it ``kernel``)
``conv_transpose``  ``[k..., out, in]``              ``transpose``/``deconv`` in ``layer``
``conv``            ``[k..., in, out]``              any other rank 3-5 (Conv1D/2D/3D, pointwise kernels)
==================  ===============================  ======================================================

Only ``layer`` and ``leaf`` are read, never outer components: those name the model, and
``embedding_model/dense/kernel`` is a Dense kernel, ``my_lstm/dense/kernel`` is not recurrent.

When a rank 3-5 kernel would be ``conv`` by name but its paired bias (``paired_bias``) has ``in * mult``
entries instead of ``out``, it is ``depthwise``; with ``shape[-2]`` entries it is ``conv_transpose`` -- this
catches renamed layers. An explicit kind from the caller always wins over inference.

What each granularity means per kind (``Granularity.skip_reason`` says why a kind is not handled; the pruner
then leaves the variable dense and reports the reason -- never prunes it silently wrong):

- ``unstructured``: every element alone, any kind.
- ``channel``: one group per output channel, group score = L1 (sum) of its element scores.
  dense / conv / recurrent / embedding: the last axis (units, filters, gate-unit columns, embedding dims);
  conv_transpose: axis -2 (its ``out``); depthwise ``[k..., in, mult]``: the ``in * mult`` output channels, in
  TensorFlow's output order ``c * mult + m`` (so a channel mask is also the mask of the layer's bias).
  The paired bias is zeroed with its channel for dense/conv/conv_transpose/depthwise (a removed channel then
  outputs ``act(0)`` instead of the constant ``act(b)``). Not for recurrent kernels: a column of ``kernel``
  and the same column of ``recurrent_kernel`` share one bias entry, and both may not be removed together.
  Skipped: bias, vector, einsum, other.
- ``N:M``: in every run of M consecutive weights along the input (reduction) axis at most N are non-zero
  (the N highest-scoring are kept). Axis -2 for dense / conv / recurrent / embedding (``one_hot(ids) @ E``
  reduces over ``vocab``), axis -1 for conv_transpose. An axis whose length L is not a multiple of M is
  padded with virtual zeros: the tail group of ``r = L % M`` real weights keeps at most N of them (what
  padded sparse hardware accepts), so the achieved sparsity is ``nm_achieved_sparsity(n, m, L)``, below
  ``1 - N/M``. Skipped: depthwise (each output sums over the spatial window only: there is no channel
  reduction axis), bias, vector, einsum, other, and any variable whose axis has ``L <= N`` entries.
- ``block``: ``block_shape = (rows, cols)`` blocks of the 2-D matrix; block score = mean of its element scores
  (so partial edge blocks compete fairly). Rank-2 kinds are used as they are; conv and conv_transpose
  kernels are viewed as the matrix ``[prod(shape[:-1]), shape[-1]]`` (the GEMM a convolution lowers to).
  Dimensions that are not multiples of the block shape end in smaller edge blocks, removed whole like any
  other. Skipped: depthwise (a block would mix independent channels), bias, vector, einsum, other.

Counting (ranked granularities, see ``scope.select_groups``): a target ``t`` removes the lowest-ranked groups
whose element count is nearest ``round(t * size)``; whole groups only, so the achieved sparsity is reported
rather than forced. N:M is not ranked across variables: its pattern is local by definition.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import numpy as np

from worker.pruning.scope import select_groups

__all__ = [
    "GRANULARITIES",
    "NM",
    "Block",
    "Channel",
    "ElementLayout",
    "Granularity",
    "Kind",
    "Layout",
    "TileLayout",
    "Unstructured",
    "bias_keep_mask",
    "check_nm_target",
    "get_granularity",
    "infer_kind",
    "infer_kinds",
    "nm_achieved_sparsity",
    "nm_sparsity",
    "paired_bias",
    "parse_nm",
]

Kind = Literal[
    "dense",
    "conv",
    "conv_transpose",
    "depthwise",
    "recurrent",
    "embedding",
    "einsum",
    "bias",
    "vector",
    "other",
]
Reduce = Literal["sum", "mean"]

# ---------------------------------------------------------------- kinds

_SUFFIX = re.compile(r":\d+$")
_RECURRENT = re.compile(r"(^|_)(lstm|gru|rnn)([123]d)?(_\d+)?$|_cell$|^cell$")
_EINSUM = re.compile(r"einsum|attention|^(query|key|value)(_\d+)?$")


def _split(name: str) -> tuple[str, str, str]:
    """``(prefix, leaf, suffix)`` of ``a/b/kernel:0`` -> ``("a/b", "kernel", ":0")``."""
    match = _SUFFIX.search(name)
    suffix = match.group(0) if match else ""
    prefix, _, leaf = name[: len(name) - len(suffix)].rpartition("/")
    return prefix, leaf, suffix


def infer_kind(name: str, shape: Sequence[int], bias_shape: Sequence[int] | None = None) -> Kind:
    """The kind of a variable from its shape, name hints and (optionally) its paired bias's shape.

    See the module docstring for the rules; ``bias_shape`` only refines rank 3-5 kernels named like plain
    convolutions.
    """
    rank = len(shape)
    prefix, leaf, _ = _split(name.lower())
    parts = prefix.split("/") if prefix else []
    layer = parts[-1] if parts else ""
    if rank <= 1:
        return "vector"
    if "bias" in leaf:
        return "bias"
    if rank > 5:
        return "other"
    # Only the owning layer and the leaf are read: outer components name the model, and a model called
    # "embedding_classifier" or "my_lstm" says nothing about the Dense layers inside it.
    if leaf == "recurrent_kernel" or _RECURRENT.search(layer):
        return "recurrent"  # also ConvLSTM's [k..., in, gates*filters]
    if rank == 2:
        if "embedding" in leaf or ("embedding" in layer and leaf != "kernel"):
            return "embedding"
        return "dense"
    if _EINSUM.search(layer) or _EINSUM.search(leaf):
        return "einsum"
    if "depthwise" in leaf or (leaf == "kernel" and "depthwise" in layer):
        return "depthwise"
    if "transpose" in layer or "deconv" in layer:
        return "conv_transpose"
    if bias_shape is not None:
        size = math.prod(bias_shape)
        if size != shape[-1]:
            if size == shape[-2] * shape[-1]:
                return "depthwise"
            if size == shape[-2]:
                return "conv_transpose"
    return "conv"


def paired_bias(name: str, names: Collection[str]) -> str | None:
    """The bias that Keras naming pairs with kernel ``name``, if it is among ``names``; else None.

    ``.../kernel`` and ``.../pointwise_kernel`` pair with ``.../bias``; ``.../depthwise_kernel`` pairs with it
    only when there is no ``.../pointwise_kernel`` beside it (in a separable conv the bias follows the
    pointwise step). A ``:N`` suffix is kept. Naming only: whether zeroing it is right depends on the kind
    (``Granularity.zeroes_bias``).
    """
    prefix, leaf, suffix = _split(name)
    join = (lambda leaf_: f"{prefix}/{leaf_}{suffix}") if prefix else (lambda leaf_: f"{leaf_}{suffix}")
    if leaf == "depthwise_kernel" and join("pointwise_kernel") in names:
        return None
    if leaf not in ("kernel", "pointwise_kernel", "depthwise_kernel"):
        return None
    candidate = join("bias")
    return candidate if candidate in names else None


def infer_kinds(
    shapes: Mapping[str, Sequence[int]], model_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Kind]:
    """``infer_kind`` for each of ``shapes``, looking paired biases up in ``model_shapes`` (all variables)."""
    every = {**(model_shapes or {}), **shapes}
    kinds: dict[str, Kind] = {}
    for name, shape in shapes.items():
        bias = paired_bias(name, every)
        kinds[name] = infer_kind(name, shape, None if bias is None else every[bias])
    return kinds


# ---------------------------------------------------------------- layouts: how elements form groups


class Layout(ABC):
    """How the elements of one variable are grouped; groups are numbered 0..n_groups-1."""

    shape: tuple[int, ...]

    @property
    @abstractmethod
    def n_groups(self) -> int:
        """Number of groups."""

    @abstractmethod
    def group_scores(self, scores: np.ndarray, reduce: Reduce) -> tuple[np.ndarray, np.ndarray | None]:
        """``(one score per group, elements per group or None when every group is one element)``."""

    @abstractmethod
    def expand(self, keep: np.ndarray) -> np.ndarray:
        """Per-group keep flags -> element keep-mask shaped like the variable."""

    def sizes(self) -> np.ndarray:
        """Elements per group (edge groups of a tiling can be smaller)."""
        _, sizes = self.group_scores(np.zeros(self.shape), "sum")
        return np.ones(self.n_groups, dtype=np.int64) if sizes is None else sizes

    def removed(self, keep_mask: np.ndarray) -> np.ndarray:
        """Per group: True when every element of it is pruned in ``keep_mask``."""
        kept, _ = self.group_scores(np.asarray(keep_mask, dtype=np.float64), "sum")
        return kept == 0


@dataclass(frozen=True)
class ElementLayout(Layout):
    """Every element is its own group (unstructured)."""

    shape: tuple[int, ...]

    @property
    def n_groups(self) -> int:
        return math.prod(self.shape)

    def group_scores(self, scores: np.ndarray, reduce: Reduce) -> tuple[np.ndarray, np.ndarray | None]:
        return np.asarray(scores).reshape(-1), None

    def expand(self, keep: np.ndarray) -> np.ndarray:
        return np.asarray(keep, dtype=bool).reshape(self.shape)


@dataclass(frozen=True)
class TileLayout(Layout):
    """Groups are the tiles of a C-order reshape ``view`` of the variable, ``tile`` elements per axis.

    Channels and blocks are both tilings: channel c of a conv kernel ``[kh, kw, in, out]`` is tile ``(*, c)``
    of the view ``[kh*kw*in, out]`` with tile ``(kh*kw*in, 1)``; a 2x2 block is a ``(2, 2)`` tile. A view axis
    that is not a multiple of its tile ends in a smaller edge tile. The TensorFlow group-lasso penalty uses
    the same layout (``regularization.py``), so "a group" means one thing everywhere.
    """

    shape: tuple[int, ...]
    view: tuple[int, ...]
    tile: tuple[int, ...]

    def __post_init__(self) -> None:
        if math.prod(self.view) != math.prod(self.shape):
            raise ValueError(f"view {self.view} does not hold the {self.shape} variable")
        if len(self.tile) != len(self.view) or any(t < 1 for t in self.tile):
            raise ValueError(f"tile {self.tile} does not fit view {self.view}")

    @property
    def grid(self) -> tuple[int, ...]:
        """Groups along each view axis (edge tiles included)."""
        return tuple(-(-v // t) if v else 0 for v, t in zip(self.view, self.tile, strict=True))

    @property
    def n_groups(self) -> int:
        return math.prod(self.grid)

    def padding(self) -> list[tuple[int, int]]:
        """Per view axis, ``(0, extra)`` to reach a whole number of tiles."""
        return [(0, g * t - v) for v, g, t in zip(self.view, self.grid, self.tile, strict=True)]

    def _tiles(self, values: np.ndarray, fill: float) -> np.ndarray:
        """``[n_groups, prod(tile)]``: the (padded) elements of each group, groups in C order of the grid."""
        padded = np.pad(np.asarray(values).reshape(self.view), self.padding(), constant_values=fill)
        interleaved = [d for g, t in zip(self.grid, self.tile, strict=True) for d in (g, t)]
        rank = len(self.view)
        moved = padded.reshape(interleaved).transpose([*range(0, 2 * rank, 2), *range(1, 2 * rank, 2)])
        return moved.reshape(self.n_groups, math.prod(self.tile))

    def group_scores(self, scores: np.ndarray, reduce: Reduce) -> tuple[np.ndarray, np.ndarray | None]:
        sizes = self._tiles(np.ones(self.shape, dtype=np.int64), 0).sum(axis=1)
        values = np.asarray(scores)
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        sums = self._tiles(values, 0.0).sum(axis=1)
        return (sums / sizes if reduce == "mean" else sums), sizes

    def expand(self, keep: np.ndarray) -> np.ndarray:
        grid = np.asarray(keep, dtype=bool).reshape(self.grid)
        for axis, t in enumerate(self.tile):
            grid = np.repeat(grid, t, axis=axis)
        return grid[tuple(slice(0, v) for v in self.view)].reshape(self.shape)


def _channel_layout(kind: Kind, shape: tuple[int, ...]) -> TileLayout:
    if kind == "conv_transpose":  # [k..., out, in]
        lead = math.prod(shape[:-2])
        return TileLayout(shape, (lead, shape[-2], shape[-1]), (lead, 1, shape[-1]))
    if kind == "depthwise":  # [k..., in, mult]: in*mult output channels, index c*mult + m
        lead = math.prod(shape[:-2])
        return TileLayout(shape, (lead, shape[-2] * shape[-1]), (lead, 1))
    lead = math.prod(shape[:-1])  # [..., out]
    return TileLayout(shape, (lead, shape[-1]), (lead, 1))


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    return math.prod(shape[:-1]), shape[-1]


# ---------------------------------------------------------------- granularities

_STRUCTURELESS: dict[Kind, str] = {
    "bias": "a bias has no input or output channels",
    "vector": "a rank-0/1 variable has no input or output channels",
    "einsum": "an EinsumDense/attention kernel: which axes are inputs and outputs is not known",
    "other": "rank above 5: no known kernel layout",
}


class Granularity(ABC):
    """Turns one variable's element scores into a keep-mask at a sparsity target.

    Hooks the pruner reads instead of special-casing a granularity:
    - ``rankable``: masks come from ranking groups (``layout``), so ``scope: global`` and normalisations apply;
      False (N:M) means the pattern is local and the variable is pruned on its own even in global scope.
    - ``zeroes_bias(kind)``: removed groups are output channels, so the paired bias entry goes too.
    - ``reduce``: how element scores combine into a group score.
    - ``penalty_layout``: the groups a group-lasso penalty should act on (None: no groups).
    """

    name: ClassVar[str]
    group_noun: ClassVar[str | None] = None  # "channels", "blocks": what ``groups_removed`` counts
    rankable: ClassVar[bool] = True
    reduce: ClassVar[Reduce] = "sum"

    @property
    def label(self) -> str:
        """How the spec spells this granularity (``2:4``, ``block 4x4``)."""
        return self.name

    def skip_reason(self, kind: Kind, shape: Sequence[int]) -> str | None:
        """Why this granularity has no meaning for the variable (it is then left dense), else None."""
        return None

    @abstractmethod
    def layout(self, kind: Kind, shape: Sequence[int]) -> Layout:
        """The groups of a variable of this kind and shape (only called when ``skip_reason`` is None)."""

    def zeroes_bias(self, kind: Kind) -> bool:
        return False

    def penalty_layout(self, kind: Kind, shape: Sequence[int]) -> TileLayout | None:
        return None

    def mask(self, scores: np.ndarray, kind: Kind, target: float) -> np.ndarray:
        """Keep-mask removing about ``target`` of the elements as whole groups (the lowest-scoring first).

        ``scores`` may hold ``-inf`` for entries pruned earlier: their groups rank first, so masks only grow.
        """
        layout = self.layout(kind, np.shape(scores))
        group, sizes = layout.group_scores(scores, self.reduce)
        keep = select_groups({"v": group}, target, None if sizes is None else {"v": sizes})["v"]
        return layout.expand(keep)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


GRANULARITIES: dict[str, type[Granularity]] = {}

_G = TypeVar("_G", bound=type[Granularity])


def register(cls: _G) -> _G:
    """Class decorator adding a granularity to ``GRANULARITIES`` under its ``name`` (unique)."""
    if cls.name in GRANULARITIES:
        raise ValueError(f"granularity {cls.name!r} is already registered")
    GRANULARITIES[cls.name] = cls
    return cls


@register
class Unstructured(Granularity):
    """Single weights: the finest mask, any variable."""

    name = "unstructured"

    def layout(self, kind: Kind, shape: Sequence[int]) -> Layout:
        return ElementLayout(tuple(shape))

    def mask(self, scores: np.ndarray, kind: Kind, target: float) -> np.ndarray:
        keep = select_groups({"v": np.asarray(scores).reshape(-1)}, target)["v"]
        return keep.reshape(np.shape(scores))


@register
class Channel(Granularity):
    """Whole output channels/units, scored by the L1 sum of their element scores (see the module table)."""

    name = "channel"
    group_noun = "channels"

    def skip_reason(self, kind: Kind, shape: Sequence[int]) -> str | None:
        return _STRUCTURELESS.get(kind)

    def layout(self, kind: Kind, shape: Sequence[int]) -> Layout:
        return _channel_layout(kind, tuple(shape))

    def zeroes_bias(self, kind: Kind) -> bool:
        return kind in ("dense", "conv", "conv_transpose", "depthwise")

    def penalty_layout(self, kind: Kind, shape: Sequence[int]) -> TileLayout | None:
        return _channel_layout(kind, tuple(shape))


@register
class Block(Granularity):
    """``block_shape`` blocks of the (2-D view of the) kernel, scored by their mean element score."""

    name = "block"
    group_noun = "blocks"
    reduce = "mean"

    def __init__(self, block_shape: Sequence[int] = (4, 4)) -> None:
        rows, cols = (int(d) for d in block_shape)
        if rows < 1 or cols < 1:
            raise ValueError(f"block_shape must be two positive integers, got {tuple(block_shape)}")
        self.block_shape = (rows, cols)

    @property
    def label(self) -> str:
        return f"block {self.block_shape[0]}x{self.block_shape[1]}"

    def skip_reason(self, kind: Kind, shape: Sequence[int]) -> str | None:
        if kind == "depthwise":
            return "a depthwise kernel's blocks would mix independent channels"
        return _STRUCTURELESS.get(kind)

    def layout(self, kind: Kind, shape: Sequence[int]) -> TileLayout:
        return TileLayout(tuple(shape), _matrix_view(tuple(shape)), self.block_shape)

    def penalty_layout(self, kind: Kind, shape: Sequence[int]) -> TileLayout | None:
        return self.layout(kind, shape)


_NM_AXIS: dict[Kind, int] = {"dense": -2, "conv": -2, "recurrent": -2, "embedding": -2, "conv_transpose": -1}


@register
class NM(Granularity):
    """At most N non-zero in every M consecutive weights along the input axis (Ampere-style 2:4 sparsity).

    A target ``t`` prunes ``min(M - N, round(t * M))`` of each full group, so ``t = 1 - N/M`` gives exactly
    N:M, a gradual schedule passes through (M-1):M, ... on the way, and a lower per-layer override gives a
    laxer pattern for that layer; no target goes beyond N:M.
    """

    name = "nm"
    rankable = False

    def __init__(self, n: int, m: int) -> None:
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        self.n, self.m = int(n), int(m)

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}"

    def axis(self, kind: Kind) -> int | None:
        """The input (reduction) axis N:M groups run along for this kind, None when there is none."""
        return _NM_AXIS.get(kind)

    def skip_reason(self, kind: Kind, shape: Sequence[int]) -> str | None:
        if kind == "depthwise":
            return "a depthwise kernel has no input-channel reduction axis (each output sums its window only)"
        axis = self.axis(kind)
        if axis is None:
            return _STRUCTURELESS.get(kind, f"no input axis for a {kind} variable")
        if shape[axis] <= self.n:
            return f"its input axis has length {shape[axis]} <= N={self.n}: no group can lose a weight"
        return None

    def layout(self, kind: Kind, shape: Sequence[int]) -> TileLayout:
        """The M-groups as tiles of the view ``[before, L, after]`` around the input axis."""
        shape = tuple(shape)
        axis = self.axis(kind)
        assert axis is not None, "layout() of a skipped kind"
        axis %= len(shape)
        view = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
        return TileLayout(shape, view, (1, self.m, 1))

    def per_group(self, target: float) -> int:
        """Weights removed from each full group of M at ``target``."""
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"sparsity target must be within [0, 1], got {target!r}")
        return min(self.m - self.n, round(target * self.m))

    def mask(self, scores: np.ndarray, kind: Kind, target: float) -> np.ndarray:
        shape = tuple(np.shape(scores))
        layout = self.layout(kind, shape)
        before, length, after = layout.view
        k = self.per_group(target)
        groups = -(-length // self.m)
        # Padding scores +inf: sorted last, never among the first p entries (p <= real entries).
        padded = np.pad(
            np.asarray(scores, dtype=np.float64).reshape(layout.view),
            [(0, 0), (0, groups * self.m - length), (0, 0)],
            constant_values=np.inf,
        )
        padded = np.where(np.isnan(padded), -np.inf, padded)
        tiles = padded.reshape(before, groups, self.m, after)
        rank = np.argsort(np.argsort(tiles, axis=2, kind="stable"), axis=2, kind="stable")
        real = np.full(groups, self.m)
        real[-1] = length - (groups - 1) * self.m
        prune_counts = np.maximum(0, real - (self.m - k))  # tail: at most M - k non-zero incl. padding
        prune = rank < prune_counts[None, :, None, None]
        keep = ~prune.reshape(before, groups * self.m, after)[:, :length, :]
        return keep.reshape(shape)


# ---------------------------------------------------------------- helpers for the API and the pipeline

_NM_TEXT = re.compile(r"^(\d+):(\d+)$")


def parse_nm(value: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; anything else -> None."""
    match = _NM_TEXT.match(value)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def nm_sparsity(n: int, m: int) -> float:
    """The sparsity N:M gives on axes that are multiples of M: ``1 - N/M``."""
    return 1.0 - n / m


def nm_achieved_sparsity(n: int, m: int, length: int) -> float:
    """Sparsity of N:M along an axis of ``length`` under the padding rule (tail keeps at most N)."""
    if length <= 0:
        return 0.0
    full, tail = divmod(length, m)
    return (full * (m - n) + max(0, tail - n)) / length


def check_nm_target(target_sparsity: float, n: int, m: int) -> None:
    """Raise ValueError unless ``target_sparsity == 1 - N/M`` within 1e-9 (the API turns it into a 422)."""
    expected = nm_sparsity(n, m)
    if abs(target_sparsity - expected) > 1e-9:
        raise ValueError(
            f"granularity {n}:{m} keeps {n} of every {m} weights, i.e. sparsity 1 - {n}/{m} = {expected:.10g}; "
            f"set target_sparsity to {expected:.10g} (got {target_sparsity!r})"
        )


def get_granularity(value: str, *, block_shape: Sequence[int] | None = None) -> Granularity:
    """The granularity for a spec value: ``unstructured``, ``channel``, ``block`` or ``N:M`` (e.g. ``2:4``).

    ``block_shape`` is used by ``block`` (default 4x4) and refused elsewhere, so it is never silently ignored.
    """
    nm = parse_nm(value)
    if block_shape is not None and value != "block":
        raise ValueError(f"block_shape only applies to granularity 'block', not {value!r}")
    if nm is not None:
        return NM(*nm)
    if value == "block":
        return Block(block_shape) if block_shape is not None else Block()
    try:
        cls = GRANULARITIES[value]
    except KeyError:
        known = ", ".join(sorted(n for n in GRANULARITIES if n != "nm"))
        raise ValueError(f"unknown granularity {value!r}; known: {known}, N:M such as 2:4") from None
    return cls()


def bias_keep_mask(layout: Layout, keep_mask: np.ndarray, bias_shape: Sequence[int]) -> np.ndarray | None:
    """The paired bias's keep-mask for a channel keep-mask: entry c is kept while channel c keeps a weight.

    None when the bias does not have one entry per group (it is then not paired, e.g. a GRU's ``[2, 3u]``).
    """
    if math.prod(bias_shape) != layout.n_groups:
        return None
    return (~layout.removed(keep_mask)).reshape(tuple(bias_shape))
