"""Dense vs effective multiply-accumulates (MACs) per layer, from kernel shapes and nonzero counts.

Works from plain data (a variable's name and shape, its nonzero count, optionally the layer's output spatial
size) so it needs no TensorFlow and no model object: a restored SavedModel keeps its variables but not its
Keras layers, so this is what the pipeline can always know.

The rule: in a Dense, Conv or DepthwiseConv layer every kernel weight takes part in exactly one
multiply-accumulate per output position (per sample for a Dense on a flat input; per output pixel for a
Conv2D). So per sample

    dense_macs     = params  * positions      e.g. Dense [in, out]: in*out;
                                                     Conv2D [kh, kw, in, out]: kh*kw*in*out * H_out*W_out
    effective_macs = nonzero * positions      what a kernel that skips zero weights would still compute

FLOPs are about 2 x MACs (one multiply, one add). Unstructured zeros are NOT skipped by TensorFlow's dense
kernels: ``effective_macs`` is an upper bound on what a sparse kernel could save, not what this model runs.

Limits, by design returning None rather than guessing:
- ``positions`` of a convolution is the product of its output spatial size, which a kernel shape cannot tell
  (strides, padding, input size). Pass it in ``output_spatial`` when known; otherwise dense/effective MACs
  are None and ``macs_per_position`` (= params, or nonzero) is still reported.
- A Dense kernel is assumed to see a flat input (one position per sample); pass ``output_spatial`` (e.g.
  ``[sequence_length]``) for a Dense applied over a sequence or image.
- The kind comes from ``kind`` or else from the pruning engine's kind (``granularity.infer_kind``, the one
  classifier of kernels: it reads the layer and leaf of a name, never the model's) by rank: dense,
  recurrent (one step) and the conv kinds -> dense / conv1d / conv2d / conv3d for rank 2 / 3 / 4 / 5, with
  rank-4 depthwise -> depthwise_conv2d and rank-4 conv_transpose -> conv2d_transpose (whose positions are its
  INPUT pixels); embedding -> embedding (a lookup, no MACs -> None); einsum (attention kernels), bias, vector
  and other -> ``unknown`` (None).
- Recurrent kernels count one time step; biases, normalisation and activations are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from worker.pruning import granularity

__all__ = ["KINDS", "SPARSE_NOTE", "estimate_flops", "flops_kind", "flops_totals", "infer_kind"]

Kind = Literal[
    "dense", "conv1d", "conv2d", "conv3d", "depthwise_conv2d", "conv2d_transpose", "embedding", "unknown"
]
# kind -> number of spatial axes ``output_spatial`` must give (None: no MACs are defined for the kind).
KINDS: dict[str, int | None] = {
    "dense": 0,  # 0: one position per sample unless output_spatial says otherwise (any length accepted)
    "conv1d": 1,
    "conv2d": 2,
    "conv3d": 3,
    "depthwise_conv2d": 2,
    "conv2d_transpose": 2,
    "embedding": None,
    "unknown": None,
}
SPARSE_NOTE = (
    "effective_macs counts only nonzero weights: what a sparse kernel could skip. TensorFlow's dense kernels "
    "still compute dense_macs on unstructured zeros. FLOPs ~= 2 x MACs."
)


# Pruning kinds whose weights each take part in one multiply-add per position, counted by rank; a rank-4
# depthwise or transposed kernel has its own positions (output pixels of its channels; input pixels).
_BY_RANK: dict[int, Kind] = {2: "dense", 3: "conv1d", 4: "conv2d", 5: "conv3d"}
_COUNTED = {"dense", "recurrent", "conv", "depthwise", "conv_transpose"}
_RANK4: dict[str, Kind] = {"depthwise": "depthwise_conv2d", "conv_transpose": "conv2d_transpose"}


def flops_kind(kind: granularity.Kind, rank: int) -> Kind:
    """How MACs count a kernel of the pruning engine's ``kind`` and this rank."""
    if kind == "embedding":
        return "embedding"
    if kind not in _COUNTED:
        return "unknown"
    if rank == 4 and kind in _RANK4:
        return _RANK4[kind]
    return _BY_RANK.get(rank, "unknown")


def infer_kind(name: str, shape: Sequence[int]) -> Kind:
    """The layer kind of a kernel: ``granularity.infer_kind`` (the one kernel classifier), counted by rank."""
    return flops_kind(granularity.infer_kind(name, shape), len(shape))


