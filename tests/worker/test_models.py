"""worker.models on real tiny models of every kind: load, describe, name, call, differentiate, save, audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.support import model_factory as mf
from tests.worker.conftest import INPUT_NAME
from worker.errors import PipelineError
from worker.models import (
    ModelHandle,
    audit_ops,
    audit_saved_model,
    bind_inputs,
    describe,
    keras_to_saved_model,
    label_key,
    load_model,
    select_output,
)
from worker.models.handle import SignatureInfo
from worker.models.naming import unique_names

pytestmark = pytest.mark.tf

EXPECTED_PRUNABLE = {
    "keras2": ["conv2d/kernel", "dense/kernel", "dense_1/kernel"],
    "keras3_export": ["digits_cnn/conv2d/kernel", "digits_cnn/dense/kernel", "digits_cnn/dense_1/kernel"],
    "keras_file": ["conv2d/kernel", "dense/kernel", "dense_1/kernel"],
    "tf_module": ["hidden_w", "out_w"],
}


@pytest.fixture(scope="module")
def handle(model_dir: Path) -> ModelHandle:
    """Read-only handle per kind; tests that mutate variables load their own."""
    return load_model(model_dir)


def _inputs(kind: str, digits_for: dict, n: int = 64) -> tuple[dict[str, np.ndarray], np.ndarray]:
    _, test = digits_for[kind]
    return {INPUT_NAME[kind]: test["x"][:n]}, test["y"][:n]


def _label_output(handle: ModelHandle) -> str:
    return select_output(handle.signature("serving_default"), ["y"])


def test_describe_reports_signatures_and_params(model_kind: str, handle: ModelHandle) -> None:
    info = describe(handle)
    serving = info["signatures"]["serving_default"]
    name = INPUT_NAME[model_kind]
    expected_shape = [None, 64] if model_kind == "tf_module" else [None, 8, 8, 1]
    assert serving["inputs"] == {name: {"shape": expected_shape, "dtype": "float32"}}
    assert all(o["shape"] is not None and o["shape"][-1] in (10, 32) for o in serving["outputs"].values())
    assert info["params"] == sum(int(np.prod(nv.var.shape)) for nv in handle.variables())
    assert info["params"] > handle.params()["prunable"] > 0


def test_variables_have_unique_meaningful_names(model_kind: str, handle: ModelHandle) -> None:
    names = [nv.name for nv in handle.variables()]
    assert len(names) == len(set(names))
    assert [nv.name for nv in handle.prunable()] == EXPECTED_PRUNABLE[model_kind]
    for nv in handle.prunable():
        assert nv.var.trainable and nv.var.dtype.is_floating and len(nv.shape) >= 2


def test_prunable_include_exclude_are_regex_searches(model_kind: str, handle: ModelHandle) -> None:
    everything = [nv.name for nv in handle.prunable()]
    first, last = everything[0], everything[-1]
    assert [nv.name for nv in handle.prunable(include=[f"{first}$"])] == [first]
    assert last not in [nv.name for nv in handle.prunable(exclude=[f"{last}$"])]
    assert handle.prunable(include=["no_such_variable"]) == []
    assert handle.params(include=[f"{first}$"])["prunable"] == handle.prunable(include=[f"{first}$"])[0].size


def test_call_predicts_digits(model_kind: str, handle: ModelHandle, digits_for: dict) -> None:
    x, y = _inputs(model_kind, digits_for, n=200)
    out = handle.call("serving_default", x)
    probs = out[_label_output(handle)].numpy()
    assert probs.shape == (200, 10)
    assert (probs.argmax(axis=1) == y).mean() > 0.7  # a briefly trained model, called through its signature


def test_gradients_flow_to_every_prunable_variable(
    model_kind: str, handle: ModelHandle, digits_for: dict
) -> None:
    x, y = _inputs(model_kind, digits_for)
    prunable = handle.prunable()
    assert prunable, "no prunable variable selected: the loop below would check nothing"
    with tf.GradientTape() as tape:
        out = handle.call("serving_default", x)[_label_output(handle)]
        loss = -tf.reduce_mean(tf.math.log(tf.gather(out, y, batch_dims=1) + 1e-7))
    grads = tape.gradient(loss, [nv.var for nv in prunable])
    for nv, grad in zip(prunable, grads, strict=True):
        assert grad is not None, nv.name
        assert float(tf.reduce_sum(tf.abs(grad))) > 0.0, nv.name


def test_save_round_trips_signatures_and_values(
    model_kind: str, model_dir: Path, tmp_path: Path, digits_for: dict
) -> None:
    handle = load_model(model_dir)
    target = handle.prunable()[0]
    target.var.assign(tf.zeros_like(target.var))
    x, _ = _inputs(model_kind, digits_for, n=16)
    before = handle.call("serving_default", x)

    saved = load_model(handle.save(tmp_path / "copy"))
    assert saved.signatures == handle.signatures
    assert [nv.name for nv in saved.variables()] == [nv.name for nv in handle.variables()]
    reloaded = {nv.name: nv.var.numpy() for nv in saved.variables()}
    assert np.count_nonzero(reloaded[target.name]) == 0
    after = saved.call("serving_default", x)
    for key, value in before.items():
        np.testing.assert_allclose(after[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
    assert audit_ops(saved) == []


def test_normal_models_pass_the_audit(handle: ModelHandle) -> None:
    assert audit_ops(handle) == []


@pytest.mark.parametrize("kind", mf.HOSTILE_KINDS)
def test_audit_flags_hostile_signatures(kind: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    model = mf.build_file_reading_module(tmp_path / "model", secret, kind)
    expected = {
        "read_file": ["ReadFile"],
        "read_file_in_cond": ["ReadFile"],
        "py_function": ["EagerPyFunc"],
        "print_to_file": ["PrintV2(output_stream=file)"],
    }[kind]
    assert audit_saved_model(model) == expected


def test_audit_reads_the_proto_without_loading(file_reading_dir: Path) -> None:
    handle = load_model(file_reading_dir)  # loading is harmless; calling the signature would read the file
    assert audit_ops(handle) == ["ReadFile"]


def test_lambda_layer_is_refused_by_safe_mode(lambda_keras_file: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as info:
        keras_to_saved_model(lambda_keras_file, tmp_path / "out")
    assert info.value.code == "unsafe_model"
    assert "Lambda" in info.value.message
    assert not (tmp_path / "out" / "saved_model.pb").exists()


def test_keras_conversion_rejects_other_files(tmp_path: Path) -> None:
    bogus = tmp_path / "model.keras"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(PipelineError) as info:
        keras_to_saved_model(bogus, tmp_path / "out")
    assert info.value.code == "model_load_failed"
    with pytest.raises(PipelineError, match=r"expected a \.keras file"):
        keras_to_saved_model(tmp_path / "model.h5", tmp_path / "out")


def test_load_model_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"no saved_model\.pb") as missing:
        load_model(tmp_path)
    assert missing.value.code == "model_load_failed"
    (tmp_path / "saved_model.pb").write_bytes(b"\x00garbage")
    with pytest.raises(PipelineError) as corrupt:
        load_model(tmp_path)
    assert corrupt.value.code == "model_load_failed"


def test_unknown_signature_lists_available(tf_module_dir: Path) -> None:
    handle = load_model(tf_module_dir)
    with pytest.raises(PipelineError) as info:
        handle.function("predict")
    assert info.value.code == "signature_not_found"
    assert "embed, serving_default" in info.value.message
    with pytest.raises(PipelineError) as wrong_inputs:
        handle.call("serving_default", {"image": np.zeros((1, 64), np.float32)})
    assert wrong_inputs.value.code == "input_mismatch"


def test_second_signature_is_callable(tf_module_dir: Path, digits_flat: tuple) -> None:
    handle = load_model(tf_module_dir)
    out = handle.call("embed", {"pixels": digits_flat[1]["x"][:5]})
    assert out["features"].shape == (5, 32)
    assert [nv.name for nv in handle.variables()] == ["hidden_w", "hidden_b", "out_w", "out_b"]


def test_keras2_training_mode_runs_dropout_and_batchnorm(keras2_dir: Path, digits_cnn: tuple) -> None:
    handle = load_model(keras2_dir)
    assert handle.training_mode_available and handle.supports_training("serving_default")
    x = {"image": digits_cnn[0]["x"][:32]}
    moving_mean = next(nv.var for nv in handle.variables() if nv.name == "batch_normalization/moving_mean")
    before = moving_mean.numpy().copy()
    first = handle.call("serving_default", x, training=True)["dense_1"].numpy()
    second = handle.call("serving_default", x, training=True)["dense_1"].numpy()
    assert not np.allclose(first, second)  # dropout is active
    assert not np.allclose(moving_mean.numpy(), before)  # BatchNorm statistics update
    inference = handle.call("serving_default", x)["dense_1"].numpy()
    np.testing.assert_allclose(inference, handle.call("serving_default", x)["dense_1"].numpy())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(handle.call("serving_default", x, training=True)["dense_1"] ** 2)
    grads = tape.gradient(loss, [nv.var for nv in handle.prunable()])
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_only_keras2_offers_training_mode(keras3_export_dir: Path, tf_module_dir: Path) -> None:
    for path, x in (
        (keras3_export_dir, {"image": np.zeros((1, 8, 8, 1))}),
        (tf_module_dir, {"pixels": np.zeros((1, 64))}),
    ):
        handle = load_model(path)
        assert not handle.training_mode_available
        assert not handle.supports_training("serving_default")
        with pytest.raises(ValueError, match="training-mode"):
            handle.call("serving_default", x, training=True)


def test_duplicate_variable_names_fall_back_to_object_paths() -> None:
    root = tf.Module()
    root.encoder = tf.Module()
    root.decoder = tf.Module()
    root.encoder.w = tf.Variable(tf.ones([2, 2]), name="w")
    root.decoder.w = tf.Variable(tf.ones([2, 2]), name="w")
    root.scale = tf.Variable(tf.ones([2]), name="scale")
    orphan_a = tf.Variable(tf.ones([1]))
    orphan_b = tf.Variable(tf.ones([1]))
    names = unique_names([root.encoder.w, root.decoder.w, root.scale, orphan_a, orphan_b], root)
    assert names == ["encoder/w", "decoder/w", "scale", "Variable_1", "Variable_2"]


# -- binding dataset arrays ----------------------------------------------------------------------------------

SINGLE = SignatureInfo(
    "serving_default",
    inputs={"image": {"shape": [None, 8, 8, 1], "dtype": "float32"}},
    outputs={"probs": {"shape": [None, 10], "dtype": "float32"}},
)
MULTI = SignatureInfo(
    "serving_default",
    inputs={
        "ids": {"shape": [None, 4], "dtype": "int32"},
        "mask": {"shape": [None, None], "dtype": "float32"},
    },
    outputs={
        "logits": {"shape": [None, 3], "dtype": "float32"},
        "probs": {"shape": [None, 3], "dtype": "float32"},
        "score": {"shape": [None], "dtype": "float32"},
    },
)


def test_bind_single_input_casts_and_accepts_either_name() -> None:
    x = np.zeros((5, 8, 8, 1), np.float64)
    bound = bind_inputs(SINGLE, {"x": x, "y": np.zeros(5)})
    assert list(bound) == ["image"] and bound["image"].dtype == np.float32
    assert bind_inputs(SINGLE, {"x.image": x})["image"].shape == (5, 8, 8, 1)


def test_bind_reports_expected_and_actual_shapes() -> None:
    with pytest.raises(PipelineError) as info:
        bind_inputs(SINGLE, {"x": np.zeros((5, 64), np.float32)})
    assert info.value.code == "dataset_mismatch"
    assert "[None, 8, 8, 1]" in info.value.message and "[5, 64]" in info.value.message


def test_bind_multi_input_needs_named_arrays() -> None:
    arrays = {"x.ids": np.ones((3, 4), np.int64), "x.mask": np.ones((3, 7), np.float32)}
    bound = bind_inputs(MULTI, arrays)
    assert bound["ids"].dtype == np.int32 and bound["mask"].shape == (3, 7)
    with pytest.raises(PipelineError, match=r"x\.mask"):
        bind_inputs(MULTI, {"x": np.ones((3, 4)), "x.ids": np.ones((3, 4))})
    with pytest.raises(PipelineError, match="name no input"):
        bind_inputs(MULTI, {**arrays, "x.idz": np.ones((3, 4))})
    with pytest.raises(PipelineError, match="different numbers of samples"):
        bind_inputs(MULTI, {"x.ids": np.ones((3, 4)), "x.mask": np.ones((2, 7))})


def test_select_output_rules() -> None:
    assert select_output(SINGLE, ["y"]) == "probs"
    assert select_output(MULTI, ["y"]) == "probs"  # PREFERRED_OUTPUTS order
    assert select_output(MULTI, ["y", "y.score"]) == "score"
    no_preferred = SignatureInfo(
        "s", inputs={}, outputs={"b": SINGLE.outputs["probs"], "a": SINGLE.outputs["probs"]}
    )
    assert select_output(no_preferred, ["y"]) == "a"
    with pytest.raises(PipelineError, match="name no output"):
        select_output(MULTI, ["y.nothing"])
    assert label_key("score", ["y", "y.score"]) == "y.score"
    assert label_key("probs", ["y"]) == "y"
    assert label_key("probs", ["x"]) is None


@pytest.mark.tf
def test_keras3_export_shadow_copies_are_pruned_too(tmp_path: Path, keras3_export_dir: Path) -> None:
    """Keras 3 exports store each weight twice; the saved artifact must not keep a dense duplicate."""
    import numpy as np
    import tensorflow as tf

    handle = load_model(keras3_export_dir)
    pairs = handle.shadow_copies()
    assert pairs, "Keras 3 export no longer duplicates variables: drop shadow_copies()"
    for nv in handle.prunable():
        nv.var.assign(tf.zeros_like(nv.var))
    out = handle.save(tmp_path / "saved")
    reader = tf.train.load_checkpoint(str(out / "variables" / "variables"))
    kernels = [k for k, shape in reader.get_variable_to_shape_map().items() if len(shape) >= 2]
    assert len(kernels) >= 2 * len(handle.prunable())  # both copies are in the checkpoint ...
    assert all(not np.any(reader.get_tensor(k)) for k in kernels)  # ... and both are pruned


def test_a_validated_model_is_handed_to_the_next_job_once(keras3_export_dir: Path, tmp_path: Path) -> None:
    from worker.models import keep_for_next_job, load_model, load_model_once

    validated = load_model(keras3_export_dir)
    keep_for_next_job(keras3_export_dir, validated)
    assert load_model_once(keras3_export_dir) is validated  # no second load
    assert load_model_once(keras3_export_dir) is not validated  # taken: a later job loads its own

    keep_for_next_job(keras3_export_dir, validated)
    other = tmp_path / "other"
    shutil.copytree(keras3_export_dir, other)
    assert load_model_once(other) is not validated  # another model: loaded, and the kept one dropped
    assert load_model_once(keras3_export_dir) is not validated
