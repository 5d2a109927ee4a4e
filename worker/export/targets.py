"""The one table of export files: artifact name -> how the file is converted, its suffix and its runtime.

Why a table: the exporting stage, ``worker.tasks`` (which records ``work/artifacts/<name><suffix>``) and the
API's vocabulary (``app.schemas.vocabulary.EXPORT_FILES``, pinned to this table by
``tests/test_vocabularies.py``) must agree on every name; a new format is one row here and one there. The names
are API.md's artifact names: ``tflite_<format>`` for each TFLite format, ``onnx``.

Each target's ``convert(saved_model, signature, **options)`` returns the file's bytes or raises
``ExportError``; ``options`` are the TFLite int8 ones (``representative``, ``int8_io``), given to that target
only. ``load(content, signature)`` returns a runner with ``io_types()`` and ``predict(x, on_progress=...)``
returning a ``runtime.Prediction`` (batch 1, timed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.export import onnx
from worker.export.convert import FORMATS, artifact_name, convert_saved_model
from worker.export.runtime import Prediction, TFLiteModel

__all__ = ["EXPORTS", "ONNX", "Runner", "Target"]

ONNX = "onnx"


class Runner(Protocol):
    def io_types(self) -> dict[str, str]: ...

    def predict(
        self,
        x: Mapping[str, np.ndarray],
        warmup: int = ...,
        on_progress: Callable[[float], None] | None = ...,
    ) -> Prediction: ...


@dataclass(frozen=True)
class Target:
    """One kind of exported file: ``name`` (artifact), ``suffix`` (of ``<name><suffix>``), ``runtime`` (who
    scores it, for notes), ``convert`` and ``load`` (see the module's docstring), and ``packages`` (the
    distributions that convert and run it, whose versions the metrics entry records)."""

    name: str
    suffix: str
    runtime: str
    convert: Callable[..., bytes]
    load: Callable[[bytes, str], Runner]
    packages: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.name}{self.suffix}"

    def versions(self) -> dict[str, str]:
        """``{distribution: version}`` of ``packages``: a file's numbers depend on its converter's version."""
        found = {}
        for package in self.packages:
            try:
                found[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
        return found


def _tflite(fmt: str) -> Callable[..., bytes]:
    def convert(saved_model: Path, signature: str, **options: Any) -> bytes:
        return convert_saved_model(saved_model, fmt, signature, **options)

    return convert


EXPORTS: dict[str, Target] = {
    **{
        artifact_name(fmt): Target(
            artifact_name(fmt),
            ".tflite",
            "LiteRT",
            _tflite(fmt),
            TFLiteModel,
            ("tensorflow", "ai-edge-litert"),
        )
        for fmt in FORMATS
    },
    ONNX: Target(
        ONNX,
        ".onnx",
        "ONNX Runtime",
        lambda saved_model, signature, **_: onnx.convert_to_onnx(saved_model, signature),
        onnx.OnnxModel,
        ("tf2onnx", "onnx", "onnxruntime"),
    ),
}
