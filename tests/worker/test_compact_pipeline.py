"""Compaction end to end through ``run_pipeline``: channel pruning returns a model whose removed channels are
gone (smaller variables, fewer parameters and bytes, same signatures) computing what the masked model computes.

Each case runs the same spec twice, ``compact: true`` and ``compact: false``, and compares the two artifacts
read back from disk on the same inputs.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from tests.support import model_zoo
from worker.models import describe, load_model
from worker.pipeline import run_pipeline
from worker.stages.job import Job

pytestmark = pytest.mark.tf

FAST_EVAL = {"latency": {"batch_sizes": [1], "runs": 1}}
Data = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def build_residual_bn(out_dir: Path, seed: int = 0) -> Path:
    """Conv-BN-ReLU stem, a residual block of two conv-BN (Add with the stem), a 1x1 conv, GAP, softmax head."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    x = keras.Input(shape=(8, 8, 3), name="x")
    stem = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(6, 3, padding="same")(stem)))
    h = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(h))
    h = layers.ReLU()(layers.Add()([stem, h]))
    h = layers.Conv2D(12, 1, activation="relu")(h)
    y = layers.Dense(4, activation="softmax")(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(x, y, name="residual_bn")
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # non-trivial BatchNorm statistics, so a wrong fold would show
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape).astype("float32"))
    return model_zoo._export_keras3(model, out_dir, seed)


def residual_data(seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    train = {"x": rng.standard_normal((64, 8, 8, 3)).astype("float32"), "y": np.arange(64) % 4}
    evaluation = {"x": rng.standard_normal((32, 8, 8, 3)).astype("float32"), "y": np.arange(32) % 4}
    return train, evaluation


def build_wide_mlp(out_dir: Path, seed: int = 0) -> Path:
    """Dense 32 -> 256 -> 128 -> 4: about 42k weights, so the SavedModel's bytes are mostly weights."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(32,), name="x"),
            layers.Dense(256, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(4, activation="softmax"),
        ]
    )
    return model_zoo._export_keras3(model, out_dir, seed)


def mlp_data(seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    train = {"x": rng.standard_normal((64, 32)).astype("float32"), "y": np.arange(64) % 4}
    evaluation = {"x": rng.standard_normal((32, 32)).astype("float32"), "y": np.arange(32) % 4}
    return train, evaluation


def build_mlp_with_dead_unit(out_dir: Path, seed: int = 0) -> Path:
    """The zoo's MLP with hidden unit 3 of the first Dense exactly zero (kernel column and bias)."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(16,), name="x"),
            layers.Dense(16, activation="relu"),
            layers.Dense(8, activation="relu"),
            layers.Dense(4, activation="softmax"),
        ]
    )
    model_zoo._randomize_zero_weights(list(model.trainable_weights), seed)
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    kernel.assign(kernel.numpy() * (np.arange(16) != 3))
    bias.assign(bias.numpy() * (np.arange(16) != 3))
    model.export(str(out_dir), verbose=False)
    return out_dir


