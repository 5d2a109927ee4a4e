"""Datasets too large to hold in memory, as the stages see them: a ``Stream`` over a ``worker.data.StreamedSet``.

Why a wrapper: the reader (``worker.data``) knows shards, records and decoding; the stages know the signature,
the job's preprocessing and the selected output. ``Stream`` joins the two so that evaluation and fine-tuning
read a streamed dataset exactly as they read in-memory arrays: inputs keyed by signature input name, the
job's affine preprocessing applied per batch, labels of the selected output.

Memory: one batch, the reader's prefetch and shuffle buffer, and (for evaluation) the outputs and labels of
the records evaluated -- never the inputs of the whole set. ``max_eval_samples`` bounds that too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from worker.errors import PipelineError

# A dataset whose inputs take more bytes than this (``SECATEURS_DATASET_MEMORY_BYTES``) is streamed: held as a
# bounded sample plus a stream. Below it, the arrays are materialised and every stage runs as for an .npz.
SAMPLE_RECORDS = (
    2048  # records held in memory from a streamed set (>= GRADIENT_SAMPLES, FIDELITY_TRAIN_SAMPLES)
)


@dataclass(frozen=True)
class Streamed:
    """What ``worker.tasks`` hands the pipeline for a dataset above the in-memory budget: npz-style arrays of
    its first ``SAMPLE_RECORDS`` records (``x`` / ``x.<input>``, ``y``) and the reader of the whole set."""

    sample: dict[str, np.ndarray]
    reader: Any


@dataclass
class _Passes:
    """An evaluation pipeline and, when ``looped``, the iterator left at the start of its next pass.

    Why: making an iterator instantiates every function of the pipeline again and starts its threads (~25 ms
    of a ~150 ms pass over 5,000 small images, before the first batch). A looped pipeline is the passes joined
    by an empty marker batch (a real batch is never empty) and repeated, so one iterator serves every pass.
    Nothing is read past a marker: the pass's own prefetching pipeline ends with its records and the next one
    starts when the next pass asks for its first batch (no prefetch is injected after ``repeat``). A pass that
    stops early (``max_eval_samples``, a fixed-batch signature, an error) drops the iterator."""

    dataset: Any
    looped: bool
    iterator: Any = None


@dataclass
class Stream:
    """A streamed dataset bound to one signature.

    ``reader`` is a ``worker.data.StreamedSet``; ``keys`` maps the reader's input keys (``x`` or an input
    name) to the signature's input names; ``affine`` is the job's preprocessing per input (``x * a + b``),
    set by ``stages.load``; ``output`` names the output plain labels refer to.
    """

    reader: Any
    keys: dict[str, str]
    output: str
    dtypes: dict[str, tf.DType]
    affine: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    max_eval_samples: int | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # of the last evaluation pass
    evaluated: int = 0  # records in the last evaluation pass
    # Evaluation pipelines by (batch size, preprocessed inputs), built once: a job scores the same set 2-3 times
    _evaluation: dict[tuple[int, frozenset[str]], _Passes] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int | None:
        return self.reader.n

    def _inputs(self, x: dict[str, Any]) -> dict[str, Any]:
        """A batch's inputs keyed by signature name, in the signature's dtypes, preprocessed (``affine``);
        TensorFlow ops only, so it runs eagerly or inside ``tf.data`` alike."""
        bound = {}
        for key, value in x.items():
            name = self.keys.get(key, key)
            value = tf.cast(value, self.dtypes[name]) if value.dtype != self.dtypes[name] else value
            if name in self.affine:
                a, b = self.affine[name]
                value = tf.cast(tf.cast(value, tf.float64) * a + b, self.dtypes[name])
            bound[name] = value
        return bound

    def _split(self, element: Any) -> tuple[dict[str, Any], Any]:
        if isinstance(element, tuple | list):
            x, y = element[0], (element[1] if len(element) > 1 else None)
        else:
            x, y = element, None
        return self._inputs(x), y

    def preprocess(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The job's preprocessing (``affine``) on in-memory inputs keyed by signature name, as ``_split``
        applies it to each streamed batch: for the sample of a part cut after ``stages.load.prepare``."""
        out = dict(x)
        for name, (a, b) in self.affine.items():
            if name in out:
                out[name] = (out[name].astype(np.float64) * a + b).astype(out[name].dtype)
        return out

    def evaluation_batches(self, batch: int) -> Iterator[dict[str, Any]]:
        """Every record in order (no shuffle, no augmentation), up to ``max_eval_samples``; the labels seen are
        kept in ``labels`` once the pass ends (what ``stages.evaluate.score`` compares the outputs with).

        Speed (issue 20's evaluation goal, bench ``datasets``): the pipeline is built (and its functions traced)
        once per batch size; binding to the signature runs inside it (tf.data's threads, overlapped with the
        model call by ``prefetch``); batches and labels stay tensors, the labels copied out once at the end.
        Passes after the first go on with the first pass's iterator (``_Passes``)."""
        seen, ys = 0, []
        limit = self.max_eval_samples
        key = (batch, frozenset(self.affine))  # preprocessing is set once, by stages.load, before any pass
        passes = self._evaluation.get(key)
        if passes is None:
            passes = self._evaluation[key] = self._passes(batch)
        iterator, passes.iterator = passes.iterator, None  # given back by a pass that reaches its end marker
        if iterator is None and passes.looped:
            iterator = iter(passes.dataset)
        try:
            for element in self.reader.iterate(passes.dataset, iterator=iterator):
                x, y = element[0], (element[1] if len(element) > 1 else None)
                size = int(next(iter(x.values())).shape[0])
                if passes.looped and size == 0:  # the end marker: the iterator waits at the next pass
                    passes.iterator = iterator
                    break
                if limit is not None and seen + size > limit:
                    keep = limit - seen
                    x = {k: v[:keep] for k, v in x.items()}
                    y = None if y is None else y[:keep]
                    size = keep
                if size <= 0:
                    break
                if y is not None:
                    ys.append(y)
                seen += size
                yield x
                if limit is not None and seen >= limit:
                    break
        finally:  # also when the caller stops early (a fixed-batch signature leaves the last partial batch)
            self.evaluated = seen
            self.labels = {self.output: tf.concat(ys, 0).numpy()} if ys else {}

    def _passes(self, batch: int) -> _Passes:
        """The evaluation pipeline for ``batch``; looped (``_Passes``) unless bad records are skipped (their
        count is taken when a pass's iterator ends) or an element is not made of dense tensors."""
        dataset = self.reader.dataset(batch, shuffle=False, prefetch=0).map(
            lambda x, *rest: (self._inputs(x), *rest),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
        specs = tf.nest.flatten(dataset.element_spec)
        dense = all(isinstance(s, tf.TensorSpec) and s.shape.rank for s in specs)
        if getattr(self.reader, "on_bad_record", "fail") != "fail" or not dense:
            return _Passes(dataset, looped=False)
        marker = tf.data.Dataset.from_tensors(
            tf.nest.map_structure(
                lambda s: tf.zeros([0, *(d or 0 for d in s.shape[1:])], s.dtype), dataset.element_spec
            )
        )
        options = tf.data.Options()
        options.experimental_optimization.inject_prefetch = False  # no read-ahead past a pass's marker
        return _Passes(dataset.concatenate(marker).repeat().with_options(options), looped=True)

    def train_steps(self, batch_size: int, steps_per_epoch: int | None, max_samples: int | None) -> int:
        """Optimizer steps per epoch: ``steps_per_epoch``, else the records (capped by ``max_samples``) in
        batches; a stream that does not know its length needs one of the two."""
        if steps_per_epoch is not None:
            return steps_per_epoch
        n = self.n if max_samples is None else min(max_samples, self.n or max_samples)
        if n is None:
            raise PipelineError(
                "dataset_mismatch",
                "the train dataset's record count is unknown (compressed shards in object storage are not "
                "counted at registration): give fine_tune.steps_per_epoch or fine_tune.max_samples",
            )
        return math.ceil(n / batch_size)

    def train_epoch(
        self, batch_size: int, steps: int, seed: int, epoch: int
    ) -> Iterator[tuple[dict[str, Any], Any]]:
        """``steps`` batches of one epoch: shards and records shuffled from ``(seed, epoch)`` through the
        reader's bounded buffer; a stream shorter than ``steps`` batches starts over (next epoch's order)."""
        taken, round_ = 0, 0
        while taken < steps:
            empty = True
            dataset = self.reader.batches(batch_size, shuffle=True, seed=seed, epoch=epoch * 1000 + round_)
            for element in dataset:
                empty = False
                x, y = self._split(element)
                if y is None:
                    raise PipelineError(
                        "dataset_mismatch", "the train dataset has no label feature or column"
                    )
                yield x, y
                taken += 1
                if taken >= steps:
                    return
            if empty:
                raise PipelineError("dataset_mismatch", "the train dataset yielded no records")
            round_ += 1


def bind_stream(reader: Any, sig_inputs: dict[str, Any], output: str, max_eval_samples: int | None) -> Stream:
    """A ``Stream`` for a signature: the reader's ``x`` feeds a single-input signature, ``<name>`` its input."""
    names = list(sig_inputs)
    keys = {"x": names[0]} if len(names) == 1 else {}
    for name in names:
        keys.setdefault(name, name)
    dtypes = {name: tf.as_dtype(info["dtype"]) for name, info in sig_inputs.items()}
    return Stream(reader, keys, output, dtypes, max_eval_samples=max_eval_samples)
