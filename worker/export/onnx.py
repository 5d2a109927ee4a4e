"""SavedModel signature -> ``.onnx`` bytes (tf2onnx), and running them with ONNX Runtime one sample per call.

Why in this process and through ``tf2onnx``'s loader: ``tf_loader.from_saved_model`` freezes one signature
the way ``python -m tf2onnx.convert --saved-model DIR --signature_def NAME`` does, and names the ONNX inputs and
outputs after the signature's keys (its ``tensors_to_rename``), so the runtime is fed and read by the same names
as the SavedModel and the TFLite files. The conversion itself is ``tf2onnx.convert._convert_common`` -- the
function the command line calls -- with ``continue_on_error=False``; the public ``from_function`` and
``from_graph_def`` force ``continue_on_error=True`` and would hand back files ONNX Runtime cannot load.

A refusal is an ``ExportError`` (the TFLite one: the job succeeds and ``metrics.exports.onnx`` holds the
reason). tf2onnx does NOT raise for a TensorFlow op it has no mapping for: it logs it and leaves the TF op in
the graph. So every node of the default ONNX domain is checked against ONNX's operator schemas, and an unknown
one is a refusal naming the TF ops, rather than a file that fails to load later.

Runtime: ``OnnxModel`` mirrors ``runtime.TFLiteModel``: batch 1, each call timed after a few warm-up calls,
outputs by the signature's output keys. ONNX Runtime keeps its default intra-op thread pool (one thread per
physical core), as TensorFlow does for ``pruned.latency_ms``: a server runtime measured the way a server runs it
(LiteRT files run on one thread, as a device runs them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from worker.export.convert import MAX_REASON, ExportError
from worker.export.runtime import PROGRESS_EVERY, WARMUP_CALLS, Prediction

__all__ = ["OPSET", "OnnxModel", "convert_to_onnx", "runtime_version"]

# Fixed here so a tf2onnx upgrade does not silently change the files users deploy (tf2onnx 1.17 defaults to 15
# and goes up to 18); 17 is the first with a LayerNormalization op, and every ONNX Runtime since 1.12 runs it.
OPSET = 17
_HINT_UNMAPPED = (
    "tf2onnx has no ONNX mapping for these TensorFlow ops: replace them with common layers, or use the "
    "SavedModel or TFLite artifact"
)
_HINT_OTHER = "the SavedModel artifact is unaffected; run python -m tf2onnx.convert on it to investigate"
_HINT_LARGE = "ONNX files over 2 GB need external weights, which this service does not produce"

# ONNX Runtime's type strings -> numpy, for casting the inputs (ORT refuses a float64 array for a float input).
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def runtime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _unmapped_ops(model: Any) -> dict[str, int]:
    """Ops of the default ONNX domain (in every subgraph) that ONNX does not define: the TF ops tf2onnx left."""
    import onnx

    counts: dict[str, int] = {}

    def visit(graph: Any) -> None:
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return counts


def convert_to_onnx(saved_model: Path, signature: str, opset: int = OPSET) -> bytes:
    """The ONNX model of ``signature`` of the SavedModel at ``saved_model``, serialized.

    Raises ``ExportError`` when tf2onnx refuses the model, leaves an op unconverted, or the file would not fit
    in one protobuf (2 GB)."""
    from tf2onnx import tf_loader
    from tf2onnx.convert import _convert_common

    # tf2onnx logs every op it cannot map at ERROR and its progress at INFO: the reason reaches the metrics
    # entry instead, so the worker's log keeps only its warnings and worse.
    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.CRITICAL)
    try:
        graph_def, inputs, outputs, tables, renames = tf_loader.from_saved_model(
            str(saved_model),
            None,
            None,
            ["serve"],
            [signature],
            None,
            False,
            return_initialized_tables=True,
            return_tensors_to_rename=True,
        )
        model, _ = _convert_common(
            graph_def,
            name=signature,
            continue_on_error=False,
            opset=opset,
            input_names=inputs,
            output_names=outputs,
            tensors_to_rename=renames,
            initialized_tables=tables,
        )
        unmapped = _unmapped_ops(model)
        if unmapped:
            ops = ", ".join(f"{op} (x{n})" if n > 1 else op for op, n in sorted(unmapped.items()))
            raise ExportError(f"unsupported TensorFlow ops: {ops}", _HINT_UNMAPPED)
        content = model.SerializeToString()
    except ExportError:
        raise
    except ValueError as exc:  # protobuf: "Message onnx.ModelProto exceeds maximum protobuf size of 2GB"
        reason = _one_line(exc)
        raise ExportError(reason, _HINT_LARGE if "2GB" in reason else _HINT_OTHER) from exc
    except Exception as exc:  # tf2onnx raises whatever its op handlers raise (ValueError, KeyError, ...)
        raise ExportError(_one_line(exc), _HINT_OTHER) from exc
    finally:
        tf2onnx_log.setLevel(level)
    return content


class OnnxModel:
    """One ``.onnx`` file in an ONNX Runtime CPU session, ready to run at batch 1 (as ``TFLiteModel``)."""

    def __init__(self, content: bytes, signature: str | None = None, num_threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimisation warnings are not the user's
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        # ORT raises its own exception classes (Fail, InvalidGraph, NotImplemented...) for a file it cannot
        # load: one RuntimeError for the caller, as LiteRT's interpreter raises.
        try:
            self.session = onnxruntime.InferenceSession(
                content, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RuntimeError(_one_line(exc)) from exc
        self.signature = signature
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def io_types(self) -> dict[str, str]:
        """Input/output tensor types by name, as the TFLite entries show them (``float32``...)."""

        def name(ort_type: str) -> str:
            dtype = _DTYPES.get(ort_type)
            return np.dtype(dtype).name if dtype is not None else ort_type

        return {
            **{f"input:{i.name}": name(i.type) for i in self.session.get_inputs()},
            **{f"output:{o.name}": name(o.type) for o in self.session.get_outputs()},
        }

    def predict(
        self,
        x: Mapping[str, np.ndarray],
        warmup: int = WARMUP_CALLS,
        on_progress: Callable[[float], None] | None = None,
    ) -> Prediction:
        """Every sample of ``x`` (arrays by input name) through the session at batch 1; see
        ``TFLiteModel.predict`` for warm-up, timing and progress."""
        missing = sorted(set(self.inputs) - set(x))
        if missing:
            raise ValueError(f"inputs {missing} are missing; the file takes {sorted(self.inputs)}")
        arrays = {
            name: np.asarray(x[name]).astype(_DTYPES.get(info.type, np.float32), copy=False)
            for name, info in self.inputs.items()
        }
        n = len(next(iter(arrays.values())))
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        times: list[float] = []
        run = self.session.run
        for i in range(n):
            feed = {name: array[i : i + 1] for name, array in arrays.items()}
            start = time.perf_counter()
            try:
                result = run(self.outputs, feed)
            except Exception as exc:  # ORT's own classes (wrong shape, kernel failure): as LiteRT's errors
                raise RuntimeError(_one_line(exc)) from exc
            elapsed = (time.perf_counter() - start) * 1000.0
            if i >= warmup:
                times.append(elapsed)
            for name, value in zip(self.outputs, result, strict=True):
                parts[name].append(np.asarray(value))
            if on_progress is not None and (i + 1) % PROGRESS_EVERY == 0:
                on_progress((i + 1) / n)
        return Prediction({name: np.concatenate(v) for name, v in parts.items() if v}, times)