def build_lstm_classifier(out_dir: Path, seed: int = 0) -> Path:
    """Embedding(20, 8) -> LSTM(12) -> Dense(4, softmax) over 6 tokens."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(6,), dtype="int32", name="x"),
            layers.Embedding(20, 8, name="embed"),
            layers.LSTM(12, name="lstm"),  # named: Keras numbers unnamed layers per process
            layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    return model_zoo._export_keras3(model, out_dir, seed)


def token_data(seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    train = {"x": rng.integers(0, 20, (64, 6)).astype("int32"), "y": np.arange(64) % 4}
    evaluation = {"x": rng.integers(0, 20, (32, 6)).astype("int32"), "y": np.arange(32) % 4}
    return train, evaluation


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compact_models")
    return {
        "residual": build_residual_bn(root / "residual"),
        "mlp": model_zoo.build("dense", root / "mlp"),
        "wide_mlp": build_wide_mlp(root / "wide_mlp"),
        "dead_unit": build_mlp_with_dead_unit(root / "dead_unit"),
        "lstm": build_lstm_classifier(root / "lstm"),
    }


def run(model: Path, spec: dict[str, Any], data: Data, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_pipeline(
        model,
        PruneSpec.model_validate({"evaluation": FAST_EVAL, **spec}),
        data[0],
        data[1],
        out,
        lambda s, p: None,
    )
    MetricsDocument.model_validate({"job_id": "job_test", "model_id": "mdl_test", **metrics})
    return metrics


def outputs(saved: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    handle = load_model(saved)
    return {k: v.numpy() for k, v in handle.call("serving_default", {"x": x}).items()}


def shapes(saved: Path) -> list[tuple[int, ...]]:
    return sorted(tuple(nv.shape) for nv in load_model(saved).variables())


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compare_compact_and_masked(
    model: Path, spec: dict[str, Any], data: Data, tmp_path: Path, weights_dominate: bool = False
) -> dict[str, Any]:
    """Run ``spec`` compacted and masked; assert what a compact artifact promises; return its metrics."""
    compact = run(model, {**spec, "compact": True}, data, tmp_path / "compact")
    masked = run(model, {**spec, "compact": False}, data, tmp_path / "masked")
    c_dir, m_dir = tmp_path / "compact" / "saved_model", tmp_path / "masked" / "saved_model"
    structure = compact["structure"]
    assert structure["compact"] is True, structure
    assert masked["structure"]["compact"] is False
    assert compact["spec"]["compact"] is True and masked["spec"]["compact"] is False

    # Same signatures as the input; masked keeps the input's shapes, compact has smaller ones.
    assert describe(load_model(c_dir))["signatures"] == describe(load_model(model))["signatures"]
    assert shapes(m_dir) == shapes(model)
    total = sum(math.prod(s) for s in shapes(c_dir))
    assert total == compact["pruned"]["params"]["total"] < compact["baseline"]["params"]["total"]
    assert masked["pruned"]["params"]["total"] == masked["baseline"]["params"]["total"]
    assert _bytes(c_dir / "variables") < _bytes(m_dir / "variables")
    if weights_dominate:  # a tiny model's bytes are mostly its graph, which the rewrite does not shrink
        assert compact["pruned"]["size_bytes"]["saved_model"] < masked["pruned"]["size_bytes"]["saved_model"]
        assert compact["pruned"]["size_bytes"]["saved_model"] == _bytes(c_dir)
    assert compact["pruned"]["macs"]["dense_macs"] < compact["baseline"]["macs"]["dense_macs"]
    assert masked["pruned"]["macs"]["dense_macs"] == masked["baseline"]["macs"]["dense_macs"]
    assert "compact" in compact["timings_s"]

    # The same masks either way, and the compact model computes what the masked one does.
    x = data[1]["x"]
    got, want = outputs(c_dir, x), outputs(m_dir, x)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)
        assert structure["max_abs_diff"][key] <= structure["tolerance"][key]
    assert {g["id"]: g.get("channels_after") for g in structure["groups"]} == {
        g["id"]: g.get("channels_after") for g in masked["structure"]["groups"]
    }

    # The layers show the new shapes.
    changed = [row for row in compact["layers"] if "shape_before" in row]
    assert changed
    for row in changed:
        assert math.prod(row["shape"]) == row["params"] < math.prod(row["shape_before"])
    return compact


def _outputs_in_fresh_process(saved: Path, x: np.ndarray, work: Path) -> dict[str, np.ndarray]:
    """The artifact loaded by a new interpreter (nothing of this process's TensorFlow state helps it)."""
    np.save(work / "x.npy", x)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "fn = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = fn(x=tf.constant(np.load(sys.argv[2])))\n"
        "np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(saved), str(work / "x.npy"), str(work / "y.npz")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    with np.load(work / "y.npz") as arrays:
        return {k: arrays[k] for k in arrays.files}


def test_channel_pruning_compacts_a_residual_bn_net(models: dict[str, Path], tmp_path: Path) -> None:
    data = residual_data()
    metrics = compare_compact_and_masked(
        models["residual"], {"target_sparsity": 0.5, "granularity": "channel"}, data, tmp_path
    )
    fresh = _outputs_in_fresh_process(tmp_path / "compact" / "saved_model", data[1]["x"], tmp_path)
    masked = outputs(tmp_path / "masked" / "saved_model", data[1]["x"])
    assert fresh.keys() == masked.keys()
    for key in masked:
        np.testing.assert_allclose(fresh[key], masked[key], rtol=0, atol=1e-5)
    pruned = [g for g in metrics["structure"]["groups"] if "channels_after" in g]
    assert any(g["channels_after"] < g["channels_before"] for g in pruned)
    left = [g for g in metrics["structure"]["groups"] if "reason" in g]
    assert left, "the head's group reaches the output and must be left whole"


def test_channel_pruning_compacts_an_mlp_in_global_lamp(models: dict[str, Path], tmp_path: Path) -> None:
    spec = {"target_sparsity": 0.5, "granularity": "channel", "scope": "global", "normalization": "lamp"}
    metrics = compare_compact_and_masked(
        models["wide_mlp"], spec, mlp_data(), tmp_path, weights_dominate=True
    )
    assert metrics["pruned"]["params"]["total"] < 0.6 * metrics["baseline"]["params"]["total"]


def test_channel_pruning_compacts_an_lstm_classifier(models: dict[str, Path], tmp_path: Path) -> None:
    """Embedding -> LSTM -> Dense: the LSTM's units (each unit's four gate columns of the kernel, recurrent
    kernel and bias, its recurrent kernel row, the head's row) are removed physically, half of them."""
    metrics = compare_compact_and_masked(
        models["lstm"], {"target_sparsity": 0.5, "granularity": "channel"}, token_data(), tmp_path
    )
    units = next(g for g in metrics["structure"]["groups"] if "recurrent_kernel" in g["id"])
    assert (units["channels_before"], units["channels_after"]) == (12, 6), units
    rows = {row["name"].split("/", 1)[1]: row["shape"] for row in metrics["layers"]}  # no model prefix
    assert rows["lstm/lstm_cell/kernel"] == [8, 24] and rows["lstm/lstm_cell/recurrent_kernel"] == [6, 24]
    assert sorted(rows.values()) == [[6, 4], [6, 24], [8, 24]], rows  # the head's rows too


def test_compact_defaults_follow_the_granularity() -> None:
    assert PruneSpec(target_sparsity=0.5, granularity="channel").compact is True
    assert PruneSpec(target_sparsity=0.5).compact is False
    assert PruneSpec(target_sparsity=0.5, granularity="channel", compact=False).compact is False


def test_unstructured_with_compact_removes_only_all_zero_channels(
    models: dict[str, Path], tmp_path: Path
) -> None:
    data = model_zoo.datasets("dense")
    metrics = run(models["dead_unit"], {"target_sparsity": 0.2, "compact": True}, data, tmp_path / "c")
    structure = metrics["structure"]
    assert structure["compact"] is True, structure
    saved = tmp_path / "c" / "saved_model"
    first = {tuple(s) for s in shapes(saved)}
    assert (16, 15) in first and (15, 8) in first and (15,) in first  # the dead unit, and nothing else
    masked = run(models["dead_unit"], {"target_sparsity": 0.2}, data, tmp_path / "m")
    assert "structure" not in masked  # compact false by default: the masks-only path as before
    got, want = outputs(saved, data[1]["x"]), outputs(tmp_path / "m" / "saved_model", data[1]["x"])
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-5)


