"""One handle over any restored SavedModel: signatures, named variables, a differentiable call, save.

Pruning works at the variable level because that is what every SavedModel kind (Keras 2 ``model.save``, Keras
3 ``model.export``, plain ``tf.Module``) has in common after ``tf.saved_model.load``. Variables are taken from
the signatures' concrete functions (a restored plain module has no ``.variables``), so the handle sees exactly
what serving uses, and ``save`` writes the same object back with the original signatures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import tensorflow as tf

from worker.errors import PipelineError
from worker.models.naming import unique_names
from worker.models.training import TrainingCall, has_training_call


class TensorInfo(TypedDict):
    """Shape (None = any size; the whole shape None = unknown rank) and dtype name of one tensor."""

    shape: list[int | None] | None
    dtype: str


@dataclass(frozen=True)
class SignatureInfo:
    """Inputs and outputs of one signature, keyed by the names callers use."""

    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    def to_dict(self) -> dict[str, dict[str, TensorInfo]]:
        return {"inputs": dict(self.inputs), "outputs": dict(self.outputs)}


@dataclass(frozen=True)
class NamedVariable:
    """A restored variable and the unique name users address it by (regexes, metrics ``layers``)."""

    name: str
    var: tf.Variable = field(repr=False)

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.var.shape]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _tensor_info(spec: tf.TensorSpec) -> TensorInfo:
    shape = None if spec.shape.rank is None else spec.shape.as_list()
    return {"shape": shape, "dtype": spec.dtype.name}


def signature_info(name: str, fn: Any) -> SignatureInfo:
    """Read a signature's inputs/outputs from its concrete function (signatures take keyword tensors only)."""
    args, kwargs = fn.structured_input_signature
    specs = dict(kwargs)
    for spec in args:  # signatures never have positional args; keep any by name rather than drop them
        specs[spec.name] = spec
    outputs = fn.structured_outputs
    if not isinstance(outputs, Mapping):
        outputs = {"output_0": outputs}
    return SignatureInfo(
        name=name,
        inputs={k: _tensor_info(specs[k]) for k in sorted(specs)},
        outputs={k: _tensor_info(outputs[k]) for k in sorted(outputs)},
    )


def _is_prunable(var: tf.Variable) -> bool:
    return bool(
        var.trainable and var.dtype.is_floating and var.shape.rank is not None and var.shape.rank >= 2
    )


