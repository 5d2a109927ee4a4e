"""Tiny SavedModels of every layer kind the pruning engine must handle, with matching random datasets.

``tests/support/model_factory.py`` builds *trained* digits models (the service's realistic inputs); this zoo
builds *untrained* ones, a few kernels each, so that every kernel layout the engine knows (conv 1D/2D/3D,
depthwise, separable, dense, recurrent, embedding, BatchNorm, multi-input/multi-output, subclassed, Keras 2) goes
through the whole pipeline in seconds. Random weights are enough: the tests check where zeros land, not accuracy.

Why biases are randomised: Keras initialises biases (and BatchNorm beta) to zero, so a test asserting "the bias
of a removed channel is zero" would pass without the engine doing anything. ``_randomize_zero_weights`` gives
every all-zero trainable variable small random values before export.

Datasets follow API.md: ``x`` for a single input or ``x.<input name>`` per input; ``y`` (or ``y.<output>``)
labels. Input names are fixed (``Input(name=...)``) so the signature's names are known.

Every builder takes ``(out_dir, seed)`` and returns ``out_dir``; ``build(kind, out_dir)`` dispatches and
``datasets(kind)`` returns ``(train, eval)``. TensorFlow and Keras are imported inside the builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.model_cache import cached_builder

__all__ = ["KINDS", "ZOO", "ZooKind", "build", "datasets"]

CLASSES = 4  # outputs of every single-output zoo model (multi_io: 3 classes + 1 regression target)
VOCAB = 40  # embedding vocabulary
N_TRAIN, N_EVAL = 64, 32


@dataclass(frozen=True)
class ZooKind:
    """One model kind: its builder, its inputs (name -> per-sample shape, dtype) and label arrays."""

    build: Callable[[Path, int], Path]
    inputs: dict[str, tuple[tuple[int, ...], str]]
    labels: dict[str, int]  # label array key -> classes (0 = regression target)
    note: str = ""


def _keras() -> Any:
    import keras

    return keras


def _randomize_zero_weights(weights: list[Any], seed: int) -> None:
    """Every trainable all-zero variable (biases, BatchNorm beta) gets N(0, 0.1) values (see module doc)."""
    rng = np.random.default_rng(seed + 1000)
    for w in weights:
        value = np.asarray(w.numpy())
        if value.size and not value.any():
            w.assign((0.1 * rng.standard_normal(value.shape)).astype(value.dtype))


def _export_keras3(model: Any, out_dir: Path, seed: int) -> Path:
    _randomize_zero_weights(list(model.trainable_weights), seed)
    model.export(str(out_dir), verbose=False)
    return out_dir


def _sequential(out_dir: Path, seed: int, name: str, shape: tuple[int, ...], body: list[Any]) -> Path:
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape=shape, name="x"), *body, keras.layers.Dense(CLASSES, activation="softmax")],
        name=name,
    )
    return _export_keras3(model, out_dir, seed)


def build_conv1d(out_dir: Path, seed: int = 0) -> Path:
    """Conv1D [3, 4, 8] -> GAP -> Dense."""
    layers = _keras().layers
    body = [layers.Conv1D(8, 3, activation="relu"), layers.GlobalAveragePooling1D()]
    return _sequential(out_dir, seed, "conv1d_model", (12, 4), body)


def build_conv2d(out_dir: Path, seed: int = 0) -> Path:
    """Conv2D [3, 3, 4, 8] -> Conv2D [3, 3, 8, 8] -> Flatten -> Dense."""
    layers = _keras().layers
    body = [
        layers.Conv2D(8, 3, activation="relu"),
        layers.Conv2D(8, 3, activation="relu"),
        layers.Flatten(),
    ]
    return _sequential(out_dir, seed, "conv2d_model", (8, 8, 4), body)


def build_conv3d(out_dir: Path, seed: int = 0) -> Path:
    """Conv3D [2, 2, 2, 4, 8] -> Flatten -> Dense."""
    layers = _keras().layers
    body = [layers.Conv3D(8, 2, activation="relu"), layers.Flatten()]
    return _sequential(out_dir, seed, "conv3d_model", (4, 4, 4, 4), body)


def build_depthwise(out_dir: Path, seed: int = 0) -> Path:
    """DepthwiseConv2D [3, 3, 4, 2] (8 output channels) -> 1x1 Conv2D -> GAP -> Dense."""
    layers = _keras().layers
    body = [
        layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu"),
        layers.Conv2D(8, 1, activation="relu"),
        layers.GlobalAveragePooling2D(),
    ]
    return _sequential(out_dir, seed, "depthwise_model", (8, 8, 4), body)


def build_separable(out_dir: Path, seed: int = 0) -> Path:
    """SeparableConv2D: depthwise [3, 3, 4, 1] + pointwise [1, 1, 4, 8] sharing one bias -> GAP -> Dense."""
    layers = _keras().layers
    body = [layers.SeparableConv2D(8, 3, activation="relu"), layers.GlobalAveragePooling2D()]
    return _sequential(out_dir, seed, "separable_model", (8, 8, 4), body)


def build_dense(out_dir: Path, seed: int = 0) -> Path:
    """Dense [16, 16] -> Dense [16, 8] -> Dense head."""
    layers = _keras().layers
    body = [layers.Dense(16, activation="relu"), layers.Dense(8, activation="relu")]
    return _sequential(out_dir, seed, "dense_model", (16,), body)


def build_lstm(out_dir: Path, seed: int = 0) -> Path:
    """LSTM: kernel [4, 32] and recurrent_kernel [8, 32] -> Dense."""
    return _sequential(out_dir, seed, "lstm_model", (6, 4), [_keras().layers.LSTM(8)])


def build_gru(out_dir: Path, seed: int = 0) -> Path:
    """GRU: kernel [4, 24], recurrent_kernel [8, 24], bias [2, 24] -> Dense."""
    return _sequential(out_dir, seed, "gru_model", (6, 4), [_keras().layers.GRU(8)])


def build_embedding(out_dir: Path, seed: int = 0) -> Path:
    """Embedding [40, 8] over int32 token ids -> GAP -> Dense [8, 8] -> Dense head."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(6,), dtype="int32", name="x"),
            layers.Embedding(VOCAB, 8),
            layers.GlobalAveragePooling1D(),
            layers.Dense(8, activation="relu"),
            layers.Dense(CLASSES, activation="softmax"),
        ],
        name="embedding_model",
    )
    return _export_keras3(model, out_dir, seed)


