"""Validation splits and K folds of a streamed dataset without holding it: by shard, or by a record hash.

A record's identity is ``(shard index, record index within the shard)`` (shard index = position in the
manifest's sorted ``shards`` list), so a split is stable across runs, epochs, shuffles and workers without a
list of ids. ``record_bucket`` maps that identity (and a split seed) to a float in [0, 1) with the same
splitmix64 arithmetic in NumPy and in TensorFlow ops (so it runs inside ``tf.data``); a ``Subset`` keeps a
range of buckets and/or whole shards. Whole-shard subsets matter at scale: shards outside a subset are never
fetched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_TO_UNIT = 2.0**-53

# A keep predicate: bucket (float64 tensor or array, values in [0, 1)) -> bool of the same shape.
KeepFn = Callable[[Any], Any]


def _mix_np(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def record_bucket_np(shard_index: Any, record_index: Any, seed: int = 0) -> np.ndarray:
    """NumPy twin of ``record_bucket``: float64 in [0, 1), broadcasting over its arguments."""
    with np.errstate(over="ignore"):
        s = np.asarray(shard_index, dtype=np.int64).astype(np.uint64)
        r = np.asarray(record_index, dtype=np.int64).astype(np.uint64)
        h = _mix_np(_mix_np(_mix_np(np.full_like(s, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)) ^ s) ^ r)
        return (h >> np.uint64(11)).astype(np.float64) * _TO_UNIT


def record_bucket(shard_index: Any, record_index: Any, seed: int = 0) -> Any:
    """Stable hash of a record's identity in [0, 1) as TensorFlow ops (usable inside ``tf.data``).

    Equals ``record_bucket_np`` bit for bit: splitmix64 in uint64 (TF wraps uint64 products like NumPy).
    """
    import tensorflow as tf

    u64 = tf.uint64
    rs = tf.bitwise.right_shift

    def mix(z: tf.Tensor) -> tf.Tensor:
        z = z + tf.constant(_GOLDEN, u64)
        z = tf.bitwise.bitwise_xor(z, rs(z, tf.constant(30, u64))) * tf.constant(_MIX1, u64)
        z = tf.bitwise.bitwise_xor(z, rs(z, tf.constant(27, u64))) * tf.constant(_MIX2, u64)
        return tf.bitwise.bitwise_xor(z, rs(z, tf.constant(31, u64)))

    s = tf.cast(tf.cast(shard_index, tf.int64), u64)
    r = tf.cast(tf.cast(record_index, tf.int64), u64)
    base = mix(tf.constant(seed & 0xFFFFFFFFFFFFFFFF, u64))
    h = mix(tf.bitwise.bitwise_xor(mix(tf.bitwise.bitwise_xor(base, s)), r))
    return tf.cast(rs(h, tf.constant(11, u64)), tf.float64) * _TO_UNIT


def fold_of(bucket: Any, k: int) -> Any:
    """Fold number (0..k-1) of a bucket value (a float or a NumPy array)."""
    if isinstance(bucket, float | int):
        return min(int(bucket * k), k - 1)
    return np.minimum(np.floor(np.asarray(bucket) * k).astype(np.int64), k - 1)


@dataclass(frozen=True)
class Subset:
    """Records kept by one pass: optional whole shards, then a range of hash buckets.

    ``shards``: shard indices to read (None = all; others are never fetched). ``lo <= bucket < hi`` keeps a
    record; ``invert`` keeps the complement instead (the training part of a fold). ``seed`` is the split's own
    seed, independent of the shuffle seed, so training and validation passes agree on the partition.
    Callable on a bucket (NumPy array or tensor) like any keep predicate.
    """

    lo: float = 0.0
    hi: float = 1.0
    invert: bool = False
    shards: frozenset[int] | None = None
    seed: int = 0

    @property
    def whole_shards(self) -> bool:
        """True when the subset is whole shards only (no per-record filter needed)."""
        return (self.lo, self.hi, self.invert) == (0.0, 1.0, False)

    def keeps_shard(self, shard_index: int) -> bool:
        return self.shards is None or shard_index in self.shards

    def __call__(self, bucket: Any) -> Any:
        inside = (bucket >= self.lo) & (bucket < self.hi)
        return ~inside if self.invert else inside

    def complement(self, n_shards: int | None = None) -> Subset:
        """The records this subset leaves out (shard subsets need ``n_shards``)."""
        if self.shards is not None:
            if (self.lo, self.hi, self.invert) != (0.0, 1.0, False):
                raise ValueError("the complement of a subset of both shards and buckets is not one subset")
            if n_shards is None:
                raise ValueError("the complement of a shard subset needs n_shards")
            shards = frozenset(range(n_shards)) - (self.shards or frozenset())
            return Subset(shards=shards, seed=self.seed)
        return Subset(self.lo, self.hi, not self.invert, None, self.seed)


def keep_fraction(lo: float, hi: float, *, seed: int = 0) -> Subset:
    """Keep records whose bucket is in [lo, hi): e.g. ``keep_fraction(0, 0.1)`` is a 10% validation split."""
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"need 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
    return Subset(lo, hi, seed=seed)


def drop_fraction(lo: float, hi: float, *, seed: int = 0) -> Subset:
    """Every record ``keep_fraction(lo, hi, seed=seed)`` does not keep (the training side of a split)."""
    return keep_fraction(lo, hi, seed=seed).complement()


def shard_folds(n_shards: int, k: int, *, seed: int = 0) -> list[tuple[Subset, Subset]]:
    """K folds as ``(train, held_out)`` subsets: whole shards when there are at least k shards (no shard is
    fetched by a pass that does not need it; shards dealt round-robin after a seeded permutation), else
    record-hash folds (held-out fold i = buckets [i/k, (i+1)/k))."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if n_shards >= k:
        order = np.random.default_rng(seed).permutation(n_shards)
        folds: list[tuple[Subset, Subset]] = []
        for i in range(k):
            held = frozenset(int(s) for s in order[i::k])
            train = frozenset(range(n_shards)) - held
            folds.append((Subset(shards=train, seed=seed), Subset(shards=held, seed=seed)))
        return folds
    edges = [i / k for i in range(k)] + [1.0]
    return [
        (drop_fraction(edges[i], edges[i + 1], seed=seed), keep_fraction(edges[i], edges[i + 1], seed=seed))
        for i in range(k)
    ]


def split_seed(keep: KeepFn | None) -> int:
    """The hash seed a keep predicate was made for (a ``Subset``'s own), else 0."""
    return keep.seed if isinstance(keep, Subset) else 0


def kept_shards(keep: KeepFn | None, n_shards: int) -> Sequence[int]:
    """Shard indices a pass with ``keep`` must read."""
    if isinstance(keep, Subset):
        return [i for i in range(n_shards) if keep.keeps_shard(i)]
    return range(n_shards)