def test_unstructured_with_nothing_to_remove_keeps_the_masked_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    metrics = run(
        models["mlp"], {"target_sparsity": 0.2, "compact": True}, model_zoo.datasets("dense"), tmp_path
    )
    structure = metrics["structure"]
    assert structure["compact"] is False
    assert any("nothing compacted" in note for note in structure["notes"])
    assert shapes(tmp_path / "saved_model") == shapes(models["mlp"])
    assert metrics["pruned"]["params"]["total"] == metrics["baseline"]["params"]["total"]


def test_a_rewrite_that_changes_the_outputs_never_ships(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (simulated) faulty rewrite writes the dense input instead of the compact model: the equivalence check
    against the masked model catches it and the artifact is the masked model."""
    import shutil
    from types import SimpleNamespace

    import worker.structure

    def wrong_compact(handle: Any, analysis: Any, keep: Any, out_dir: Path, **kw: Any) -> Any:
        shutil.copytree(models["wide_mlp"], out_dir)
        return SimpleNamespace(
            out_dir=out_dir, notes=[], channels={}, params_before=2, params_after=1, shapes={"x": ([2], [1])}
        )

    monkeypatch.setattr(worker.structure, "compact", wrong_compact)
    spec = {"target_sparsity": 0.5, "granularity": "channel"}
    metrics = run(models["wide_mlp"], spec, mlp_data(), tmp_path)
    structure = metrics["structure"]
    assert structure["compact"] is False
    assert any("equivalence check failed" in n for n in structure["notes"])
    assert structure["max_abs_diff"]["output_0"] > structure["tolerance"]["output_0"]
    saved = tmp_path / "saved_model"
    assert shapes(saved) == shapes(models["wide_mlp"])  # the masked model, zeros in place
    assert metrics["pruned"]["params"]["total"] == metrics["baseline"]["params"]["total"]
    kernels = [nv.var.numpy() for nv in load_model(saved).prunable()]
    assert any((k == 0).all(axis=0).any() for k in kernels)


def test_without_a_channel_analysis_channels_are_masked_per_variable(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(job: Any) -> tuple[None, str]:
        return None, "channel-group analysis failed (simulated)"

    monkeypatch.setattr(Job, "channel_groups", unavailable)  # for the pruner and the compaction alike
    metrics = run(
        models["wide_mlp"], {"target_sparsity": 0.5, "granularity": "channel"}, mlp_data(), tmp_path
    )
    assert metrics["structure"]["compact"] is False
    assert any("simulated" in n for n in metrics["structure"]["notes"])
    assert any("pruned per variable (masks only" in n for n in metrics["notes"])
    rows = {row["name"]: row for row in metrics["layers"]}
    assert any(
        "units of output" in (row.get("skipped") or "") for row in rows.values()
    )  # the head, as before
    assert shapes(tmp_path / "saved_model") == shapes(models["wide_mlp"])


def test_the_channel_analysis_is_read_once_per_job(models: dict[str, Path]) -> None:
    """A search prunes the job's one handle once per trial, each with its own spec: the groups (graph only)
    are read once, kept on the job (so they go with it), not in a module-wide cache."""
    handle = load_model(models["wide_mlp"])
    sig = handle.signature("serving_default")
    spec = PruneSpec(target_sparsity=0.5, granularity="channel")
    job = Job(spec, handle, sig, next(iter(sig.outputs)), train=None, evaluation=None)
    first, problem = job.channel_groups()
    assert problem is None and first is not None
    job.spec = spec.model_copy(update={"target_sparsity": 0.8})  # the next trial
    again, _ = job.channel_groups()
    assert again is first and job.analyses == {"serving_default": first}