def _matches(name: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


class ModelHandle:
    """A loaded SavedModel. Build it with ``worker.models.load_model``."""

    def __init__(self, path: Path, obj: Any) -> None:
        self.path = path
        self.obj = obj
        self._functions: dict[str, Any] = dict(obj.signatures)
        self.signatures: dict[str, SignatureInfo] = {
            name: signature_info(name, fn) for name, fn in sorted(self._functions.items())
        }
        self._variables = self._collect_variables()
        self._training_calls: dict[str, TrainingCall | None] = {}

    def _collect_variables(self) -> list[NamedVariable]:
        seen: set[int] = set()
        ordered: list[tf.Variable] = []
        for name in sorted(self._functions):
            for var in self._functions[name].variables:
                if id(var) not in seen:
                    seen.add(id(var))
                    ordered.append(var)
        names = unique_names(ordered, self.obj)
        return [NamedVariable(n, v) for n, v in zip(names, ordered, strict=True)]

    def function(self, name: str) -> Any:
        """The concrete function of signature ``name``."""
        try:
            return self._functions[name]
        except KeyError:
            available = ", ".join(sorted(self._functions)) or "(none)"
            raise PipelineError(
                "signature_not_found", f"the model has no signature {name!r}; available: {available}"
            ) from None

    def signature(self, name: str) -> SignatureInfo:
        """The inputs/outputs of signature ``name`` (PipelineError ``signature_not_found`` if absent)."""
        self.function(name)
        return self.signatures[name]

    def variables(self) -> list[NamedVariable]:
        """Every variable the signatures use, uniquely named, in a deterministic order."""
        return list(self._variables)

    def prunable(
        self, include: list[str] | None = None, exclude: list[str] | None = None
    ) -> list[NamedVariable]:
        """Trainable floating rank>=2 variables whose name ``re.search``-matches include, not exclude."""
        inc, exc = list(include or []), list(exclude or [])
        return [nv for nv in self._variables if _is_prunable(nv.var) and _matches(nv.name, inc, exc)]

    def params(self, include: list[str] | None = None, exclude: list[str] | None = None) -> dict[str, int]:
        """Parameter counts: all variables the signatures use, and the prunable ones."""
        return {
            "total": sum(nv.size for nv in self._variables),
            "prunable": sum(nv.size for nv in self.prunable(include, exclude)),
        }

    @property
    def training_mode_available(self) -> bool:
        """True when the model restores a Keras 2 ``__call__`` traced with ``training=True``."""
        return has_training_call(self.obj)

    def supports_training(self, signature: str) -> bool:
        """Whether ``call(signature, ..., training=True)`` can run through the Keras ``__call__``.

        Requires the input/output names to map and ``__call__(training=False)`` to reproduce the signature on
        a probe batch, so a custom signature is never replaced by a different computation.
        """
        if signature not in self._training_calls:
            self._training_calls[signature] = self._probe_training(signature)
        return self._training_calls[signature] is not None

    def _probe_training(self, signature: str) -> TrainingCall | None:
        if not self.training_mode_available:
            return None
        info = self.signature(signature)
        adapter = TrainingCall(self.obj, list(info.inputs), list(info.outputs))
        probe = _probe_inputs(info)
        if probe is None or not adapter.matches(self.function(signature), probe):
            return None
        return adapter

    def call(
        self, signature: str, inputs: Mapping[str, tf.Tensor | np.ndarray], training: bool = False
    ) -> dict[str, tf.Tensor]:
        """Run ``signature`` on named inputs; differentiable w.r.t. the variables (usable under GradientTape).

        ``training=True`` needs ``supports_training(signature)``: it runs Keras ``__call__`` in training mode.
        """
        fn = self.function(signature)
        info = self.signatures[signature]
        if set(inputs) != set(info.inputs):
            raise PipelineError(
                "input_mismatch",
                f"signature {signature!r} takes inputs {sorted(info.inputs)}, got {sorted(inputs)}",
            )
        tensors = {k: _as_tensor(v, tf.as_dtype(info.inputs[k]["dtype"])) for k, v in inputs.items()}
        if training:
            if not self.supports_training(signature):
                raise ValueError(
                    f"signature {signature!r} has no training-mode call; check supports_training()"
                )
            adapter = self._training_calls[signature]
            assert adapter is not None
            return adapter(tensors, training=True)
        out = fn(**tensors)
        return dict(out) if isinstance(out, Mapping) else {"output_0": out}

    def shadow_copies(self) -> list[tuple[tf.Variable, tf.Variable]]:
        """(copy, used) pairs: variables the object tracks but no signature reads, twinned by name and shape
        with one a signature does read. Keras 3 `model.export()` stores every weight twice (the endpoints'
        captures and an `_all_variables` list): saving only the pruned copy would ship the dense weights too."""
        used = {id(nv.var) for nv in self._variables}
        by_key: dict[tuple[str, tuple[int, ...], str], list[tf.Variable]] = {}
        for nv in self._variables:
            key = (nv.var.name, tuple(nv.var.shape.as_list()), nv.var.dtype.name)
            by_key.setdefault(key, []).append(nv.var)
        pairs = []
        for trackable in tf.train.TrackableView(self.obj).descendants():
            if not isinstance(trackable, tf.Variable) or id(trackable) in used:
                continue
            twins = by_key.get((trackable.name, tuple(trackable.shape.as_list()), trackable.dtype.name), [])
            if len(twins) == 1:
                pairs.append((trackable, twins[0]))
        return pairs

    def save(self, out_dir: Path) -> Path:
        """Write the (pruned) object as a SavedModel with the original signatures; shadow copies of the
        weights take the pruned values first, so the artifact holds no dense duplicate."""
        for copy, used in self.shadow_copies():
            copy.assign(used)
        tf.saved_model.save(self.obj, str(out_dir), signatures=dict(self._functions))
        return out_dir


def _as_tensor(value: tf.Tensor | np.ndarray, dtype: tf.DType) -> tf.Tensor:
    if isinstance(value, tf.Tensor):
        return value if value.dtype == dtype else tf.cast(value, dtype)
    return tf.convert_to_tensor(np.asarray(value, dtype=dtype.as_numpy_dtype))


def _probe_inputs(info: SignatureInfo, batch: int = 2) -> dict[str, tf.Tensor] | None:
    """Small deterministic inputs for an equivalence check; None when a shape cannot be guessed."""
    rng = np.random.default_rng(0)
    out: dict[str, tf.Tensor] = {}
    for name, spec in info.inputs.items():
        if spec["shape"] is None:
            return None
        shape = [
            batch if i == 0 and d is None else (1 if d is None else d) for i, d in enumerate(spec["shape"])
        ]
        dtype = tf.as_dtype(spec["dtype"])
        if dtype.is_floating:
            value = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer or dtype.is_bool:
            value = np.zeros(shape, dtype=dtype.as_numpy_dtype)
        else:
            return None
        out[name] = tf.constant(value)
    return out


def describe(handle: ModelHandle) -> dict[str, Any]:
    """The model record's view: signatures (inputs/outputs with shape and dtype) and the parameter count."""
    return {
        "signatures": {name: info.to_dict() for name, info in handle.signatures.items()},
        "params": handle.params()["total"],
    }
