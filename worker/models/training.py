"""Training-mode calls through a restored tf_keras (Keras 2) ``__call__``.

Signatures are traced in inference mode: BatchNorm uses frozen statistics and dropout is off. A tf_keras
SavedModel also restores the model's ``__call__`` traced with ``training=True``, which updates BatchNorm
moving statistics and applies dropout. Keras 3 exports and plain modules have no such function.

``__call__`` takes the model's own input structure (one tensor, a list or a dict) and returns its own output
structure, while a signature takes and returns dicts keyed by name. ``TrainingCall`` maps one onto the other
by TensorSpec names and refuses when the mapping is ambiguous; ``matches`` then checks numerically that
``__call__(training=False)`` equals the signature, so a custom signature is never swapped for another graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf


def _trainable_concrete(obj: Any) -> tuple[Any, bool] | None:
    """Input structure of a restored ``__call__`` traced with training=True; whether training=False exists."""
    call = getattr(obj, "__call__", None)  # noqa: B004 - the restored attribute, not callability
    if not hasattr(obj, "keras_api") or call is None:
        return None
    concretes = getattr(call, "concrete_functions", None) or []
    structure = None
    has_inference = False
    for cf in concretes:
        args, _ = cf.structured_input_signature
        if len(args) < 2:
            continue
        if args[1] is True and structure is None:
            structure = args[0]
        elif args[1] is False:
            has_inference = True
    if structure is None:
        return None
    return structure, has_inference


def has_training_call(obj: Any) -> bool:
    """True for restored tf_keras objects whose ``__call__`` was traced with ``training=True``."""
    return _trainable_concrete(obj) is not None


class TrainingCall:
    """Call a restored Keras 2 ``__call__`` with signature-style dict inputs and outputs."""

    def __init__(self, obj: Any, input_names: list[str], output_names: list[str]) -> None:
        found = _trainable_concrete(obj)
        if found is None:
            raise ValueError("the restored object has no __call__ traced with training=True")
        self._obj = obj
        self._structure, self._has_inference = found
        self._input_names = input_names
        self._output_names = output_names
        self.mappable = self._map_inputs() is not None and len(output_names) >= 1

    def _map_inputs(self) -> Any | None:
        """How to build the __call__ argument from signature input names; None when ambiguous."""
        s = self._structure
        names = set(self._input_names)
        if isinstance(s, tf.TensorSpec):
            return s.name if len(names) == 1 else None
        if isinstance(s, Mapping):
            keyed = {k: (spec.name if spec.name in names else k) for k, spec in s.items()}
            return keyed if set(keyed.values()) == names else None
        if isinstance(s, list | tuple):
            ordered = [getattr(spec, "name", None) for spec in s]
            return ordered if set(ordered) == names and len(ordered) == len(names) else None
        return None

    def _build_args(self, inputs: Mapping[str, tf.Tensor]) -> Any:
        mapping = self._map_inputs()
        if isinstance(mapping, str):
            return next(iter(inputs.values()))
        if isinstance(mapping, dict):
            return {k: inputs[name] for k, name in mapping.items()}
        if isinstance(mapping, list):
            return [inputs[name] for name in mapping]
        raise ValueError("signature inputs cannot be mapped onto the Keras __call__ inputs")

    def _to_dict(self, out: Any) -> dict[str, tf.Tensor]:
        if isinstance(out, Mapping):
            if set(out) != set(self._output_names):
                raise ValueError(f"Keras __call__ returned {sorted(out)}, the signature {self._output_names}")
            return dict(out)
        if isinstance(out, list | tuple):
            if len(out) == 1 and len(self._output_names) == 1:
                return {self._output_names[0]: out[0]}
            raise ValueError(
                "Keras __call__ returns several unnamed outputs: cannot match them to the signature"
            )
        if len(self._output_names) != 1:
            raise ValueError("Keras __call__ returns one tensor but the signature has several outputs")
        return {self._output_names[0]: out}

    def __call__(self, inputs: Mapping[str, tf.Tensor], training: bool) -> dict[str, tf.Tensor]:
        return self._to_dict(self._obj(self._build_args(inputs), training=training))

    def matches(self, signature_fn: Any, inputs: Mapping[str, tf.Tensor]) -> bool:
        """Whether ``__call__(training=False)`` gives the same outputs as ``signature_fn`` on ``inputs``."""
        if not (self.mappable and self._has_inference):
            return False
        try:
            ours = self(inputs, training=False)
            theirs = signature_fn(**inputs)
        except (ValueError, TypeError, tf.errors.OpError):
            return False
        if set(ours) != set(theirs):
            return False
        return all(
            np.allclose(ours[k].numpy(), theirs[k].numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
            for k in ours
        )
