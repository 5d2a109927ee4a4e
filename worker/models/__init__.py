"""Any SavedModel or .keras file behind one handle: named variables, a differentiable call, save, op audit."""

from worker.models.audit import DENIED_OPS, audit_ops, audit_saved_model
from worker.models.handle import ModelHandle, NamedVariable, SignatureInfo, TensorInfo, describe
from worker.models.inputs import PREFERRED_OUTPUTS, bind_inputs, label_key, select_output
from worker.models.loader import keep_for_next_job, keras_to_saved_model, load_model, load_model_once

__all__ = [
    "DENIED_OPS",
    "PREFERRED_OUTPUTS",
    "ModelHandle",
    "NamedVariable",
    "SignatureInfo",
    "TensorInfo",
    "audit_ops",
    "audit_saved_model",
    "bind_inputs",
    "describe",
    "keep_for_next_job",
    "keras_to_saved_model",
    "label_key",
    "load_model",
    "load_model_once",
    "select_output",
]
