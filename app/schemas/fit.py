"""Does a dataset fit a model's signature? Known from the records alone, so the API can answer 422 at once."""

from __future__ import annotations

import math
from typing import Any


def dataset_fit_errors(signatures: dict[str, Any], signature: str, arrays: dict[str, Any]) -> list[str]:
    if signature not in signatures:
        return [f"the model has no signature {signature!r}; it has {sorted(signatures)}"]
    inputs: dict[str, Any] = signatures[signature]["inputs"]
    xs = {name: info for name, info in arrays.items() if name == "x" or name.startswith("x.")}
    if len(inputs) == 1 and "x" in xs:
        pairs = [(next(iter(inputs)), "x")]
    else:
        missing = [f"x.{name}" for name in inputs if f"x.{name}" not in xs]
        if missing:
            return [f"signature {signature!r} takes inputs {sorted(inputs)}: the .npz needs arrays {missing}"]
        pairs = [(name, f"x.{name}") for name in inputs]
    errors = []
    for input_name, array_name in pairs:
        want = inputs[input_name]["shape"]
        got = arrays[array_name]["shape"]
        if want is None:  # unknown rank: the worker checks at run time
            continue
        if len(want) != len(got) or any(
            w is not None and w != g for w, g in zip(want[1:], got[1:], strict=False)
        ):
            errors.append(f"input {input_name!r} expects shape {want}, array {array_name!r} has {got}")
    return errors


# --- labels against the loss --------------------------------------------------------------------------------

Dim = int | None  # None: any size (a signature's unknown dimension)
_CLASS_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy")


def _fits(labels: tuple[Dim, ...], target: tuple[Dim, ...]) -> bool:
    """Whether per-sample label shape ``labels`` lines up with ``target`` the way worker.pruning.losses does:
    same rank and equal sizes (None matches any), or another rank with the same number of values (the loss
    reshapes then). Same rank but other sizes would broadcast -- e.g. (1,) against (10,) -- which is the
    silent bug this check exists to stop."""
    if len(labels) == len(target):
        return all(a is None or b is None or a == b for a, b in zip(labels, target, strict=True))
    if any(d is None for d in (*labels, *target)):
        return True  # unknown sizes: the worker checks with the real output
    return math.prod(labels) == math.prod(target)  # type: ignore[arg-type]


def _fmt(shape: tuple[Dim, ...]) -> str:
    """``(12,)``, ``(None, 10)``: a shape as Python prints a tuple."""
    return str(tuple(shape))


def loss_label_problem(
    loss: str,
    label_shape: list[Dim] | tuple[Dim, ...],
    output_shape: list[Dim] | tuple[Dim, ...] | None,
    *,
    labels: str = "the labels",
    output_name: str = "output",
    inferred: bool = False,
) -> str | None:
    """Why labels of ``label_shape`` cannot train output ``output_shape`` with ``loss``, or None when they can.

    Shapes include the batch axis, which is ignored; ``labels`` says which labels they are; ``inferred``: the
    worker chose the loss from the labels' values (so the hint is not "leave 'loss' out"). Shared by the API
    (shapes from the records, 422 at job creation) and the worker (``invalid_spec`` at loading), so both say
    the same thing.
    """
    if output_shape is None or len(label_shape) == 0:
        return None  # unknown rank / a scalar array: nothing to compare here (other checks name it)
    y_item, out_item = tuple(label_shape[1:]), tuple(output_shape[1:])
    units = out_item[-1] if out_item else 1
    shapes = (
        f"{labels} have shape {_fmt(tuple(label_shape))} (per sample {_fmt(y_item)}) and "
        f"output {output_name!r} has shape {_fmt(tuple(output_shape))} (per sample {_fmt(out_item)})"
    )
    class_ids = bool(out_item) and units != 1 and _fits(y_item, out_item[:-1])
    if loss in _CLASS_LOSSES and (not out_item or units == 1):
        return (
            f"loss {loss!r} needs an output with one unit per class, but {shapes}; for one sigmoid unit use "
            "'binary_crossentropy', for a regression target 'mse' or 'mae'"
        )
    if loss == "sparse_categorical_crossentropy":
        if class_ids:
            return None
        hint = (
            "labels shaped like the output look one-hot: use 'categorical_crossentropy'"
            if _fits(y_item, out_item)
            else f"give one class id per sample (shape (N,) or (N, 1)) for {units} classes"
        )
        return f"loss {loss!r} takes one integer class id per sample, but {shapes}: {hint}"
    if _fits(y_item, out_item):
        return None
    if class_ids:
        hint = "these look like integer class ids: use 'sparse_categorical_crossentropy'"
    else:
        hint = "give labels shaped like the output"
    hint += (
        ", or set spec.loss to the loss the labels are for"
        if inferred
        else ", or leave 'loss' out to infer it"
    )
    kind = "one-hot rows" if loss == "categorical_crossentropy" else "one target per output value"
    how = "inferred from the labels" if inferred else "the spec's"
    return f"loss {loss!r} ({how}) needs {kind} (labels shaped like the output), but {shapes}: {hint}"


def label_loss_errors(
    signatures: dict[str, Any], signature: str, arrays: dict[str, Any], loss: str | None
) -> list[str]:
    """The spec's explicit ``loss`` against the train dataset's labels and the model's output, from the records.

    Only where the pairing of labels and output is unambiguous from names alone (one output, or ``y.<output>``
    arrays); the worker checks every case again with the real output.
    """
    if loss is None or signature not in signatures:
        return []
    outputs: dict[str, Any] = signatures[signature].get("outputs") or {}
    if len(outputs) == 1:
        output = next(iter(outputs))
        key = f"y.{output}" if f"y.{output}" in arrays else "y" if "y" in arrays else None
    else:
        named = sorted(k[2:] for k in arrays if k.startswith("y.") and k[2:] in outputs)
        output, key = (named[0], f"y.{named[0]}") if named else ("", None)
    if key is None:
        return []
    problem = loss_label_problem(
        loss,
        arrays[key]["shape"],
        outputs[output].get("shape"),
        labels=f"the train dataset's labels {key!r}",
        output_name=output,
    )
    return [problem] if problem else []
