"""Builders of small real models for the structure tests (each exports a SavedModel directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _export(model: Any, out_dir: Path) -> Path:
    model.export(str(out_dir), verbose=False)
    return out_dir


def keras3_mlp(out_dir: Path) -> Path:
    """Dense 20 -> 16 relu -> 12 sigmoid -> 5: a sigmoid leaves 0.5 behind in a removed unit."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((20,), name="features")
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inp)
    x = keras.layers.Dense(12, activation="sigmoid", name="gate")(x)
    out = keras.layers.Dense(5, name="logits")(x)
    return _export(keras.Model(inp, out), out_dir)


def _conv_bn(x: Any, filters: int, kernel: int, name: str, bias: bool = False, strides: int = 1) -> Any:
    import keras

    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=bias, name=name)(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def keras3_resnet(out_dir: Path) -> Path:
    """Stem conv+BN, one identity residual block (Add), a 1x1 strided projection, GAP, Dense."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="image")
    x = keras.layers.ReLU()(_conv_bn(inp, 8, 3, "stem"))
    y = keras.layers.ReLU()(_conv_bn(x, 6, 3, "block_a", bias=True))
    y = _conv_bn(y, 8, 3, "block_b")
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.ReLU()(_conv_bn(x, 10, 1, "proj", strides=2))
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4, activation="softmax", name="head")(x)
    return _export(keras.Model(inp, out), out_dir)
