"""Tiny real models and datasets for tests: every kind of input the worker must accept.

All models are trained for a few seconds on scikit-learn's ``load_digits`` (8x8 grey images, 10 classes,
bundled with scikit-learn, so no network). TensorFlow, Keras and tf_keras are imported inside the builders so
that importing this module (e.g. from app tests) costs nothing.

Kinds:
- ``build_keras2_saved_model``: tf_keras (Keras 2) CNN, ``model.save(dir)`` -> SavedModel with a trainable
  ``__call__`` (training=True works after loading).
- ``build_keras3_export``: Keras 3 CNN, ``model.export(dir)`` -> inference-only SavedModel.
- ``build_tf_module``: plain ``tf.Module`` MLP whose signatures take and return DICTS (two signatures).
- ``build_keras3_file``: Keras 3 CNN saved as a ``.keras`` file.
Hostile inputs: ``build_keras_lambda_file`` (refused by safe_mode) and ``build_file_reading_module`` (a
signature that reads a file, runs Python or prints to a file).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.model_cache import cached_builder

N_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.25
MODULE_INPUT = "pixels"


def digits_datasets(
    seed: int = SPLIT_SEED, flat: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Digits as ``({"x", "y"}, {"x", "y"})``: stratified 75/25 split by ``seed`` (0 = the fixed split).

    ``x`` is float32 scaled to [0, 1], shape ``[n, 8, 8, 1]`` (CNNs) or ``[n, 64]`` with ``flat=True``;
    ``y`` is int64 class ids. 1347 train / 450 test samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x = x if flat else x.reshape(-1, 8, 8, 1)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    return {"x": x_tr, "y": y_tr}, {"x": x_te, "y": y_te}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays the way a client uploads a dataset (``x``/``y`` or ``x.<input name>``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def _seed_all(seed: int) -> None:
    import tensorflow as tf

    np.random.seed(seed)
    tf.random.set_seed(seed)


@cached_builder
def build_keras2_saved_model(out_dir: Path, epochs: int = 3, seed: int = 0) -> Path:
    """tf_keras CNN (Conv2D + BatchNorm + Dropout + Dense, softmax) saved with ``model.save(dir)``."""
    import tf_keras

    _seed_all(seed)
    tf_keras.utils.set_random_seed(seed)
    layers = tf_keras.layers
    model = tf_keras.Sequential(
        [
            layers.Input(shape=(8, 8, 1), name="image"),
            layers.Conv2D(8, 3, padding="same", name="conv2d"),
            layers.BatchNormalization(name="batch_normalization"),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dropout(0.1),
            layers.Dense(32, activation="relu", name="dense"),
            layers.Dense(N_CLASSES, activation="softmax", name="dense_1"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train, _ = digits_datasets()
    model.fit(train["x"], train["y"], epochs=epochs, batch_size=32, verbose=0)
    model.save(str(out_dir))
    return out_dir


def _keras3_cnn(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), name="image"),
            layers.Conv2D(8, 3, padding="same", name="conv2d"),
            layers.BatchNormalization(name="batch_normalization"),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(32, activation="relu", name="dense"),
            layers.Dense(N_CLASSES, activation="softmax", name="dense_1"),
        ],
        name="digits_cnn",
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@cached_builder
def build_keras3_export(out_dir: Path, epochs: int = 3, seed: int = 0) -> Path:
    """Keras 3 CNN exported with ``model.export(dir)`` (inference-only ``serve`` / ``serving_default``)."""
    _seed_all(seed)
    model = _keras3_cnn(seed)
    train, _ = digits_datasets()
    model.fit(train["x"], train["y"], epochs=epochs, batch_size=32, verbose=0)
    model.export(str(out_dir), verbose=False)
    return out_dir


@cached_builder
def build_keras3_file(path: Path, epochs: int = 3, seed: int = 0) -> Path:
    """Keras 3 CNN saved as a ``.keras`` file (the worker converts it to a SavedModel)."""
    _seed_all(seed)
    model = _keras3_cnn(seed)
    train, _ = digits_datasets()
    model.fit(train["x"], train["y"], epochs=epochs, batch_size=32, verbose=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def build_keras_lambda_file(path: Path) -> Path:
    """A ``.keras`` file with a Lambda layer: arbitrary Python that ``safe_mode=True`` must refuse to load."""
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=(64,)),
            keras.layers.Lambda(lambda t: t * 2.0),
            keras.layers.Dense(N_CLASSES),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def _digits_module(tf: Any, seed: int, hidden: int) -> Any:
    class DigitsMLP(tf.Module):
        """Plain tf.Module: variables created by hand, no Keras anywhere."""

        def __init__(self) -> None:
            super().__init__(name="digits_mlp")
            init = tf.random.stateless_normal
            self.hidden_w = tf.Variable(init([64, hidden], seed=[seed, 1]) * 0.1, name="hidden_w")
            self.hidden_b = tf.Variable(tf.zeros([hidden]), name="hidden_b")
            self.out_w = tf.Variable(init([hidden, N_CLASSES], seed=[seed, 2]) * 0.1, name="out_w")
            self.out_b = tf.Variable(tf.zeros([N_CLASSES]), name="out_b")

        def features(self, pixels: Any) -> Any:
            return tf.nn.relu(tf.matmul(pixels, self.hidden_w) + self.hidden_b)

        def logits(self, pixels: Any) -> Any:
            return tf.matmul(self.features(pixels), self.out_w) + self.out_b

    return DigitsMLP()


@cached_builder
def build_tf_module(out_dir: Path, steps: int = 300, seed: int = 0, hidden: int = 32) -> Path:
    """Plain ``tf.Module`` MLP with dict-in/dict-out signatures.

    ``serving_default``: ``{"pixels": [None, 64]}`` -> ``{"logits", "probs"}``;
    ``embed``: ``{"pixels": [None, 64]}`` -> ``{"features"}``.
    """
    import tensorflow as tf

    _seed_all(seed)
    module = _digits_module(tf, seed, hidden)
    train, _ = digits_datasets(flat=True)
    x, y = tf.constant(train["x"]), tf.constant(train["y"])
    opt = tf.optimizers.Adam(0.01)
    variables = [module.hidden_w, module.hidden_b, module.out_w, module.out_b]
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=module.logits(x))
            )
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    spec = tf.TensorSpec([None, 64], tf.float32, name=MODULE_INPUT)

    @tf.function(input_signature=[spec])
    def serve(pixels: Any) -> dict[str, Any]:
        logits = module.logits(pixels)
        return {"logits": logits, "probs": tf.nn.softmax(logits)}

    @tf.function(input_signature=[spec])
    def embed(pixels: Any) -> dict[str, Any]:
        return {"features": module.features(pixels)}

    module.serve = serve
    module.embed = embed
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": serve, "embed": embed})
    return out_dir


HOSTILE_KINDS = ("read_file", "read_file_in_cond", "py_function", "print_to_file")


def build_file_reading_module(out_dir: Path, secret: Path, kind: str = "read_file") -> Path:
    """A module whose serving signature does something the op audit must flag.

    ``read_file``: ``tf.io.read_file(secret)`` (ReadFile); ``read_file_in_cond``: the same inside a
    ``tf.cond`` branch (found only by following If branches); ``py_function``: runs Python (EagerPyFunc;
    saves, never loads elsewhere); ``print_to_file``: ``tf.print`` to ``file://secret`` (PrintV2 with a file
    stream).
    """
    import tensorflow as tf

    if kind not in HOSTILE_KINDS:
        raise ValueError(f"kind must be one of {HOSTILE_KINDS}")

    def side_effect(pixels: Any) -> Any:
        if kind == "read_file":
            return tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)
        if kind == "read_file_in_cond":
            return tf.cond(
                tf.reduce_sum(pixels) > 1e9,
                lambda: tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32),
                lambda: tf.constant(0.0),
            )
        if kind == "py_function":
            return tf.reshape(tf.py_function(lambda: 0.0, [], tf.float32), [])
        tf.print("leak", output_stream=f"file://{secret}")
        return tf.constant(0.0)

    class Leaky(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.ones([64, N_CLASSES]), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32, name=MODULE_INPUT)])
        def serve(self, pixels: Any) -> dict[str, Any]:
            return {"logits": tf.matmul(pixels, self.w) + side_effect(pixels) * 0.0}

    module = Leaky()
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.serve})
    return out_dir


def _members(src_dir: Path, top: str | None) -> list[tuple[Path, str]]:
    prefix = f"{top}/" if top else ""
    return [
        (p, prefix + p.relative_to(src_dir).as_posix()) for p in sorted(src_dir.rglob("*")) if p.is_file()
    ]


def zip_saved_model(src_dir: Path, out_zip: Path, top: str | None = None) -> Path:
    """Zip a SavedModel dir with ``saved_model.pb`` at the archive root, or inside folder ``top``."""
    with zipfile.ZipFile(out_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, arcname in _members(src_dir, top):
            zf.write(path, arcname)
    return out_zip


def tar_saved_model(src_dir: Path, out_tar: Path, top: str | None = None) -> Path:
    """``.tar.gz`` of a SavedModel dir with ``saved_model.pb`` at the root, or inside folder ``top``."""
    with tarfile.open(out_tar, "w:gz") as tf_:
        for path, arcname in _members(src_dir, top):
            tf_.add(path, arcname, recursive=False)
    return out_tar


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an ``.npz`` (for uploading from memory in API tests)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_demo(out_dir: Path) -> dict[str, Path]:
    """The README's worked example: a digits CNN SavedModel zip plus train/test datasets."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = build_keras3_export(out_dir / "saved_model", epochs=10)
    train, test = digits_datasets()
    return {
        "model.zip": zip_saved_model(saved, out_dir / "model.zip", top="digits_cnn"),
        "train.npz": write_npz(out_dir / "train.npz", train),
        "test.npz": write_npz(out_dir / "test.npz", test),
    }


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "demo":
        sys.exit("usage: python -m tests.support.model_factory demo OUT_DIR")
    for name, path in write_demo(Path(sys.argv[2])).items():
        print(f"{name}: {path}")
