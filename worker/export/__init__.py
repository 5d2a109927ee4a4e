"""Exported files of a SavedModel (TFLite, ONNX) and their evaluation by the runtime that runs them.

A library like ``worker.pruning``: a SavedModel directory and arrays in, file bytes and numbers out; no Celery,
no store. ``targets.EXPORTS`` is the one table of files (artifact name -> converter, suffix, runtime);
``convert`` lowers one signature to each TFLite format and ``runtime`` runs a ``.tflite`` file with LiteRT;
``onnx`` converts with tf2onnx and runs the file with ONNX Runtime. Runners go sample by sample (batch 1, the
way a device or a request-serving server runs a model) and time each call.
"""

from worker.export.convert import FORMATS, ExportError, artifact_name, convert_saved_model
from worker.export.runtime import TFLiteModel, zip_size
from worker.export.targets import EXPORTS, ONNX, Target

__all__ = [
    "EXPORTS",
    "FORMATS",
    "ONNX",
    "ExportError",
    "TFLiteModel",
    "Target",
    "artifact_name",
    "convert_saved_model",
    "zip_size",
]
