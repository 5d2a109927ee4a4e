"""spec.export through run_pipeline: the saved artifact converted, every file scored by LiteRT beside the
SavedModel, files where worker.tasks picks them up, and a model the converter refuses still succeeding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf

ALL = ["float32", "float16", "dynamic_range", "int8"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, stage: str, progress: float) -> None:
        self.calls.append((stage, progress))


def run(
    model: Path,
    spec: dict[str, Any],
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
    out: Path,
    report: Recorder | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    document = run_pipeline(
        model, PruneSpec.model_validate(spec), train, evaluation, out, report or Recorder()
    )
    MetricsDocument.model_validate({"job_id": "job_x", "model_id": "mdl_x", **document})
    return document


def test_every_format_of_a_keras_upload_beside_the_saved_model(
    keras_file: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    train, test = digits_cnn
    report = Recorder()
    spec = {"target_sparsity": 0.5, "export": {"tflite": ALL, "representative_samples": 64}}
    document = run(keras_file, spec, train, test, tmp_path, report)

    stages = list(dict.fromkeys(stage for stage, _ in report.calls))
    assert stages[-2:] == ["saving", "exporting"]
    progress = [p for _, p in report.calls]
    assert progress == sorted(progress) and progress[-1] < 1.0

    exports = document["exports"]
    assert list(exports) == [f"tflite_{fmt}" for fmt in ALL]
    pruned = document["pruned"]["metrics"]["accuracy"]
    for name, entry in exports.items():
        assert "error" not in entry, entry
        file = tmp_path / "artifacts" / f"{name}.tflite"
        assert file.stat().st_size == entry["size_bytes"]
        assert 0 < entry["zip_bytes"] < entry["size_bytes"]  # the pruned zeros deflate
        assert entry["n_samples"] == len(test["y"])
        assert entry["latency_ms"]["1"]["p50"] > 0
        assert entry["metrics"]["task"] == "classification"
        assert abs(entry["metrics"]["accuracy"] - pruned) <= 0.03, (
            name,
            entry["metrics"]["accuracy"],
            pruned,
        )
    float32 = exports["tflite_float32"]
    assert float32["metrics"]["accuracy"] == pytest.approx(pruned, abs=1e-9)  # the same model, same data
    assert float32["fidelity"]["top1_agreement"] == 1.0
    assert float32["fidelity"]["max_abs_output_diff"] < 1e-4
    assert exports["tflite_int8"]["io_types"] == {"input:image": "float32", "output:output_0": "float32"}
    assert exports["tflite_int8"]["size_bytes"] < float32["size_bytes"] / 2
    assert "export" in document["timings_s"]


def test_int8_io_on_a_plain_module(
    tf_module_dir: Path, digits_flat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    train, test = digits_flat
    spec = {
        "target_sparsity": 0.5,
        "export": {"tflite": ["int8"], "int8_io": True, "representative_samples": 50},
    }
    entry = run(tf_module_dir, spec, train, test, tmp_path)["exports"]["tflite_int8"]
    assert entry["io_types"]["input:pixels"] == "int8"
    assert entry["metrics"]["accuracy"] > 0.8
    assert entry["fidelity"]["top1_agreement"] > 0.9


def test_without_data_files_are_converted_not_scored(keras3_export_dir: Path, tmp_path: Path) -> None:
    spec = {"target_sparsity": 0.5, "export": {"tflite": ["float16"]}}
    document = run(keras3_export_dir, spec, None, None, tmp_path)
    entry = document["exports"]["tflite_float16"]
    assert entry["metrics"] is None and entry["fidelity"] is None and entry["latency_ms"] == {}
    assert (tmp_path / "artifacts" / "tflite_float16.tflite").is_file()
    assert any("converted but not evaluated" in note for note in document["notes"])


@pytest.fixture(scope="module")
def bilstm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Bidirectional(keras.layers.LSTM(4)), keras.layers.Dense(2)]
    )
    out = tmp_path_factory.mktemp("bilstm") / "saved_model"
    model.export(str(out), verbose=False)
    return out


def test_a_model_the_converter_refuses_still_succeeds(bilstm_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 5, 3)).astype(np.float32), "y": rng.integers(0, 2, size=40)}
    spec = {"target_sparsity": 0.5, "export": {"tflite": ["float32", "dynamic_range"], "onnx": True}}
    document = run(bilstm_dir, spec, None, data, tmp_path)

    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    assert (tmp_path / "pruned.zip").is_file()
    for name in ("tflite_float32", "tflite_dynamic_range"):
        entry = document["exports"][name]
        assert set(entry) == {"error", "seconds"}
        assert "TensorList" in entry["error"] and "\n" not in entry["error"]
        assert "unroll=True" in entry["error"]  # what to try
        assert not (tmp_path / "artifacts" / f"{name}.tflite").exists()
        assert any(note.startswith(f"{name} was not produced") for note in document["notes"])
    # one refusal does not stop the other files: tf2onnx rewrites the LSTM loops that TFLite refuses
    onnx = document["exports"]["onnx"]
    assert "error" not in onnx, onnx
    assert onnx["fidelity"]["max_abs_output_diff"] < 1e-5
    assert (tmp_path / "artifacts" / "onnx.onnx").is_file()


def test_int8_is_calibrated_on_preprocessed_inputs(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Raw 0..16 pixels with ``preprocessing.scale``: calibrating on the raw range would quantize the real
    (0..1) inputs to a handful of levels; calibrated on what the model sees, int8 keeps the accuracy."""
    train, test = digits_cnn
    raw_train = {"x": train["x"] * 16.0, "y": train["y"]}
    raw_test = {"x": test["x"] * 16.0, "y": test["y"]}
    spec = {
        "target_sparsity": 0.5,
        "preprocessing": {"scale": 1 / 16},
        "export": {"tflite": ["int8"], "representative_samples": 100},
    }
    document = run(keras3_export_dir, spec, raw_train, raw_test, tmp_path)
    entry = document["exports"]["tflite_int8"]
    # calibrated on the raw 0..16 range instead, this model's int8 file loses about 3 points (measured)
    assert abs(entry["metrics"]["accuracy"] - document["pruned"]["metrics"]["accuracy"]) <= 0.015
    assert entry["fidelity"]["top1_agreement"] >= 0.97


