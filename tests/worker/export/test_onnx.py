"""worker.export.onnx and spec ``export.onnx``: tf2onnx converts the job's signature, ONNX Runtime reproduces the
SavedModel's outputs, a compacted model is exported compacted, and an op tf2onnx cannot map is an ``error``
entry of a job that still succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.export import EXPORTS, ExportError
from worker.export.onnx import OnnxModel, convert_to_onnx
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _saved_model_outputs(model_dir: Path, signature: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_dir)).signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in x.items()}).items()}


def test_onnx_runtime_reproduces_a_keras3_export(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    _, test = digits_cnn
    x = {"image": test["x"][:60]}
    model = OnnxModel(convert_to_onnx(keras3_export_dir, "serving_default"))
    assert model.io_types() == {"input:image": "float32", "output:output_0": "float32"}
    prediction = model.predict(x, warmup=3)
    expected = _saved_model_outputs(keras3_export_dir, "serving_default", x)
    np.testing.assert_allclose(prediction.outputs["output_0"], expected["output_0"], atol=1e-5)
    latency = prediction.latency()
    assert latency is not None and latency["runs"] == 57 and 0 < latency["p50"] <= latency["p95"]


def test_the_jobs_signature_of_a_multi_signature_module_keeps_its_names(
    tf_module_dir: Path, digits_flat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    """Inputs and outputs are named by the signature's keys, as the SavedModel and the TFLite files are."""
    _, test = digits_flat
    x = {"pixels": test["x"][:20].astype(np.float64)}  # cast to the file's float32 by the runner
    served = OnnxModel(convert_to_onnx(tf_module_dir, "serving_default"))
    outputs = served.predict(x).outputs
    assert set(outputs) == {"logits", "probs"}
    expected = _saved_model_outputs(tf_module_dir, "serving_default", {"pixels": test["x"][:20]})
    for key in ("logits", "probs"):
        np.testing.assert_allclose(outputs[key], expected[key], atol=1e-5)
    assert set(OnnxModel(convert_to_onnx(tf_module_dir, "embed")).predict(x).outputs) == {"features"}


@pytest.fixture(scope="module")
def igamma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module whose signature uses ``Igamma``, an op tf2onnx has no ONNX mapping for."""
    import tensorflow as tf

    class Module(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal([6, 4], seed=[1, 2]), name="dense/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x")])
        def __call__(self, x: Any) -> dict[str, Any]:
            return {"y": tf.math.igamma(tf.nn.softplus(tf.matmul(x, self.kernel)) + 1.0, 1.5)}

    module = Module()
    out = tmp_path_factory.mktemp("igamma") / "saved_model"
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.__call__})
    return out


def test_an_op_without_onnx_mapping_is_refused_naming_it(igamma_dir: Path) -> None:
    with pytest.raises(ExportError) as caught:
        convert_to_onnx(igamma_dir, "serving_default")
    assert "Igamma" in caught.value.reason and "\n" not in str(caught.value)
    assert "tf2onnx" in caught.value.hint


def run(
    model: Path,
    spec: dict[str, Any],
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
    out: Path,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    document = run_pipeline(model, PruneSpec.model_validate(spec), train, evaluation, out, lambda *_: None)
    MetricsDocument.model_validate({"job_id": "job_x", "model_id": "mdl_x", **document})
    return document


def test_a_compacted_job_exports_onnx_beside_tflite(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """The compacted artifact, converted: fewer weights than the dense model's ONNX file, the pruned
    SavedModel's predictions, and MACs that went down with the channels."""
    train, test = digits_cnn
    spec = {
        "target_sparsity": 0.5,
        "granularity": "channel",
        "export": {"tflite": ["float32"], "onnx": True},
    }
    document = run(keras3_export_dir, spec, train, test, tmp_path)
    assert document["structure"]["compact"] is True
    exports = document["exports"]
    assert list(exports) == ["tflite_float32", "onnx"]
    entry = exports["onnx"]
    assert "error" not in entry, entry
    file = tmp_path / "artifacts" / EXPORTS["onnx"].filename
    assert file.name == "onnx.onnx" and file.stat().st_size == entry["size_bytes"]
    assert entry["size_bytes"] < 0.8 * len(convert_to_onnx(keras3_export_dir, "serving_default"))
    assert entry["metrics"]["accuracy"] == pytest.approx(document["pruned"]["metrics"]["accuracy"], abs=1e-9)
    assert entry["fidelity"]["top1_agreement"] == 1.0
    assert entry["fidelity"]["max_abs_output_diff"] < 1e-5
    assert entry["n_samples"] == len(test["y"]) and entry["latency_ms"]["1"]["p50"] > 0
    assert entry["io_types"] == {"input:image": "float32", "output:output_0": "float32"}
    assert {"tf2onnx", "onnxruntime"} <= set(entry["versions"])
    baseline, pruned = document["baseline"]["macs"], document["pruned"]["macs"]
    assert 0 < pruned["dense_macs"] < baseline["dense_macs"]


def test_a_refused_onnx_conversion_is_an_error_entry_not_a_failed_job(
    igamma_dir: Path, tmp_path: Path
) -> None:
    spec = {"target_sparsity": 0.5, "export": {"onnx": True}}
    document = run(igamma_dir, spec, None, None, tmp_path)
    assert (tmp_path / "pruned.zip").is_file()
    entry = document["exports"]["onnx"]
    assert set(entry) == {"error", "seconds"}
    assert "Igamma" in entry["error"]
    assert not (tmp_path / "artifacts" / "onnx.onnx").exists()
    assert any(note.startswith("onnx was not produced") for note in document["notes"])
