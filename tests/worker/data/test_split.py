"""Record-hash buckets (TensorFlow == NumPy), keep predicates and K folds."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from worker.data import split

pytestmark = pytest.mark.tf


def test_bucket_is_the_same_in_tensorflow_and_numpy() -> None:
    shard, record = np.repeat(np.arange(50), 40), np.tile(np.arange(40), 50)
    want = split.record_bucket_np(shard, record, seed=11)
    got = split.record_bucket(tf.constant(shard), tf.constant(record), seed=11).numpy()
    np.testing.assert_array_equal(got, want)
    assert want.min() >= 0.0 and want.max() < 1.0
    assert abs(float(np.mean(want < 0.25)) - 0.25) < 0.03  # roughly uniform over 2000 records
    assert not np.array_equal(want, split.record_bucket_np(shard, record, seed=12))  # the seed matters
    inside = tf.data.Dataset.from_tensor_slices((shard, record)).map(
        lambda s, r: split.record_bucket(s, r, 11)
    )
    np.testing.assert_array_equal(np.fromiter(inside.as_numpy_iterator(), np.float64), want)


def test_keep_fraction_and_its_complement_partition() -> None:
    buckets = split.record_bucket_np(np.zeros(1000), np.arange(1000))
    keep, drop = split.keep_fraction(0.2, 0.5), split.drop_fraction(0.2, 0.5)
    assert not np.any(keep(buckets) & drop(buckets)) and np.all(keep(buckets) | drop(buckets))
    with pytest.raises(ValueError):
        split.keep_fraction(0.6, 0.5)


def test_shard_folds_by_shard_when_enough_shards() -> None:
    folds = split.shard_folds(7, 3, seed=2)
    held = [f[1].shards for f in folds]
    assert sorted(i for h in held for i in h) == list(range(7))  # every shard held out exactly once
    for train, out in folds:
        assert train.shards is not None and out.shards is not None
        assert not train.shards & out.shards and train.shards | out.shards == set(range(7))
        assert train.whole_shards and out.whole_shards


def test_shard_folds_by_record_hash_when_few_shards() -> None:
    folds = split.shard_folds(2, 4)
    buckets = split.record_bucket_np(np.zeros(400), np.arange(400))
    held = np.stack([out(buckets) for _, out in folds])
    assert np.all(held.sum(0) == 1)  # each record in exactly one held-out fold
    for i, (train, out) in enumerate(folds):
        assert np.all(train(buckets) == ~out(buckets))
        np.testing.assert_array_equal(out(buckets), split.fold_of(buckets, 4) == i)
