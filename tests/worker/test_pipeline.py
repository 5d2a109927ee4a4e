"""run_pipeline end to end on tiny real models: sparsity hit, artifact faithful, metrics shaped per API.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.models import describe, load_model
from worker.pipeline import GRADIENT_SAMPLES, INFERENCE_MODE_NOTE, TRAINING_MODE_NOTE, run_pipeline
from worker.pruning.criteria import CRITERIA, Criterion, GradientStats, GradInput

pytestmark = pytest.mark.tf

STAGES = ["loading", "baseline", "pruning", "fine_tuning", "evaluating", "saving"]
SIDE_KEYS = {"metrics", "params", "sparsity", "size_bytes", "latency_ms"}


class Recorder:
    """The report callback: remembers every (stage, progress)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, stage: str, progress: float) -> None:
        self.calls.append((stage, progress))

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(stage for stage, _ in self.calls))


def run(
    model: Path,
    spec: dict[str, Any],
    data: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    out: Path,
    report: Recorder | None = None,
    train: bool = True,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    train_arrays = data[0] if data and train else None
    eval_arrays = data[1] if data else None
    return run_pipeline(
        model, PruneSpec.model_validate(spec), train_arrays, eval_arrays, out, report or Recorder()
    )


def artifact_zeros(out: Path) -> dict[str, float]:
    """Fraction of exact zeros per prunable variable of the saved artifact (read back from disk)."""
    handle = load_model(out / "saved_model")
    return {nv.name: float(np.mean(nv.var.numpy() == 0)) for nv in handle.prunable()}


def test_one_shot_layer_scope_on_every_kind(
    model_kind: str, model_dir: Path, digits_for: dict, tmp_path: Path
) -> None:
    report = Recorder()
    metrics = run(model_dir, {"target_sparsity": 0.5}, digits_for[model_kind], tmp_path, report)

    assert report.stages == ["loading", "baseline", "pruning", "evaluating", "saving"]
    progress = [p for _, p in report.calls]
    assert progress == sorted(progress) and progress[0] >= 0.0 and progress[-1] < 1.0
    optional = {"delta_by_output"} if model_kind == "tf_module" else set()  # two outputs: logits, probs
    assert set(metrics) == {
        "spec", "baseline", "pruned", "delta", "layers", "timings_s", "notes", "versions", *optional
    }  # fmt: skip
    assert set(metrics["baseline"]) >= SIDE_KEYS and set(metrics["pruned"]) >= SIDE_KEYS
    assert metrics["spec"]["target_sparsity"] == 0.5 and metrics["versions"]["tensorflow"]
    assert set(metrics["timings_s"]) >= {
        "load",
        "baseline",
        "prune",
        "fine_tune",
        "evaluate",
        "save",
        "total",
    }

    layers = {layer["name"]: layer for layer in metrics["layers"]}
    assert layers and all(abs(layer["sparsity"] - 0.5) <= 0.01 for layer in layers.values())
    zeros = artifact_zeros(tmp_path)
    assert zeros.keys() == layers.keys()
    assert all(abs(z - 0.5) <= 0.01 for z in zeros.values()), zeros
    for name, z in zeros.items():
        assert z == pytest.approx(layers[name]["sparsity"])

    original, pruned = load_model(model_dir), load_model(tmp_path / "saved_model")
    assert describe(pruned)["signatures"] == describe(original)["signatures"]
    assert (tmp_path / "pruned.zip").stat().st_size == metrics["pruned"]["size_bytes"]["zip"]

    base, after = metrics["baseline"], metrics["pruned"]
    assert base["sparsity"] == 0.0 and abs(after["sparsity"] - 0.5) <= 0.01
    assert base["params"]["total"] == after["params"]["total"] == describe(original)["params"]
    assert after["params"]["nonzero"] < base["params"]["nonzero"]
    assert base["metrics"]["accuracy"] > 0.7
    assert metrics["delta"]["accuracy"] == pytest.approx(
        after["metrics"]["accuracy"] - base["metrics"]["accuracy"]
    )
    assert set(base["latency_ms"]) == set(after["latency_ms"]) == {"1"}  # the default: batch 1 only
    assert all(v["p50"] > 0 and v["p95"] >= v["p50"] for v in after["latency_ms"].values())


def test_global_scope_hits_overall_sparsity(keras2_dir: Path, digits_cnn: tuple, tmp_path: Path) -> None:
    metrics = run(keras2_dir, {"target_sparsity": 0.7, "scope": "global"}, digits_cnn, tmp_path)
    layers = metrics["layers"]
    overall = sum(layer["sparsity"] * layer["params"] for layer in layers) / sum(x["params"] for x in layers)
    assert abs(overall - 0.7) <= 0.01
    assert abs(metrics["pruned"]["sparsity"] - 0.7) <= 0.01
    assert len({round(layer["sparsity"], 2) for layer in layers}) > 1  # one threshold, uneven per layer
    zeros = artifact_zeros(tmp_path)
    sizes = {layer["name"]: layer["params"] for layer in layers}
    assert abs(sum(zeros[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.7) <= 0.01


def test_polynomial_with_fine_tuning_keeps_masks_and_recovers(
    keras2_dir: Path, digits_cnn: tuple, tmp_path: Path
) -> None:
    spec = {
        "target_sparsity": 0.8,
        "schedule": {"kind": "polynomial", "frequency": 5},
        "fine_tune": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01},
    }
    report = Recorder()
    metrics = run(keras2_dir, spec, digits_cnn, tmp_path, report)

    assert report.stages == STAGES
    assert sum(stage == "fine_tuning" for stage, _ in report.calls) > 10  # periodic progress while training
    assert TRAINING_MODE_NOTE in metrics["notes"]
    assert all(abs(layer["sparsity"] - 0.8) <= 0.01 for layer in metrics["layers"])
    assert all(abs(z - 0.8) <= 0.01 for z in artifact_zeros(tmp_path).values())
    # 80% of a tiny CNN's weights gone; two epochs of fine-tuning bring it back close to the baseline.
    assert metrics["pruned"]["metrics"]["accuracy"] > 0.8
    assert metrics["baseline"]["metrics"]["accuracy"] - metrics["pruned"]["metrics"]["accuracy"] < 0.1


def test_fine_tuning_through_an_inference_signature(
    keras3_export_dir: Path, digits_cnn: tuple, tmp_path: Path
) -> None:
    spec = {"target_sparsity": 0.8, "fine_tune": {"epochs": 1, "batch_size": 16, "learning_rate": 0.01}}
    without = run(keras3_export_dir, {"target_sparsity": 0.8}, digits_cnn, tmp_path / "plain")
    metrics = run(keras3_export_dir, spec, digits_cnn, tmp_path / "tuned")
    assert INFERENCE_MODE_NOTE in metrics["notes"]
    assert all(abs(z - 0.8) <= 0.01 for z in artifact_zeros(tmp_path / "tuned").values())
    assert metrics["pruned"]["metrics"]["accuracy"] > without["pruned"]["metrics"]["accuracy"] + 0.2


def test_include_exclude_and_layer_sparsity(keras2_dir: Path, digits_cnn: tuple, tmp_path: Path) -> None:
    spec = {
        "target_sparsity": 0.6,
        "include": ["kernel"],
        "exclude": ["^conv2d/"],
        "layer_sparsity": {"dense_1": 0.3, "no_such_layer": 0.9},
    }
    metrics = run(keras2_dir, spec, digits_cnn, tmp_path)
    layers = {layer["name"]: layer["sparsity"] for layer in metrics["layers"]}
    assert set(layers) == {"dense/kernel", "dense_1/kernel"}
    assert abs(layers["dense/kernel"] - 0.6) <= 0.01 and abs(layers["dense_1/kernel"] - 0.3) <= 0.01
    zeros = artifact_zeros(tmp_path)
    assert zeros["conv2d/kernel"] == 0.0  # excluded: untouched
    assert abs(zeros["dense_1/kernel"] - 0.3) <= 0.01
    assert any("no_such_layer" in note for note in metrics["notes"])


def test_labels_for_a_named_output_of_a_multi_output_signature(
    tf_module_dir: Path, digits_flat: tuple, tmp_path: Path
) -> None:
    train, test = digits_flat
    data = ({"x": train["x"]}, {"x.pixels": test["x"], "y.logits": test["y"]})
    metrics = run(tf_module_dir, {"target_sparsity": 0.3}, data, tmp_path, train=False)
    assert any("'logits'" in note for note in metrics["notes"])
    assert (
        metrics["baseline"]["metrics"]["accuracy"] > 0.8
    )  # logits recognised as such (from_logits inferred)
    assert 0 < metrics["baseline"]["metrics"]["loss"] < 1.0


def test_without_evaluation_labels_metrics_are_null(
    keras_file: Path, digits_cnn: tuple, tmp_path: Path
) -> None:
    unlabelled = ({}, {"x": digits_cnn[1]["x"]})
    metrics = run(
        keras_file, {"target_sparsity": 0.5}, unlabelled, tmp_path, train=False
    )  # the .keras file itself
    assert metrics["baseline"]["metrics"] is None and metrics["pruned"]["metrics"] is None
    assert metrics["delta"] == {}
    assert any("no 'y'" in note for note in metrics["notes"])
    assert (tmp_path / "pruned.zip").is_file()

    bare = run(keras_file, {"target_sparsity": 0.5}, None, tmp_path / "bare")
    assert bare["pruned"]["metrics"] is None and set(bare["pruned"]["latency_ms"]) == {"1"}


def test_runs_are_reproducible(keras3_export_dir: Path, digits_cnn: tuple, tmp_path: Path) -> None:
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1, "batch_size": 64}, "seed": 3}
    first = run(keras3_export_dir, spec, digits_cnn, tmp_path / "a")
    second = run(keras3_export_dir, spec, digits_cnn, tmp_path / "b")
    assert first["pruned"]["metrics"]["confusion_matrix"] == second["pruned"]["metrics"]["confusion_matrix"]
    assert first["pruned"]["metrics"]["loss"] == pytest.approx(second["pruned"]["metrics"]["loss"], rel=1e-5)


