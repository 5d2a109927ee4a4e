"""SavedModel signature -> ``.tflite`` bytes, one format at a time, with failures a person can act on.

Formats (a table, not a branch per format; ``FORMATS`` maps each to how the converter is set up):

- ``float32``: the builtin-op lowering only;
- ``float16``: weights stored as float16 (``Optimize.DEFAULT`` + ``supported_types=[float16]``), computed in
  float32 on CPU;
- ``dynamic_range``: ``Optimize.DEFAULT`` alone: int8 weights, activations quantized on the fly;
- ``int8``: full-integer post-training quantization calibrated on a representative dataset, builtins limited
  to ``TFLITE_BUILTINS_INT8`` (so an op without an int8 kernel fails here rather than silently staying float);
  float inputs/outputs unless ``int8_io``, then int8 tensors (the evaluator quantizes inputs and dequantizes
  outputs with the tensors' own scale and zero point).

The converter (MLIR) reports a failure as one ``ConverterError`` whose text is many lines of ``loc(...)``
call sites around a few ``error:`` lines; ``ExportError`` keeps those messages on one line and adds what to try.
No Select TF ops: the runtime that evaluates the files (and most devices) has no Flex delegate.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["FORMATS", "ExportError", "artifact_name", "convert_saved_model", "one_line_reason"]

Representative = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def _float32(converter: tf.lite.TFLiteConverter) -> None:
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]


def _float16(converter: tf.lite.TFLiteConverter) -> None:
    _float32(converter)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def _dynamic_range(converter: tf.lite.TFLiteConverter) -> None:
    _float32(converter)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _int8(converter: tf.lite.TFLiteConverter) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


FORMATS: dict[str, Callable[[tf.lite.TFLiteConverter], None]] = {
    "float32": _float32,
    "float16": _float16,
    "dynamic_range": _dynamic_range,
    "int8": _int8,
}

# What to try, by what the converter said (first match wins; the last entry is the fallback).
_HINTS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"tensor ?list|TensorArray|While|select tf ops|flex", re.IGNORECASE),
        "the model needs TensorFlow ops that TFLite has no builtin for (recurrent layers with a dynamic "
        "sequence length, Bidirectional RNNs, control flow); Select TF ops are not offered: give the layers "
        "a fixed sequence length / unroll=True, or use the SavedModel artifact",
    ),
    (
        re.compile(r"int8|quantiz|calibrat", re.IGNORECASE),
        "full-integer quantization failed for an op: try 'dynamic_range' or 'float16', which keep float "
        "kernels where int8 ones are missing",
    ),
    (
        re.compile(r"neither a custom op nor a flex op|not supported|failed to legalize", re.IGNORECASE),
        "an op of the signature has no TFLite builtin kernel: replace it with builtin-friendly layers "
        "(see the TFLite op compatibility list), or use the SavedModel artifact",
    ),
    (re.compile(r""), "the SavedModel artifact is unaffected; convert it yourself to investigate"),
]
_LOC = re.compile(r"^.*?error: (?:loc\(.*\)\)*: )?", re.DOTALL)
_ADVICE = re.compile(r"\s*Please consider using Select TF ops")
MAX_REASON = 400


class ExportError(Exception):
    """One format of one model could not be produced: ``reason`` (the converter's words, one line) and
    ``hint`` (what to try). The job still succeeds; the metrics entry carries ``str(self)``."""

    def __init__(self, reason: str, hint: str) -> None:
        super().__init__(f"{reason}; {hint}")
        self.reason, self.hint = reason, hint


def artifact_name(fmt: str) -> str:
    """API.md's artifact name of a format: ``tflite_int8`` etc."""
    return f"tflite_{fmt}"


def one_line_reason(exc: BaseException) -> str:
    """The converter's ``error:`` messages without their call-site locations, deduplicated, on one line."""
    text = str(exc)
    messages: list[str] = []
    for line in text.splitlines():
        if "error:" not in line:
            continue
        message = _LOC.sub("", line, count=1).strip().replace("\\n", " ")
        message = re.sub(r"\s+", " ", message)
        # the converter's own advice is Select TF ops, which this service does not offer (the hint says so)
        message = _ADVICE.split(message, maxsplit=1)[0].strip().rstrip(".")
        if message and message not in messages:
            messages.append(message)
    if not messages:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        messages = [f"{type(exc).__name__}: {first}"]
    joined = "; ".join(messages)
    return joined if len(joined) <= MAX_REASON else joined[: MAX_REASON - 3] + "..."


def hint_for(reason: str) -> str:
    return next(hint for pattern, hint in _HINTS if pattern.search(reason))


def convert_saved_model(
    saved_model: Path,
    fmt: str,
    signature: str,
    *,
    representative: Representative | None = None,
    int8_io: bool = False,
) -> bytes:
    """The ``.tflite`` flatbuffer of ``signature`` of the SavedModel at ``saved_model`` in format ``fmt``.

    ``representative`` (``int8`` only, required there) yields ``{input name: batch-1 array}`` per
    calibration sample. Raises ``ExportError`` when the converter refuses the model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown TFLite format {fmt!r}; known: {sorted(FORMATS)}")
    if fmt == "int8" and representative is None:
        raise ValueError("int8 needs a representative dataset")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[signature])
    FORMATS[fmt](converter)
    if fmt == "int8":
        converter.representative_dataset = representative
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            # calibration runs tf.lite.Interpreter internally, which warns about its own deprecation
            warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated")
            return bytes(converter.convert())
    except Exception as exc:  # ConverterError, and the RuntimeError/ValueError calibration can raise
        reason = one_line_reason(exc)
        raise ExportError(reason, hint_for(reason)) from exc
