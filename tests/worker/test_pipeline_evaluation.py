"""The evaluation wired through ``run_pipeline``: every number checked against an independent computation.

Each test takes what a user downloads (the artifact) and the uploaded model, predicts with TensorFlow here,
and recomputes the document's numbers with scikit-learn / NumPy called directly: quality metrics per task
(multi-class, binary sigmoid, regression on scikit-learn's diabetes data, per output of a multi-output
model), fidelity without labels, MACs, zip sizes, the latency budget and K-fold cross-validation. Every
document produced here must validate against the pydantic model AND the published JSON Schema.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from sklearn import metrics as skm

from app.schemas.metrics import MetricsDocument, metrics_json_schema
from app.schemas.spec import NOT_YET_SUPPORTED, Latency, PruneSpec, unsupported_features
from tests.support import model_zoo
from worker.errors import PipelineError
from worker.evaluation.size import zip_dir
from worker.evaluation.zip_size import ZipSizeInBackground, cache_path, deflate_zip_size, shared_zip_size
from worker.pipeline import run_pipeline
from worker.stages.latency import MIN_RUNS, budgeted_latency

pytestmark = pytest.mark.tf

FAST_LATENCY = {"batch_sizes": [1], "runs": 3, "warmup": 1}
SCHEMA = metrics_json_schema()
Arrays = dict[str, np.ndarray]


def validated(metrics: dict[str, Any]) -> dict[str, Any]:
    """The document as the API serves it, checked against the pydantic model and the published JSON Schema."""
    document = json.loads(json.dumps({"job_id": "job_t", "model_id": "mdl_t", **metrics}, allow_nan=False))
    MetricsDocument.model_validate(document)
    jsonschema.validate(document, SCHEMA)
    return document


def run(
    model: Path,
    spec: dict[str, Any],
    train: Arrays | None,
    evaluation: Arrays | None,
    out: Path,
    report: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    full = {"evaluation": {"latency": FAST_LATENCY}, **spec}
    metrics = run_pipeline(
        model, PruneSpec.model_validate(full), train, evaluation, out, report or (lambda stage, p: None)
    )
    return validated(metrics)


def predict(saved_model: Path, arrays: Arrays, signature: str = "serving_default") -> dict[str, np.ndarray]:
    """Every output of ``signature`` for the dataset's inputs, with TensorFlow directly (batches of 256)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # kept referenced: its signatures read its variables
    fn = loaded.signatures[signature]
    inputs = fn.structured_input_signature[1]
    named = {k: arrays.get(f"x.{k}", arrays.get("x")) for k in inputs}  # API.md: x.<input>, or x alone
    n = len(next(iter(named.values())))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, 256):
        batch = {k: tf.constant(v[start : start + 256], dtype=inputs[k].dtype) for k, v in named.items()}
        for name, value in fn(**batch).items():
            parts.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def assert_classification(got: dict[str, Any], labels: np.ndarray, probs: np.ndarray) -> None:
    """Our keys against scikit-learn called directly on probabilities (rows sum to 1)."""
    classes = list(range(probs.shape[1]))
    pred = probs.argmax(axis=1)
    assert got["task"] == "classification"
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    for average in ("macro", "weighted"):
        for name, fn in (
            ("precision", skm.precision_score),
            ("recall", skm.recall_score),
            ("f1", skm.f1_score),
        ):
            expected = fn(labels, pred, average=average, zero_division=0)
            assert got[f"{name}_{average}"] == pytest.approx(expected), f"{name}_{average}"
    assert got["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=classes).tolist()
    assert got["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=classes), rel=1e-5)
    report = skm.classification_report(labels, pred, labels=classes, output_dict=True, zero_division=0)
    assert got["classification_report"]["macro avg"]["f1-score"] == pytest.approx(
        report["macro avg"]["f1-score"]
    )
    if len(classes) > 5:
        top5 = skm.top_k_accuracy_score(labels, probs, k=5, labels=classes)
        assert got["top5_accuracy"] == pytest.approx(top5)
    else:
        assert "top5_accuracy" not in got


def assert_regression(got: dict[str, Any], y: np.ndarray, out: np.ndarray) -> None:
    y2, out2 = y.reshape(len(y), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    assert got["task"] == "regression"
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y2, out2), rel=1e-5)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y2, out2), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(y2, out2), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- tasks


