"""Does a dataset fit a model's signature? Known from the records alone, so the API can answer 422 at once."""

from __future__ import annotations

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
