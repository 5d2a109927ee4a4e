"""worker.export on the four kinds of upload: every TFLite format converts, runs in LiteRT at batch 1, and the
metrics computed from the runtime's outputs are scikit-learn's on the same predictions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tests.worker.conftest import INPUT_NAME
from worker.evaluation.metrics import evaluate_output
from worker.export import FORMATS, ExportError, TFLiteModel, convert_saved_model, zip_size
from worker.export.convert import one_line_reason

# The output whose classes the labels name: the only one, but the plain module returns logits and probs.
OUTPUT = {"tf_module": "probs"}


def _probs(model_kind: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
    if model_kind in OUTPUT:
        return outputs[OUTPUT[model_kind]]
    (only,) = outputs.values()
    return only


CALIBRATION = 100


def _representative(x: np.ndarray, name: str):  # type: ignore[no-untyped-def]
    def samples() -> Iterator[dict[str, np.ndarray]]:
        for i in range(CALIBRATION):
            yield {name: x[i : i + 1]}

    return samples


@pytest.fixture(scope="module")
def converted(
    model_kind: str,
    model_dir: Path,
    digits_for: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> dict[str, tuple[bytes, dict[str, np.ndarray]]]:
    """Every format of one kind, with the runtime's outputs on the digits test set."""
    train, test = digits_for[model_kind]
    name = INPUT_NAME[model_kind]
    result = {}
    for fmt in FORMATS:
        content = convert_saved_model(
            model_dir, fmt, "serving_default", representative=_representative(train["x"], name)
        )
        result[fmt] = (content, TFLiteModel(content, "serving_default").predict({name: test["x"]}).outputs)
    return result


def _keras_outputs(model_kind: str, model_dir: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    return _probs(
        model_kind, {k: v.numpy() for k, v in fn(**{INPUT_NAME[model_kind]: tf.constant(x)}).items()}
    )


def test_every_format_scores_like_scikit_learn_and_int8_stays_close(
    model_kind: str,
    model_dir: Path,
    converted: dict[str, tuple[bytes, dict[str, np.ndarray]]],
    digits_for: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> None:
    _, test = digits_for[model_kind]
    accuracy = {}
    for fmt, (content, outputs) in converted.items():
        probs = _probs(model_kind, outputs)
        assert probs.shape == (len(test["y"]), 10), fmt
        metrics = evaluate_output(test["y"], probs)
        predicted = probs.argmax(axis=1)
        assert metrics["accuracy"] == pytest.approx(accuracy_score(test["y"], predicted))
        assert metrics["f1_macro"] == pytest.approx(f1_score(test["y"], predicted, average="macro"))
        accuracy[fmt] = metrics["accuracy"]
        assert 0 < zip_size(content) < len(content) + 200
    assert accuracy["float32"] > 0.8  # the tiny models are trained, so the comparison below means something
    for fmt in ("float16", "dynamic_range", "int8"):
        assert abs(accuracy[fmt] - accuracy["float32"]) <= 0.03, (fmt, accuracy)
    sizes = {fmt: len(content) for fmt, (content, _) in converted.items()}
    assert sizes["dynamic_range"] < sizes["float32"] and sizes["int8"] < sizes["float32"], sizes


def test_float32_reproduces_the_saved_model(
    model_kind: str,
    model_dir: Path,
    converted: dict[str, tuple[bytes, dict[str, np.ndarray]]],
    digits_for: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
) -> None:
    _, test = digits_for[model_kind]
    expected = _keras_outputs(model_kind, model_dir, test["x"])
    got = _probs(model_kind, converted["float32"][1])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_int8_io_takes_and_returns_int8_tensors(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    train, test = digits_cnn
    content = convert_saved_model(
        keras3_export_dir,
        "int8",
        "serving_default",
        representative=_representative(train["x"], "image"),
        int8_io=True,
    )
    model = TFLiteModel(content, "serving_default")
    assert model.io_types() == {"input:image": "int8", "output:output_0": "int8"}
    probs = model.predict({"image": test["x"]}).outputs["output_0"]  # dequantized by the evaluator
    assert probs.dtype == np.float32
    assert np.all(probs >= -0.01) and np.all(probs <= 1.01)  # softmax values after dequantization
    float_io = convert_saved_model(
        keras3_export_dir, "int8", "serving_default", representative=_representative(train["x"], "image")
    )
    reference = TFLiteModel(float_io).predict({"image": test["x"]}).outputs["output_0"]
    agreement = np.mean(probs.argmax(1) == reference.argmax(1))
    assert agreement > 0.95


def test_the_jobs_signature_of_a_multi_signature_module(tf_module_dir: Path) -> None:
    content = convert_saved_model(tf_module_dir, "float32", "embed")
    model = TFLiteModel(content, "embed")
    assert model.signature == "embed"
    assert set(model.outputs) == {"features"}
    assert set(TFLiteModel(convert_saved_model(tf_module_dir, "float32", "serving_default")).outputs) == {
        "logits",
        "probs",
    }


def test_latency_comes_from_the_timed_calls(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    _, test = digits_cnn
    prediction = TFLiteModel(convert_saved_model(keras3_export_dir, "float32", "serving_default")).predict(
        {"image": test["x"][:20]}, warmup=3
    )
    latency = prediction.latency()
    assert latency is not None
    assert latency["runs"] == 17 and latency["warmup"] == 3
    assert 0 < latency["p50"] <= latency["p95"]


@pytest.fixture(scope="module")
def bilstm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Bidirectional(keras.layers.LSTM(4)), keras.layers.Dense(2)]
    )
    out = tmp_path_factory.mktemp("bilstm") / "saved_model"
    model.export(str(out), verbose=False)
    return out


def test_a_bidirectional_lstm_fails_with_one_line_and_what_to_try(bilstm_dir: Path) -> None:
    with pytest.raises(ExportError) as caught:
        convert_saved_model(bilstm_dir, "float32", "serving_default")
    error = caught.value
    assert "\n" not in str(error)
    assert "TensorList" in error.reason and "loc(" not in error.reason
    assert "Please consider" not in error.reason  # the converter's Select TF ops advice does not apply here
    assert "Select TF ops are not offered" in error.hint


def test_one_line_reason_strips_locations() -> None:
    text = (
        'loc(callsite(fused["X:", "a@b"] at fused["Y:", "c"])): error: \'tf.Foo\' op is neither a custom op '
        "nor a flex op\n<unknown>:0: note: called from\nerror: failed while converting: 'main'\n"
    )
    reason = one_line_reason(RuntimeError(text))
    assert reason == "'tf.Foo' op is neither a custom op nor a flex op; failed while converting: 'main'"


def test_int8_needs_a_representative_dataset(keras3_export_dir: Path) -> None:
    with pytest.raises(ValueError, match="representative"):
        convert_saved_model(keras3_export_dir, "int8", "serving_default")
    with pytest.raises(ValueError, match="unknown TFLite format"):
        convert_saved_model(keras3_export_dir, "int4", "serving_default")