def _code(excinfo: pytest.ExceptionInfo[PipelineError]) -> str:
    return excinfo.value.code


def test_actionable_errors(
    tf_module_dir: Path,
    keras2_dir: Path,
    file_reading_dir: Path,
    digits_flat: tuple,
    digits_cnn: tuple,
    tmp_path: Path,
) -> None:
    with pytest.raises(PipelineError) as wrong_signature:
        run(tf_module_dir, {"target_sparsity": 0.5, "signature": "predict"}, digits_flat, tmp_path / "a")
    assert (
        _code(wrong_signature) == "signature_not_found" and "serving_default" in wrong_signature.value.message
    )

    with pytest.raises(PipelineError) as wrong_shape:
        run(keras2_dir, {"target_sparsity": 0.5}, digits_flat, tmp_path / "b")
    assert _code(wrong_shape) == "dataset_mismatch" and "[None, 8, 8, 1]" in wrong_shape.value.message

    unlabelled_train = ({"x": digits_cnn[0]["x"]}, digits_cnn[1])
    with pytest.raises(PipelineError) as no_labels:
        run(
            keras2_dir, {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}, unlabelled_train, tmp_path / "c"
        )
    assert _code(no_labels) == "dataset_mismatch" and "fine_tune" in no_labels.value.message

    with pytest.raises(PipelineError) as nothing_selected:
        run(keras2_dir, {"target_sparsity": 0.5, "include": ["^lstm"]}, digits_cnn, tmp_path / "d")
    assert _code(nothing_selected) == "invalid_spec" and "dense_1/kernel" in nothing_selected.value.message

    with pytest.raises(PipelineError) as unsafe:
        run(file_reading_dir, {"target_sparsity": 0.5}, digits_flat, tmp_path / "e")
    assert _code(unsafe) == "unsafe_model" and "ReadFile" in unsafe.value.message

    cross_validation = {"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 3}}}
    with pytest.raises(PipelineError) as no_train_labels:
        run(keras2_dir, cross_validation, unlabelled_train, tmp_path / "f")
    assert _code(no_train_labels) == "dataset_mismatch"
    assert "evaluation.cross_validation" in no_train_labels.value.message


class Cancel(Exception):
    pass


def test_report_exceptions_propagate_untouched(keras2_dir: Path, digits_cnn: tuple, tmp_path: Path) -> None:
    def report(stage: str, progress: float) -> None:
        if stage == "fine_tuning" and progress > 0.3:
            raise Cancel

    with pytest.raises(Cancel):
        run_pipeline(
            keras2_dir,
            PruneSpec.model_validate({"target_sparsity": 0.5, "fine_tune": {"epochs": 2}}),
            *digits_cnn,
            tmp_path,
            report,
        )
    assert not (tmp_path / "pruned.zip").exists()


class GradientTimesWeight(Criterion):
    """A gradient criterion for the test (|w * dL/dw|); records the statistics the pipeline passes in."""

    name = "taylor"
    needs_gradients = True
    received: ClassVar[list[GradientStats]] = []

    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        assert isinstance(grad, GradientStats) and grad.abs_taylor.shape == weight.shape
        type(self).received.append(grad)
        return grad.abs_taylor


def test_gradient_criteria_get_train_gradients(
    keras3_export_dir: Path, digits_cnn: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(CRITERIA, "taylor", GradientTimesWeight)
    monkeypatch.setattr(GradientTimesWeight, "received", [])
    metrics = run(keras3_export_dir, {"target_sparsity": 0.5, "criterion": "taylor"}, digits_cnn, tmp_path)
    assert all(abs(layer["sparsity"] - 0.5) <= 0.01 for layer in metrics["layers"])
    assert len(GradientTimesWeight.received) == len(metrics["layers"])  # one-shot: one statistics pass
    # Statistics over GRADIENT_SAMPLES train samples (the train split has 1347), every variable connected.
    assert {(s.samples, s.connected) for s in GradientTimesWeight.received} == {(GRADIENT_SAMPLES, True)}
    assert all(s.abs_taylor.sum() > 0 for s in GradientTimesWeight.received)

    with pytest.raises(PipelineError) as no_train:
        run(
            keras3_export_dir,
            {"target_sparsity": 0.5, "criterion": "taylor"},
            digits_cnn,
            tmp_path / "b",
            train=False,
        )
    assert no_train.value.code == "dataset_mismatch" and "taylor" in no_train.value.message
