"""Augmentation table and augmenter: seeded Keras layers on image inputs, shapes kept, bad items named."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from worker.data.augment import AUGMENTATIONS, build_augmenter

pytestmark = pytest.mark.tf

ITEMS = [
    {"kind": "random_flip", "mode": "horizontal_and_vertical"},
    {"kind": "random_crop", "height": 6, "width": 6},
    {"kind": "random_rotation", "factor": 0.1},
    {"kind": "random_zoom", "height_factor": 0.2, "width_factor": 0.2},
    {"kind": "random_translation", "height_factor": 0.1, "width_factor": 0.1},
    {"kind": "random_contrast", "factor": 0.3},
]


def _batch() -> dict[str, tf.Tensor]:
    images = np.random.default_rng(1).uniform(0, 255, size=(4, 8, 8, 3)).astype(np.float32)
    return {"image": tf.constant(images), "meta": tf.constant(np.arange(8, dtype=np.float32).reshape(4, 2))}


def test_every_kind_runs_in_tf_data_and_keeps_shapes() -> None:
    assert {item["kind"] for item in ITEMS} == set(AUGMENTATIONS)
    augment = build_augmenter(ITEMS, seed=0)
    batch = _batch()
    ds = tf.data.Dataset.from_tensors(batch).repeat(2).map(augment)
    outs = list(ds.as_numpy_iterator())
    for out in outs:
        assert out["image"].shape == (4, 8, 8, 3) and out["image"].dtype == np.float32
        np.testing.assert_array_equal(out["meta"], batch["meta"].numpy())  # rank-2 input untouched
        assert not np.allclose(out["image"], batch["image"].numpy())
    assert not np.allclose(outs[0]["image"], outs[1]["image"])  # each batch draws anew


def test_same_seed_same_augmentation() -> None:
    batch = _batch()
    a = build_augmenter(ITEMS[:3], seed=5)(batch)["image"].numpy()
    b = build_augmenter(ITEMS[:3], seed=5)(batch)["image"].numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("items", "named"),
    [
        ([{"kind": "random_blur"}], "random_blur"),
        ([{"kind": "random_flip", "factor": 0.2}], "factor"),
        ([{"kind": "random_crop", "height": 4}], "width"),
    ],
)
def test_unknown_kind_or_argument_is_named(items: list[dict], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_augmenter(items, seed=0)
