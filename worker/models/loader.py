"""Turn what users upload into a ``ModelHandle``; TensorFlow/Keras failures become ``PipelineError`` here.

A ``.keras`` file is converted once to a SavedModel (``model.export``) so that everything downstream
(variables, signatures, op audit, save) has one code path. The file is loaded with ``safe_mode=True``: a
Lambda layer or other deserialised Python is refused rather than executed.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from worker.errors import PipelineError
from worker.models.handle import ModelHandle


def load_model(path: Path) -> ModelHandle:
    """Load a SavedModel directory (Keras 2 ``model.save``, Keras 3 ``model.export`` or plain ``tf.Module``).

    Run ``audit_saved_model(path)`` first on untrusted input: loading runs the model's resource initialisers.
    """
    if not (path / "saved_model.pb").is_file():
        raise PipelineError(
            "model_load_failed", "no saved_model.pb found: upload a SavedModel directory archive"
        )
    try:
        obj = tf.saved_model.load(str(path))
    except Exception as exc:  # TF raises many types for corrupt or incompatible SavedModels
        raise PipelineError(
            "model_load_failed", f"TensorFlow could not load the SavedModel: {_short(exc)}"
        ) from exc
    if not getattr(obj, "signatures", None):
        raise PipelineError(
            "model_load_failed",
            "the SavedModel has no signatures: save it with tf.saved_model.save(..., signatures=...) "
            "or Keras model.export()",
        )
    try:
        return ModelHandle(path, obj)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(
            "model_load_failed", f"cannot read the model's signatures: {_short(exc)}"
        ) from exc


def keras_to_saved_model(keras_file: Path, out_dir: Path) -> Path:
    """Load a ``.keras`` file with ``safe_mode=True`` and export it as a SavedModel in ``out_dir``."""
    import keras  # only .keras inputs pay for importing Keras

    if keras_file.suffix != ".keras":
        raise PipelineError("model_load_failed", f"expected a .keras file, got {keras_file.name!r}")
    try:
        model = keras.saving.load_model(str(keras_file), safe_mode=True, compile=False)
    except Exception as exc:
        text = str(exc)
        if "safe_mode" in text or "unsafe" in text.lower() or "arbitrary code" in text:
            raise PipelineError(
                "unsafe_model",
                "the .keras file contains Python code (e.g. a Lambda layer) that safe mode refuses to load: "
                f"replace it with built-in or registered layers. Keras said: {_short(exc)}",
            ) from exc
        raise PipelineError(
            "model_load_failed", f"Keras could not load the .keras file: {_short(exc)}"
        ) from exc
    try:
        model.export(str(out_dir), verbose=False)
    except Exception as exc:
        raise PipelineError(
            "model_load_failed",
            f"the Keras model loaded but could not be exported as a SavedModel: {_short(exc)}",
        ) from exc
    return out_dir


def _short(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# One loaded model handed from a validation to the job that follows it in the same worker process: a solo
# worker usually validates a model and then runs its first job, and loading a 200 MB SavedModel takes ~2 s.
_kept: tuple[Path, ModelHandle] | None = None


def keep_for_next_job(path: Path, handle: ModelHandle) -> None:
    """Only an untouched handle (a validation only reads it); replaces whatever was kept."""
    global _kept
    _kept = (path.resolve(), handle)


def load_model_once(path: Path) -> ModelHandle:
    """The kept handle of ``path`` if there is one (taken: one job mutates it), else a fresh load. Anything
    kept for another model is dropped here, so at most one idle model stays in memory, and not for long."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None and kept[0] == path.resolve():
        return kept[1]
    del kept
    return load_model(path)