def test_a_compacted_artifact_is_exported_compacted(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from worker.export import convert_saved_model

    train, test = digits_cnn
    spec = {"target_sparsity": 0.5, "granularity": "channel", "export": {"tflite": ["float32"]}}
    document = run(keras3_export_dir, spec, train, test, tmp_path)
    assert document["structure"]["compact"] is True
    entry = document["exports"]["tflite_float32"]
    dense = convert_saved_model(keras3_export_dir, "float32", "serving_default")
    assert entry["size_bytes"] < 0.8 * len(dense)  # fewer channels: fewer weights in the file
    assert entry["fidelity"]["top1_agreement"] == 1.0


class Canceled(Exception):
    pass


def test_a_cancel_during_the_runtime_evaluation_propagates(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """The progress report is where worker.tasks cancels a job: it must reach into the per-sample pass."""
    train, test = digits_cnn
    exporting: list[float] = []

    def report(stage: str, progress: float) -> None:
        if stage == "exporting":
            exporting.append(progress)
            if len(exporting) == 3:  # start, converted, then the first tick of the LiteRT pass
                raise Canceled

    spec = PruneSpec.model_validate({"target_sparsity": 0.5, "export": {"tflite": ["float32"]}})
    with pytest.raises(Canceled):
        run_pipeline(keras3_export_dir, spec, train, test, tmp_path, report)
    assert exporting == sorted(exporting) and len(exporting) == 3
    assert not (tmp_path / "artifacts" / "tflite_float32.tflite").exists()


def test_a_large_eval_set_is_scored_on_a_seeded_subset(
    keras3_export_dir: Path,
    digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.stages.export

    monkeypatch.setattr(worker.stages.export, "MAX_EVAL_SAMPLES", 100)
    train, test = digits_cnn
    spec = {"target_sparsity": 0.5, "export": {"tflite": ["float32"]}}
    document = run(keras3_export_dir, spec, train, test, tmp_path)
    entry = document["exports"]["tflite_float32"]
    assert entry["n_samples"] == 100 and entry["fidelity"]["n_predictions"] == 100
    assert sum(map(sum, entry["metrics"]["confusion_matrix"])) == 100
    assert entry["fidelity"]["top1_agreement"] == 1.0  # the pruned outputs were cut to the same samples
    assert any("evaluated on 100 of the 450" in note for note in document["notes"])