def build_batchnorm(out_dir: Path, seed: int = 0) -> Path:
    """Conv2D -> BatchNormalization -> ReLU -> Dense [128, 8] -> BatchNormalization -> Dense head."""
    layers = _keras().layers
    body = [
        layers.Conv2D(8, 3, use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Flatten(),
        layers.Dense(8),
        layers.BatchNormalization(),
        layers.ReLU(),
    ]
    return _sequential(out_dir, seed, "batchnorm_model", (6, 6, 2), body)


def build_multi_io(out_dir: Path, seed: int = 0) -> Path:
    """Functional model: inputs ``a`` [8] and ``b`` [6, 6, 1]; outputs ``cls`` (3-class softmax) and ``reg``.

    Two branches (Dense on ``a``, Conv2D on ``b``) meet in a shared Dense trunk feeding two heads, so a
    variable can be upstream of one output only (the other head) or of both (the trunk).
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    a = keras.Input(shape=(8,), name="a")
    b = keras.Input(shape=(6, 6, 1), name="b")
    ha = layers.Dense(8, activation="relu", name="branch_a")(a)
    hb = layers.Conv2D(4, 3, activation="relu", name="branch_b")(b)
    hb = layers.GlobalAveragePooling2D()(hb)
    trunk = layers.Dense(8, activation="relu", name="trunk")(layers.Concatenate()([ha, hb]))
    cls = layers.Dense(3, activation="softmax", name="cls")(trunk)
    reg = layers.Dense(1, name="reg")(trunk)
    model = keras.Model({"a": a, "b": b}, {"cls": cls, "reg": reg}, name="multi_io")
    return _export_keras3(model, out_dir, seed)


def _subclassed_class(keras: Any) -> Any:
    class Tower(keras.Model):
        """Layers created in a different order than they are called (head first), as subclasses often are."""

        def __init__(self) -> None:
            super().__init__(name="tower")
            self.head = keras.layers.Dense(CLASSES, activation="softmax", name="head")
            self.conv = keras.layers.Conv2D(8, 3, activation="relu", name="conv")
            self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
            self.flatten = keras.layers.Flatten()

        def call(self, inputs: Any) -> Any:
            return self.head(self.hidden(self.flatten(self.conv(inputs))))

    return Tower


def build_subclassed(out_dir: Path, seed: int = 0) -> Path:
    """A subclassed ``keras.Model`` (head created before the body) exported with ``model.export``."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = _subclassed_class(keras)()
    model(np.zeros((1, 6, 6, 2), np.float32))  # build the variables
    return _export_keras3(model, out_dir, seed)


def build_keras2_conv(out_dir: Path, seed: int = 0) -> Path:
    """tf_keras (Keras 2) Conv2D + DepthwiseConv2D + Dense, ``model.save(dir)`` (trainable ``__call__``)."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    layers = tf_keras.layers
    model = tf_keras.Sequential(
        [
            layers.Input(shape=(8, 8, 4), name="x"),
            layers.Conv2D(8, 3, activation="relu"),
            layers.DepthwiseConv2D(3, depth_multiplier=1, activation="relu"),
            layers.Flatten(),
            layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    _randomize_zero_weights(list(model.trainable_weights), seed)
    model.save(str(out_dir))
    return out_dir


ZOO: dict[str, ZooKind] = {
    "conv1d": ZooKind(build_conv1d, {"x": ((12, 4), "float32")}, {"y": CLASSES}),
    "conv2d": ZooKind(build_conv2d, {"x": ((8, 8, 4), "float32")}, {"y": CLASSES}),
    "conv3d": ZooKind(build_conv3d, {"x": ((4, 4, 4, 4), "float32")}, {"y": CLASSES}),
    "depthwise": ZooKind(build_depthwise, {"x": ((8, 8, 4), "float32")}, {"y": CLASSES}),
    "separable": ZooKind(build_separable, {"x": ((8, 8, 4), "float32")}, {"y": CLASSES}),
    "dense": ZooKind(build_dense, {"x": ((16,), "float32")}, {"y": CLASSES}),
    "lstm": ZooKind(build_lstm, {"x": ((6, 4), "float32")}, {"y": CLASSES}),
    "gru": ZooKind(build_gru, {"x": ((6, 4), "float32")}, {"y": CLASSES}),
    "embedding": ZooKind(build_embedding, {"x": ((6,), "int32")}, {"y": CLASSES}),
    "batchnorm": ZooKind(build_batchnorm, {"x": ((6, 6, 2), "float32")}, {"y": CLASSES}),
    "multi_io": ZooKind(
        build_multi_io,
        {"a": ((8,), "float32"), "b": ((6, 6, 1), "float32")},
        {"y.cls": 3, "y.reg": 0},
    ),
    "subclassed": ZooKind(build_subclassed, {"x": ((6, 6, 2), "float32")}, {"y": CLASSES}),
    "keras2_conv": ZooKind(build_keras2_conv, {"x": ((8, 8, 4), "float32")}, {"y": CLASSES}),
}
KINDS: tuple[str, ...] = tuple(ZOO)


def build(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the SavedModel of ``kind`` in ``out_dir`` (see ``ZOO``); cached on disk when the test cache is on."""
    return _build(out_dir, kind, seed)


@cached_builder
def _build(out_dir: Path, kind: str, seed: int) -> Path:
    return ZOO[kind].build(out_dir, seed)


def _arrays(kind: ZooKind, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    single = len(kind.inputs) == 1
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in kind.inputs.items():
        key = "x" if single else f"x.{name}"
        if dtype.startswith("int"):
            out[key] = rng.integers(0, VOCAB, size=(n, *shape)).astype(dtype)
        else:
            out[key] = rng.standard_normal((n, *shape)).astype(dtype)
    for key, classes in kind.labels.items():
        if classes:
            out[key] = np.arange(n, dtype=np.int64) % classes  # every class present, in any split
        else:
            out[key] = rng.standard_normal((n, 1)).astype(np.float32)
    return out


def datasets(kind: str, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(train, eval)`` random arrays fitting ``kind``'s signature (``N_TRAIN`` / ``N_EVAL`` samples)."""
    rng = np.random.default_rng(seed)
    zoo = ZOO[kind]
    return _arrays(zoo, N_TRAIN, rng), _arrays(zoo, N_EVAL, rng)
