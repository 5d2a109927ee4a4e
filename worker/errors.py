"""Errors the worker reports to the person who submitted the model or job.

```
Exception
└── PipelineError   a reason a person can act on; ``code`` is stable, ``message`` says what to change
```

The tasks layer turns a ``PipelineError`` into the record's ``error`` ``{"code", "message"}``. Any other
exception escaping the worker is a bug (or an outage) and is reported as ``internal_error``, its message
pointing at the worker log (see worker.tasks). Third-party exceptions (TensorFlow, Keras) are mapped to a
``PipelineError`` in the one place that calls them (``raise ... from exc``).

Codes in use:
- ``model_load_failed``: the SavedModel / .keras file cannot be loaded or converted.
- ``unsafe_model``: the model would run code or touch files (op audit, Keras safe_mode).
- ``signature_not_found``: the spec names a signature the model does not have.
- ``input_mismatch``: tensors given to a signature do not match its inputs.
- ``dataset_mismatch``: dataset arrays do not fit the signature (names, shapes, lengths, labels).
- ``invalid_spec``: the spec asks for something this model/dataset combination cannot do (e.g. a ``loss``
  the labels' shape does not fit: app.schemas.fit.loss_label_problem).
- ``insufficient_memory``: the prune would not fit in the worker's memory (worker.stages.memory); the message names
  the settings that would.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A user-actionable failure: ``code`` for machines, ``message`` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The record's ``error`` field."""
        return {"code": self.code, "message": self.message}
