"""Trained conv + BatchNorm digits models for the channel-repair tests (cached across runs like the others).

Three conv-BN-ReLU blocks (16, 32, 32 channels, a max-pool between the second and third), global average
pooling and a softmax head, trained on scikit-learn's digits (test accuracy about 0.99). Channel pruning
removes output channels of the first two convs and the input rows of the next conv: what the repair refits.
The Keras 3 export lowers BatchNorm to ``Rsqrt``/``Mul``/``Sub``/``AddV2``; the tf_keras SavedModel keeps
``FusedBatchNormV3``: both forms of the BatchNorm re-estimation.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.model_cache import cached_builder
from tests.support.model_factory import digits_datasets


def _blocks(layers: object) -> list[object]:
    return [
        layers.Conv2D(16, 3, padding="same"),  # type: ignore[attr-defined]
        layers.BatchNormalization(),  # type: ignore[attr-defined]
        layers.ReLU(),  # type: ignore[attr-defined]
        layers.Conv2D(32, 3, padding="same"),  # type: ignore[attr-defined]
        layers.BatchNormalization(),  # type: ignore[attr-defined]
        layers.ReLU(),  # type: ignore[attr-defined]
        layers.MaxPooling2D(),  # type: ignore[attr-defined]
        layers.Conv2D(32, 3, padding="same"),  # type: ignore[attr-defined]
        layers.BatchNormalization(),  # type: ignore[attr-defined]
        layers.ReLU(),  # type: ignore[attr-defined]
        layers.GlobalAveragePooling2D(),  # type: ignore[attr-defined]
        layers.Dense(10, activation="softmax"),  # type: ignore[attr-defined]
    ]


@cached_builder
def keras3_conv_bn(out_dir: Path, epochs: int = 15, seed: int = 0) -> Path:
    """Keras 3, ``model.export``: BatchNorm lowered to arithmetic on its moving statistics."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 1), name="image"), *_blocks(keras.layers)])
    model.compile("adam", "sparse_categorical_crossentropy")
    train, _ = digits_datasets()
    model.fit(train["x"], train["y"], epochs=epochs, batch_size=32, verbose=0)
    model.export(str(out_dir), verbose=False)
    return out_dir


@cached_builder
def keras2_conv_bn(out_dir: Path, epochs: int = 15, seed: int = 0) -> Path:
    """tf_keras, ``model.save``: ``FusedBatchNormV3`` in inference mode."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential([tf_keras.layers.Input((8, 8, 1), name="image"), *_blocks(tf_keras.layers)])
    model.compile("adam", "sparse_categorical_crossentropy")
    train, _ = digits_datasets()
    model.fit(train["x"], train["y"], epochs=epochs, batch_size=32, verbose=0)
    model.save(str(out_dir))
    return out_dir


@cached_builder
def keras3_depthwise_chain(out_dir: Path, seed: int = 0) -> Path:
    """Untrained: Conv2D 8 -> DepthwiseConv2D 3x3 (tied to those 8 channels) -> 1x1 Conv2D 8 -> GAP -> Dense.
    A removed channel of the first conv zeroes a depthwise channel (not refit: it has one input per output)
    and the 1x1 conv's input row (refit)."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3), name="x"),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.DepthwiseConv2D(3, padding="same", activation="relu"),
            layers.Conv2D(8, 1, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4, activation="softmax"),
        ]
    )
    model.export(str(out_dir), verbose=False)
    return out_dir
