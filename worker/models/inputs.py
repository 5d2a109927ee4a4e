"""Match dataset arrays to a signature's inputs and outputs.

Dataset convention (API.md): ``x`` feeds a single-input signature; ``x.<name>`` feeds input ``<name>``
(required for multi-input signatures, accepted for single-input ones). ``y`` holds labels for one output; a
dataset may name it ``y.<output name>``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import tensorflow as tf

from worker.errors import PipelineError
from worker.models.handle import SignatureInfo

# Which output plain ``y`` labels when a signature has several: the first name (case-insensitive) in this
# list, else the first output in sorted order. Probabilities first: metrics and losses are exact for them.
PREFERRED_OUTPUTS: tuple[str, ...] = ("probs", "probabilities", "logits", "predictions", "output_0")


def _fmt(shape: list[int | None] | tuple[int, ...] | None) -> str:
    return (
        "unknown rank"
        if shape is None
        else "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"
    )


def _check_shape(input_name: str, key: str, expected: list[int | None] | None, got: tuple[int, ...]) -> None:
    """Rank and every non-batch dimension must agree (None = any); the batch dimension is ours to choose."""
    if expected is None:
        return
    ok = len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected[1:], got[1:], strict=True)
    )
    if not ok:
        raise PipelineError(
            "dataset_mismatch",
            f"input {input_name!r} expects shape {_fmt(expected)} (None = any size, first = samples); "
            f"dataset array {key!r} has shape {_fmt(got)}",
        )


def _array_key(input_name: str, single: bool, arrays: Mapping[str, np.ndarray]) -> str:
    named = f"x.{input_name}"
    if named in arrays:
        return named
    if single and "x" in arrays:
        return "x"
    want = f"'x' or '{named}'" if single else f"'{named}'"
    raise PipelineError(
        "dataset_mismatch",
        f"the dataset has no array for input {input_name!r}: add {want} (has: {sorted(arrays)})",
    )


def bind_inputs(sig: SignatureInfo, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Input name -> array cast to the input dtype, after checking names, shapes and sample counts."""
    names = list(sig.inputs)
    stray = sorted(k for k in arrays if k.startswith("x.") and k[2:] not in sig.inputs)
    if stray:
        raise PipelineError(
            "dataset_mismatch",
            f"dataset arrays {stray} name no input of signature {sig.name!r}; its inputs are {names}",
        )
    bound: dict[str, np.ndarray] = {}
    for name in names:
        key = _array_key(name, len(names) == 1, arrays)
        array = np.asarray(arrays[key])
        spec = sig.inputs[name]
        _check_shape(name, key, spec["shape"], array.shape)
        dtype = tf.as_dtype(spec["dtype"])
        if dtype == tf.string:
            if array.dtype.kind not in "US":
                raise PipelineError(
                    "dataset_mismatch", f"input {name!r} takes strings; {key!r} is {array.dtype}"
                )
            bound[name] = array
        else:
            bound[name] = array.astype(dtype.as_numpy_dtype, copy=False)
    lengths = {name: a.shape[0] if a.ndim else 0 for name, a in bound.items()}
    if len(set(lengths.values())) > 1:
        raise PipelineError("dataset_mismatch", f"input arrays have different numbers of samples: {lengths}")
    return bound


def select_output(sig: SignatureInfo, y_keys: Collection[str]) -> str:
    """The output labels refer to: the only one; else ``y.<name>``; else ``PREFERRED_OUTPUTS``; else first."""
    outputs = sorted(sig.outputs)
    if len(outputs) == 1:
        return outputs[0]
    named = sorted(k[2:] for k in y_keys if k.startswith("y.") and k[2:] in sig.outputs)
    if named:
        return named[0]
    if "y" not in y_keys and any(k.startswith("y.") for k in y_keys):
        raise PipelineError(
            "dataset_mismatch",
            f"label arrays {sorted(k for k in y_keys if k.startswith('y.'))} name no output of signature "
            f"{sig.name!r}; its outputs are {outputs}",
        )
    lowered = {o.lower(): o for o in outputs}
    for preferred in PREFERRED_OUTPUTS:
        if preferred in lowered:
            return lowered[preferred]
    return outputs[0]


def label_key(output: str, keys: Collection[str]) -> str | None:
    """The dataset array holding labels for ``output``: ``y.<output>``, else ``y``, else None."""
    named = f"y.{output}"
    if named in keys:
        return named
    return "y" if "y" in keys else None
