"""TFLite exports of a SavedModel and their evaluation by the LiteRT runtime.

A library like ``worker.pruning``: a SavedModel directory and arrays in, ``.tflite`` bytes and numbers out; no
Celery, no store. ``convert`` lowers one signature to each format; ``runtime`` runs a converted file sample by
sample (batch 1, the way a device runs it) and times each call.
"""

from worker.export.convert import FORMATS, ExportError, artifact_name, convert_saved_model
from worker.export.runtime import TFLiteModel, zip_size

__all__ = ["FORMATS", "ExportError", "TFLiteModel", "artifact_name", "convert_saved_model", "zip_size"]
