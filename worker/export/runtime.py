"""Running a ``.tflite`` file with the LiteRT interpreter (``ai_edge_litert``), one sample per call.

``tf.lite.Interpreter`` warns that it is going away; LiteRT's ``Interpreter`` is what apps and devices run, so
its outputs are the ones worth scoring. Inputs go in by the signature's input names and outputs come back by
its output keys (the converter keeps both), so they line up with the SavedModel's predictions.

Batch 1 is how a device runs a model and the only batch size every converted file accepts (a signature's
batch dimension may have been fixed to 1 by the converter); each call is timed, so latency comes from the
evaluation itself (after a few warm-up calls) instead of a second pass. int8 tensors are fed quantized with
their own scale and zero point, and int8 outputs dequantized, so callers see float values either way.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

__all__ = ["Prediction", "TFLiteModel", "zip_size"]

WARMUP_CALLS = 3
PROGRESS_EVERY = 64


def zip_size(data: bytes, arcname: str = "model.tflite", compresslevel: int = 6) -> int:
    """Bytes of a deflate zip holding ``data`` (the level ``worker.evaluation.size`` zips SavedModels with, so
    the sizes compare)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        zf.writestr(zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return buffer.tell()


@dataclass
class Prediction:
    """Outputs by key (float, one row per sample) and the milliseconds of every timed call."""

    outputs: dict[str, np.ndarray]
    call_ms: list[float] = field(default_factory=list)

    def latency(self) -> dict[str, Any] | None:
        """``{"p50", "p95", "mean", "runs", "warmup"}`` in ms, or None when no call was timed."""
        if not self.call_ms:
            return None
        times = np.asarray(self.call_ms)
        mean = float(times.mean())
        return {
            "p50": float(np.percentile(times, 50)),
            "p95": float(np.percentile(times, 95)),
            "mean": mean,
            "samples_per_s": 1000.0 / mean if mean > 0 else None,
            "runs": int(times.size),
            "warmup": WARMUP_CALLS,
        }


def _quantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer) or not scale:
        return value.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(value: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.issubdtype(value.dtype, np.integer) and scale:
        return (value.astype(np.float32) - zero_point) * np.float32(scale)
    return value


class TFLiteModel:
    """One converted file, ready to run its (only) signature."""

    def __init__(self, content: bytes, signature: str | None = None, num_threads: int | None = 1) -> None:
        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        if not signatures:
            raise ValueError("the .tflite file has no signature to run")
        self.signature = signature if signature in signatures else next(iter(signatures))
        runner = self.interpreter.get_signature_runner(self.signature)
        # Tensor indices of the signature's inputs/outputs, fed through the interpreter directly: the
        # runner's own call resizes and re-allocates every tensor on every call, which is not latency.
        self.inputs = runner.get_input_details()
        self.outputs = runner.get_output_details()

    def io_types(self) -> dict[str, str]:
        """Input/output tensor dtypes by name, e.g. to show that int8 I/O was honoured."""
        return {
            **{f"input:{k}": np.dtype(v["dtype"]).name for k, v in self.inputs.items()},
            **{f"output:{k}": np.dtype(v["dtype"]).name for k, v in self.outputs.items()},
        }

    def predict(
        self,
        x: Mapping[str, np.ndarray],
        warmup: int = WARMUP_CALLS,
        on_progress: Callable[[float], None] | None = None,
    ) -> Prediction:
        """Every sample of ``x`` (arrays by input name, same first dimension) through the runtime at batch 1.

        The first ``warmup`` calls are not timed (allocation, caches). ``on_progress(fraction done)`` is
        called every ``PROGRESS_EVERY`` samples: a big model's pass takes minutes, and the caller's progress
        report is where cancellation and the soft time limit take effect (whatever it raises propagates)."""
        missing = sorted(set(self.inputs) - set(x))
        if missing:
            raise ValueError(
                f"inputs {missing} are missing; the file's signature takes {sorted(self.inputs)}"
            )
        n = len(next(iter(x.values())))
        interpreter = self.interpreter
        for name, detail in self.inputs.items():  # batch 1 once, then only set/invoke/get per sample
            shape = [1, *np.asarray(x[name]).shape[1:]]
            if list(detail["shape"]) != shape:
                interpreter.resize_tensor_input(detail["index"], shape, strict=False)
        interpreter.allocate_tensors()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        times: list[float] = []
        for i in range(n):
            feed = [
                (d["index"], _quantize(np.asarray(x[name][i : i + 1]), d)) for name, d in self.inputs.items()
            ]
            start = time.perf_counter()
            for index, value in feed:
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            result = {name: interpreter.get_tensor(d["index"]) for name, d in self.outputs.items()}
            elapsed = (time.perf_counter() - start) * 1000.0
            if i >= warmup:
                times.append(elapsed)
            for name, value in result.items():
                parts[name].append(_dequantize(value, self.outputs[name]))
            if on_progress is not None and (i + 1) % PROGRESS_EVERY == 0:
                on_progress((i + 1) / n)
        return Prediction({name: np.concatenate(v) for name, v in parts.items() if v}, times)