def test_classification_metrics_and_fidelity_equal_sklearn_on_the_artifact(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    train, test = digits_cnn
    metrics = run(keras3_export_dir, {"target_sparsity": 0.7}, train, test, tmp_path)
    before = predict(keras3_export_dir, test)["output_0"]
    after = predict(tmp_path / "saved_model", test)["output_0"]
    assert not np.allclose(before, after)  # pruning changed the model, so the comparisons below can fail

    assert_classification(metrics["baseline"]["metrics"], test["y"], before)
    assert_classification(metrics["pruned"]["metrics"], test["y"], after)
    assert metrics["delta"]["f1_macro"] == pytest.approx(
        metrics["pruned"]["metrics"]["f1_macro"] - metrics["baseline"]["metrics"]["f1_macro"]
    )
    assert "metrics_by_output" not in metrics["pruned"]  # one output: API.md's flat metrics only

    fidelity = metrics["pruned"]["fidelity"]
    assert fidelity["n_predictions"] == len(test["y"])
    assert fidelity["top1_agreement"] == pytest.approx(skm.accuracy_score(before.argmax(1), after.argmax(1)))
    assert fidelity["mean_abs_output_diff"] == pytest.approx(np.mean(np.abs(before - after)), rel=1e-5)
    p, q = np.clip(before.astype(np.float64), 1e-7, 1), np.clip(after.astype(np.float64), 1e-7, 1)
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    assert fidelity["kl_divergence"] == pytest.approx(np.mean(np.sum(p * np.log(p / q), axis=1)), rel=1e-4)


@pytest.fixture(scope="module")
def diabetes_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Arrays, Arrays]:
    """A small Keras MLP regressor trained on scikit-learn's bundled diabetes data (standardised target)."""
    import keras
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(10,), name="features"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x_tr, y_tr, epochs=10, batch_size=32, verbose=0)
    out = tmp_path_factory.mktemp("diabetes") / "saved_model"
    model.export(str(out), verbose=False)
    return out, {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}


@pytest.mark.parametrize("task", ["auto", "regression"])
def test_regression_on_diabetes_equals_sklearn(
    diabetes_model: tuple[Path, Arrays, Arrays], tmp_path: Path, task: str
) -> None:
    model, train, test = diabetes_model
    spec = {"target_sparsity": 0.5, "evaluation": {"task": task, "latency": FAST_LATENCY}}
    metrics = run(model, spec, train, test, tmp_path)
    before = predict(model, test)["output_0"]
    after = predict(tmp_path / "saved_model", test)["output_0"]
    assert metrics["baseline"]["metrics"]["r2"] > 0.25  # a trained model (0.33 here), not noise
    assert_regression(metrics["baseline"]["metrics"], test["y"], before)
    assert_regression(metrics["pruned"]["metrics"], test["y"], after)
    assert set(metrics["delta"]) >= {"mse", "mae", "r2"}
    fidelity = metrics["pruned"]["fidelity"]
    assert fidelity["task"] == "regression" and "top1_agreement" not in fidelity
    assert fidelity["mean_abs_output_diff"] == pytest.approx(np.mean(np.abs(before - after)), rel=1e-5)