def _positions(kind: str, spatial: Sequence[int] | None) -> tuple[int | None, str | None]:
    """Positions per sample at which each weight is used once, and a note when it is unknown or assumed."""
    axes = KINDS[kind]
    if axes is None:
        return None, f"no multiply-adds defined for a {kind} kernel"
    if spatial is None:
        if axes == 0:
            return 1, "per sample, assuming a flat input (one position)"
        what = "input" if kind == "conv2d_transpose" else "output"
        return None, f"{what} spatial size unknown: MACs per {what} position only"
    dims = [int(d) for d in spatial]
    if (axes and len(dims) != axes) or any(d < 1 for d in dims):
        raise ValueError(f"a {kind} layer needs {axes or 'any number of'} positive spatial sizes, got {dims}")
    return math.prod(dims), None


def estimate_flops(
    layers: Sequence[Mapping[str, Any]],
    masks_nonzero: Mapping[str, int] | None = None,
    output_spatial: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """One row per layer: ``name``, ``shape``, ``kind``, ``params``, ``nonzero``, ``positions``, ``macs_per_position``,
    ``effective_macs_per_position``, ``dense_macs``, ``effective_macs`` (per sample) and ``note`` (None or why
    a number is missing/assumed).

    ``layers``: ``{"name", "shape", "kind"?}`` per kernel (the metrics ``layers`` rows fit as they are).
    ``masks_nonzero``: nonzero weights per layer name; without an entry the effective numbers are None.
    ``output_spatial``: per layer name, the spatial size its weights are applied over -- ``[H_out, W_out]`` for
    conv2d/depthwise, ``[H_in, W_in]`` for conv2d_transpose, ``[L_out]`` for conv1d, ``[D, H, W]`` for conv3d,
    e.g. ``[sequence_length]`` for a Dense over tokens. Unknown layers get None, never a guess.
    """
    masks_nonzero = masks_nonzero or {}
    output_spatial = output_spatial or {}
    rows = []
    for layer in layers:
        name = str(layer["name"])
        shape = [int(d) for d in layer["shape"]]
        kind = str(layer.get("kind") or infer_kind(name, shape))
        if kind not in KINDS:
            raise ValueError(f"layer {name!r}: unknown kind {kind!r}; known kinds: {sorted(KINDS)}")
        params = math.prod(shape)
        nonzero = masks_nonzero.get(name)
        if nonzero is not None and not 0 <= nonzero <= params:
            raise ValueError(f"layer {name!r}: {nonzero} nonzero weights of {params}")
        positions, note = _positions(kind, output_spatial.get(name))
        defined = KINDS[kind] is not None
        per_position = params if defined else None
        effective_per_position = nonzero if defined and nonzero is not None else None
        rows.append(
            {
                "name": name,
                "shape": shape,
                "kind": kind,
                "params": params,
                "nonzero": nonzero,
                "positions": positions,
                "macs_per_position": per_position,
                "effective_macs_per_position": effective_per_position,
                "dense_macs": None if positions is None or per_position is None else per_position * positions,
                "effective_macs": (
                    None
                    if positions is None or effective_per_position is None
                    else effective_per_position * positions
                ),
                "note": note,
            }
        )
    return rows


def flops_totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums over the layers whose numbers are known, and which layers could not be counted.

    ``dense_macs`` sums layers with a known dense count; ``effective_macs`` sums layers with a known effective
    count; ``effective_fraction`` = effective / dense over the layers that have BOTH (None if none), so it is
    never a ratio of two different sets of layers. ``uncounted`` names layers left out of ``dense_macs``.
    """
    dense = [r["dense_macs"] for r in rows if r["dense_macs"] is not None]
    both = [r for r in rows if r["dense_macs"] is not None and r["effective_macs"] is not None]
    both_dense = sum(r["dense_macs"] for r in both)
    return {
        "dense_macs": sum(dense),
        "effective_macs": sum(r["effective_macs"] for r in rows if r["effective_macs"] is not None),
        "effective_fraction": sum(r["effective_macs"] for r in both) / both_dense if both_dense else None,
        "counted_layers": len(dense),
        "uncounted": [r["name"] for r in rows if r["dense_macs"] is None],
        "note": SPARSE_NOTE,
    }
