"""Training-batch augmentation from the spec's ``augmentation`` list, with Keras 3 preprocessing layers.

One table maps each ``kind`` to its layer and the argument names it accepts; the app's pydantic model
(app/schemas/spec.py) offers the same kinds and arguments (a test pins both sides). The app validates first;
``build_augmenter`` is the worker's guard and raises ``ValueError`` naming an unknown kind or argument.

Layers run in training mode, seeded (item i gets ``seed + i``), on every rank-4 floating input of a batch
(images, NHWC) inside a ``tf.data`` map; other inputs pass through. ``random_crop`` crops to
``(height, width)`` and is then resized back to the input's size (bilinear), so a 28x28 model trains on random
24x24 crops scaled back to 28x28 without any change to the model. Build a new augmenter per epoch with a seed
derived from ``(seed, epoch)`` for reproducible epochs (a layer's random state advances as it is used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# kind -> (keras.layers class name, accepted argument names, required argument names)
AUGMENTATIONS: dict[str, tuple[str, frozenset[str], frozenset[str]]] = {
    "random_flip": ("RandomFlip", frozenset({"mode"}), frozenset()),
    "random_crop": ("RandomCrop", frozenset({"height", "width"}), frozenset({"height", "width"})),
    "random_rotation": ("RandomRotation", frozenset({"factor"}), frozenset({"factor"})),
    "random_zoom": ("RandomZoom", frozenset({"height_factor", "width_factor"}), frozenset({"height_factor"})),
    "random_translation": (
        "RandomTranslation",
        frozenset({"height_factor", "width_factor"}),
        frozenset({"height_factor", "width_factor"}),
    ),
    "random_contrast": ("RandomContrast", frozenset({"factor"}), frozenset({"factor"})),
}


def check_items(items: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first unknown kind, unknown argument or missing argument."""
    for position, item in enumerate(items):
        kind = item.get("kind")
        if kind not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation[{position}]: unknown kind {kind!r}; known: {sorted(AUGMENTATIONS)}"
            )
        _, allowed, required = AUGMENTATIONS[kind]
        args = set(item) - {"kind"}
        unknown = sorted(args - allowed)
        if unknown:
            raise ValueError(
                f"augmentation[{position}] {kind}: unknown argument(s) {unknown}; allowed: {sorted(allowed)}"
            )
        missing = sorted(required - args)
        if missing:
            raise ValueError(f"augmentation[{position}] {kind}: missing argument(s) {missing}")


def build_augmenter(items: list[dict[str, Any]], seed: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function ``x -> x`` (dict of batched tensors) applying the items in order to image-shaped inputs."""
    check_items(items)
    import keras
    import tensorflow as tf

    layers = []
    for position, item in enumerate(items):
        class_name, _, _ = AUGMENTATIONS[item["kind"]]
        args = {k: v for k, v in item.items() if k != "kind"}
        layers.append((item["kind"], getattr(keras.layers, class_name)(**args, seed=seed + position)))

    def augment(x: dict[str, Any]) -> dict[str, Any]:
        out = dict(x)
        for name, value in x.items():
            if value.shape.rank != 4 or not value.dtype.is_floating:
                continue
            result = value
            for kind, layer in layers:
                if kind == "random_crop":
                    if value.shape[1] is None or value.shape[2] is None:
                        raise ValueError(
                            f"random_crop needs a static image size for input {name!r}: stream with the model's "
                            "input_specs (images are then resized to the model's height and width)"
                        )
                    result = tf.image.resize(layer(result, training=True), value.shape[1:3])
                else:
                    result = layer(result, training=True)
            out[name] = tf.ensure_shape(tf.cast(result, value.dtype), value.shape)
        return out

    return augment