def test_binary_sigmoid_classifier_equals_sklearn(tmp_path: Path) -> None:
    """One sigmoid unit, 0/1 labels: classification with p > 0.5 and the log loss of [1 - p, p]."""
    import keras
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(30,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x_tr, y_tr, epochs=15, batch_size=32, verbose=0)
    model.export(str(tmp_path / "model"), verbose=False)

    metrics = run(
        tmp_path / "model", {"target_sparsity": 0.5}, None, {"x": x_te, "y": y_te}, tmp_path / "out"
    )
    for side, saved in (("baseline", tmp_path / "model"), ("pruned", tmp_path / "out" / "saved_model")):
        p = predict(saved, {"x": x_te})["output_0"].reshape(-1).astype(np.float64)
        assert_classification(metrics[side]["metrics"], y_te, np.stack([1 - p, p], axis=1))
    assert metrics["baseline"]["metrics"]["accuracy"] > 0.9
    assert "top1_agreement" in metrics["pruned"]["fidelity"]


@pytest.fixture(scope="module")
def multi_io(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_zoo.build("multi_io", tmp_path_factory.mktemp("zoo") / "multi_io")


def test_multi_output_model_is_evaluated_per_output(multi_io: Path, tmp_path: Path) -> None:
    train, test = model_zoo.datasets("multi_io")
    metrics = run(multi_io, {"target_sparsity": 0.5}, train, test, tmp_path)
    before, after = predict(multi_io, test), predict(tmp_path / "saved_model", test)
    for side, outputs in (("baseline", before), ("pruned", after)):
        by_output = metrics[side]["metrics_by_output"]
        assert set(by_output) == {"cls", "reg"}
        assert_classification(by_output["cls"], test["y.cls"], outputs["cls"])
        assert_regression(by_output["reg"], test["y.reg"], outputs["reg"])
        assert metrics[side]["metrics"] == by_output["cls"]  # API.md's flat metrics: the selected output
    assert set(metrics["delta_by_output"]) == {"cls", "reg"}
    assert metrics["delta_by_output"]["reg"]["mse"] == pytest.approx(
        metrics["pruned"]["metrics_by_output"]["reg"]["mse"]
        - metrics["baseline"]["metrics_by_output"]["reg"]["mse"]
    )
    fidelity = metrics["pruned"]["fidelity_by_output"]
    assert set(fidelity) == {"cls", "reg"} and metrics["pruned"]["fidelity"] == fidelity["cls"]
    assert "top1_agreement" in fidelity["cls"] and "top1_agreement" not in fidelity["reg"]
    assert fidelity["reg"]["mean_abs_output_diff"] == pytest.approx(
        np.mean(np.abs(before["reg"] - after["reg"])), rel=1e-5
    )


def test_inputs_only_give_fidelity_and_null_metrics(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    train, test = digits_cnn
    x_only = {"x": test["x"]}
    metrics = run(keras3_export_dir, {"target_sparsity": 0.8}, None, x_only, tmp_path / "eval")
    assert metrics["baseline"]["metrics"] is None and metrics["pruned"]["metrics"] is None
    assert metrics["delta"] == {}
    before = predict(keras3_export_dir, x_only)["output_0"]
    after = predict(tmp_path / "eval" / "saved_model", x_only)["output_0"]
    fidelity = metrics["pruned"]["fidelity"]
    assert fidelity["n_predictions"] == len(test["x"])
    assert fidelity["top1_agreement"] == pytest.approx(skm.accuracy_score(before.argmax(1), after.argmax(1)))
    assert fidelity["top1_agreement"] < 1.0  # 80% of the weights gone: something moved

    # No eval set at all: fidelity on the train set (fewer samples than FIDELITY_TRAIN_SAMPLES: all of them).
    train_only = run(keras3_export_dir, {"target_sparsity": 0.8}, train, None, tmp_path / "train")
    assert train_only["pruned"]["metrics"] is None
    assert train_only["pruned"]["fidelity"]["n_predictions"] == len(train["y"])
    assert any("fidelity is measured on the" in note for note in train_only["notes"])


# ---------------------------------------------------------------- size and compute


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo_conv")
    return {kind: model_zoo.build(kind, root / kind) for kind in ("conv2d", "conv1d")}


@pytest.mark.parametrize(
    ("kind", "positions"),
    [
        # Conv2D 3x3 valid on 8x8 -> 6x6, again -> 4x4, Flatten -> Dense [128, 4]
        ("conv2d", {(3, 3, 4, 8): 36, (3, 3, 8, 8): 16, (128, 4): 1}),
        # Conv1D k=3 valid on length 12 -> 10 positions, GAP -> Dense [8, 4]
        ("conv1d", {(3, 4, 8): 10, (8, 4): 1}),
    ],
)
def test_macs_use_output_sizes_read_from_the_graph(
    conv_models: dict[str, Path], tmp_path: Path, kind: str, positions: dict[tuple[int, ...], int]
) -> None:
    import tensorflow as tf

    train, test = model_zoo.datasets(kind)
    metrics = run(conv_models[kind], {"target_sparsity": 0.5}, train, test, tmp_path)
    artifact = tf.saved_model.load(str(tmp_path / "saved_model"))
    kernels = [v for v in artifact.signatures["serving_default"].variables if len(v.shape) >= 2]
    nonzero = {tuple(v.shape): int(np.count_nonzero(v.numpy())) for v in kernels}
    dense = effective = 0
    for row in metrics["layers"]:
        shape = tuple(row["shape"])
        assert row["positions"] == positions[shape], row
        assert row["dense_macs"] == math.prod(shape) * positions[shape]
        assert row["effective_macs"] == nonzero[shape] * positions[shape]
        dense += row["dense_macs"]
        effective += row["effective_macs"]
    assert set(positions) == {tuple(row["shape"]) for row in metrics["layers"]}
    assert metrics["pruned"]["macs"]["dense_macs"] == metrics["baseline"]["macs"]["dense_macs"] == dense
    assert metrics["pruned"]["macs"]["effective_macs"] == effective
    assert metrics["baseline"]["macs"]["effective_fraction"] == pytest.approx(1.0)
    assert any("dense kernels still compute" in note for note in metrics["notes"])


def test_attention_projections_count_their_macs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keras 3 MultiHeadAttention / EinsumDense reshape their ``(d_model, heads, head_dim)`` kernels to 2-D
    before a BatchMatMulV2: each weight still counts once per token (6 tokens here), so a transformer's
    ``baseline.macs`` covers its projections instead of calling them uncounted."""
    import keras

    keras.utils.set_random_seed(0)
    tokens = keras.Input((6, 8), name="tokens")
    # named: Keras numbers unnamed layers per process (dense_1, ...), and other tests build models too
    hidden = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(tokens, tokens)
    hidden = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 5), name="proj")(hidden)
    logits = keras.layers.Dense(3, name="classifier")(keras.layers.Flatten()(hidden))
    model_dir = tmp_path_factory.mktemp("mha") / "saved_model"
    keras.Model(tokens, logits).export(str(model_dir), verbose=False)

    metrics = run(model_dir, {"target_sparsity": 0.5}, None, None, tmp_path_factory.mktemp("out"))
    rows = {row["name"]: row for row in metrics["layers"]}
    for projection in ("query", "key", "value", "attention_output"):
        row = rows[f"mha/{projection}/kernel"]
        assert row["positions"] == 6 and row["dense_macs"] == 64 * 6, row
    assert rows["proj/kernel"]["dense_macs"] == 8 * 5 * 6
    assert rows["classifier/kernel"]["dense_macs"] == 30 * 3
    assert metrics["baseline"]["macs"]["dense_macs"] == 4 * 64 * 6 + 8 * 5 * 6 + 30 * 3
    # the 2-D (heads, head_dim) biases look like kernels but are added, not multiplied: named, not guessed
    assert sorted(metrics["baseline"]["macs"]["uncounted"]) == [f"mha/{p}/bias" for p in ("key", "query", "value")]
    assert metrics["pruned"]["macs"]["effective_macs"] < metrics["baseline"]["macs"]["dense_macs"]


def test_sizes_and_params_match_the_files_and_variables(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    import tensorflow as tf

    metrics = run(keras3_export_dir, {"target_sparsity": 0.5}, None, digits_cnn[1], tmp_path)
    assert metrics["baseline"]["size_bytes"]["zip"] == zip_dir(keras3_export_dir, tmp_path / "input.zip")
    assert metrics["pruned"]["size_bytes"]["zip"] == (tmp_path / "pruned.zip").stat().st_size
    artifact = tf.saved_model.load(str(tmp_path / "saved_model"))
    variables = artifact.signatures["serving_default"].variables
    params = metrics["pruned"]["params"]
    assert params["total"] == sum(int(np.prod(v.shape)) for v in variables)
    assert params["nonzero"] == sum(int(np.count_nonzero(v.numpy())) for v in variables)
    kernels = [v for v in variables if len(v.shape) >= 2]
    assert params["prunable"] == sum(int(np.prod(v.shape)) for v in kernels)
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in kernels)
    assert metrics["pruned"]["sparsity"] == pytest.approx(zeros / params["prunable"])


def test_zip_size_without_writing_equals_the_zip_file_and_can_be_canceled(
    keras3_export_dir: Path, tmp_path: Path
) -> None:
    assert deflate_zip_size(keras3_export_dir) == zip_dir(keras3_export_dir, tmp_path / "a.zip")
    background = ZipSizeInBackground(keras3_export_dir)
    assert background.result() == (tmp_path / "a.zip").stat().st_size

    big = tmp_path / "big"
    big.mkdir()
    (big / "noise.bin").write_bytes(np.random.default_rng(0).bytes(48 << 20))  # ~1 s of deflate
    slow = ZipSizeInBackground(big)
    slow.cancel()
    with pytest.raises(RuntimeError, match="canceled"):  # stopped within a chunk, not after the whole file
        slow.result()


def test_zip_size_is_cached_beside_the_model(keras3_export_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "saved_model"
    shutil.copytree(keras3_export_dir, model)
    size = ZipSizeInBackground(model, cache=True).result()
    cached = cache_path(model, 6)
    assert cached.parent == tmp_path and cached.read_text() == str(size)
    assert size == deflate_zip_size(model)
    cached.write_text("12345")  # proves the next job reads the file instead of compressing again
    assert ZipSizeInBackground(model, cache=True).result() == 12345
    assert ZipSizeInBackground(model).result() == size  # without cache: computed
    cached.write_text("garbage")
    assert ZipSizeInBackground(model, cache=True).result() == size  # unreadable cache: computed again


# ---------------------------------------------------------------- latency


def test_budgeted_latency_stops_at_the_budget_but_keeps_the_minimum() -> None:
    calls: list[str] = []

    def call(name: str) -> Callable[[], None]:
        def fn() -> None:
            calls.append(name)
            time.sleep(0.005)

        return fn

    fns = {"baseline": call("baseline"), "pruned": call("pruned")}
    stats, runs, warmup = budgeted_latency(fns, runs=100, warmup=3, budget_s=0.1, batch_size=4)
    assert MIN_RUNS <= runs < 100 and warmup == 3  # 100 rounds of 10 ms cannot fit in 0.1 s
    assert calls == ["baseline", "pruned"] * (runs + warmup)  # interleaved, never one model alone
    for row in stats.values():
        assert row["runs"] == runs and row["warmup"] == warmup
        assert row["p50"] >= 5.0 and row["p95"] >= row["p50"]
        assert row["samples_per_s"] == pytest.approx(4 * 1000.0 / row["mean"])

    _, runs, warmup = budgeted_latency(fns, runs=100, warmup=5, budget_s=1e-9, batch_size=1)
    assert (runs, warmup) == (MIN_RUNS, 1)  # the budget never cuts below the minimum
    _, runs, _ = budgeted_latency(fns, runs=2, warmup=0, budget_s=1e-9, batch_size=1)
    assert runs == 2  # fewer runs than the minimum when that is all the spec asks for


def test_latency_rows_record_runs_and_the_budget_cut(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    latency = {"batch_sizes": [1, 64], "runs": 1000, "warmup": 2, "budget_s": 0.2}
    spec = {"target_sparsity": 0.5, "evaluation": {"latency": latency}}
    metrics = run(keras3_export_dir, spec, None, digits_cnn[1], tmp_path)
    for side in ("baseline", "pruned"):
        rows = metrics[side]["latency_ms"]
        assert set(rows) == {"1", "64"}
        for batch, row in rows.items():
            assert MIN_RUNS <= row["runs"] <= 1000 and 1 <= row["warmup"] <= 2
            assert row["samples_per_s"] == pytest.approx(int(batch) * 1000.0 / row["mean"])
    # 2000 calls cannot fit in 0.2 s per batch size on this model: the budget cut, and the notes say so.
    for side in ("baseline", "pruned"):  # each side measured alone, with half the budget; each note names it
        assert all(row["runs"] < 1000 for row in metrics[side]["latency_ms"].values())
        assert any(
            note.startswith(f"{side} model: ") and "budget of 0.1 s" in note and "64" in note
            for note in metrics["notes"]
        )


def test_latency_spec_defaults_and_limits() -> None:
    from pydantic import ValidationError

    assert Latency().warmup == 2 and Latency().budget_s == 2.0 and Latency().batch_sizes == [1]
    with pytest.raises(ValidationError):
        Latency(budget_s=0)
    with pytest.raises(ValidationError):
        Latency(warmup=-1)


# ---------------------------------------------------------------- cross-validation


def test_cross_validation_is_accepted_and_needs_a_train_dataset() -> None:
    spec = PruneSpec.model_validate(
        {"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 4}}}
    )
    assert unsupported_features(spec) == [] and NOT_YET_SUPPORTED == {}
    assert spec.needs_train_dataset()  # the API refuses the job (422) without train_dataset_id
    assert not PruneSpec.model_validate({"target_sparsity": 0.5}).needs_train_dataset()


CV_SPEC = {
    "target_sparsity": 0.6,
    "schedule": {"kind": "polynomial", "frequency": 2},
    "fine_tune": {"epochs": 1, "batch_size": 128},
}


def test_cross_validation_folds_partition_the_train_set(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    train, test = digits_cnn
    calls: list[tuple[str, float]] = []
    spec = {**CV_SPEC, "evaluation": {"cross_validation": {"folds": 3}, "latency": FAST_LATENCY}}
    metrics = run(keras3_export_dir, spec, train, test, tmp_path / "cv", lambda s, p: calls.append((s, p)))
    cv = metrics["cross_validation"]
    n = len(train["y"])
    assert cv["folds"] == 3 and cv["stratified"] is True and cv["task"] == "classification"
    rows = cv["per_fold"]
    assert [row["fold"] for row in rows] == [0, 1, 2]
    assert sum(row["n_test"] for row in rows) == n and all(
        row["n_train"] + row["n_test"] == n for row in rows
    )

    # The unpruned model is the same in every fold, so its per-fold confusion matrices add up to its confusion
    # matrix on the whole train set exactly when the held-out folds are disjoint and cover every sample once.
    base = predict(keras3_export_dir, train)["output_0"].argmax(1)
    whole = skm.confusion_matrix(train["y"], base, labels=list(range(10)))
    summed = np.sum([row["baseline"]["confusion_matrix"] for row in rows], axis=0)
    np.testing.assert_array_equal(summed, whole)
    for row in rows:
        assert np.sum(row["pruned"]["confusion_matrix"]) == row["n_test"]
        assert abs(row["sparsity"] - 0.6) <= 0.01

    # mean and population std over the folds, for baseline and pruned
    for side in ("baseline", "pruned"):
        for key in ("accuracy", "f1_macro"):
            values = [row[side][key] for row in rows]
            assert cv["summary"][side][key]["mean"] == pytest.approx(np.mean(values))
            assert cv["summary"][side][key]["std"] == pytest.approx(np.std(values))
    assert any(note.startswith("cross-validation: 3 folds") for note in metrics["notes"])

    # Progress only grows while every fold reports API.md's stages; fine-tuning ran in each fold.
    progress = [p for _, p in calls]
    assert progress == sorted(progress) and progress[-1] < 1.0
    assert {stage for stage, _ in calls} <= {
        "loading",
        "baseline",
        "pruning",
        "fine_tuning",
        "evaluating",
        "saving",
    }
    assert sum(1 for stage, _ in calls if stage == "pruning") == 4  # 3 folds + the main run
    assert metrics["timings_s"]["cross_validation"] > 0

    # The artifact is the model pruned on the whole train set: the same as without cross-validation.
    plain = run(keras3_export_dir, CV_SPEC, train, test, tmp_path / "plain")
    assert plain["pruned"]["metrics"]["confusion_matrix"] == metrics["pruned"]["metrics"]["confusion_matrix"]
    assert plain["layers"] == metrics["layers"]


def test_cross_validation_can_be_canceled_between_folds(
    keras3_export_dir: Path, digits_cnn: tuple[Arrays, Arrays], tmp_path: Path
) -> None:
    class Cancel(Exception):
        pass

    seen: list[str] = []

    def report(stage: str, progress: float) -> None:
        seen.append(stage)
        if stage == "pruning" and seen.count("pruning") == 2:  # the second fold's start
            raise Cancel

    spec = {"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 3}}}
    with pytest.raises(Cancel):
        run(keras3_export_dir, spec, *digits_cnn, tmp_path, report)
    assert "evaluating" in seen  # the first fold was evaluated before the cancellation
    assert not (tmp_path / "pruned.zip").exists()


def test_cross_validation_falls_back_to_plain_folds_and_refuses_too_few_samples(tmp_path: Path) -> None:
    model = model_zoo.build("dense", tmp_path / "dense")
    train, test = model_zoo.datasets("dense")
    rare = train["y"].copy()
    rare[rare == 3] = 2
    rare[0] = 3  # class 3 has one sample: stratified 4-fold cannot put it in every fold
    spec = {"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 4}, "latency": FAST_LATENCY}}
    metrics = run(model, spec, {"x": train["x"], "y": rare}, test, tmp_path / "a")
    assert metrics["cross_validation"]["stratified"] is False
    assert "not stratified" in metrics["cross_validation"]["note"]
    assert metrics["cross_validation"]["note"] in metrics["notes"]

    tiny = {"x": train["x"][:3], "y": train["y"][:3]}
    with pytest.raises(PipelineError) as few:
        run(model, spec, tiny, test, tmp_path / "b")
    assert few.value.code == "dataset_mismatch" and "4 folds need at least 4 samples" in few.value.message


def test_a_canceled_background_zip_leaves_no_thread_behind(keras3_export_dir: Path) -> None:
    before = threading.active_count()
    ZipSizeInBackground(keras3_export_dir).cancel()
    assert threading.active_count() == before


def test_shared_zip_size_is_one_computation_per_model(keras3_export_dir: Path, tmp_path: Path) -> None:
    """A validation starts it, the job attaches to it; a canceled one is replaced, not reused."""
    model = tmp_path / "saved_model"
    shutil.copytree(keras3_export_dir, model)
    first = shared_zip_size(model)
    assert shared_zip_size(model) is first
    first.pause()
    first.resume()
    assert first.result() == deflate_zip_size(model) and cache_path(model, 6).is_file()
    first.cancel()
    again = shared_zip_size(model)
    assert again is not first and again.result() == first.result()  # read back from the cache file
