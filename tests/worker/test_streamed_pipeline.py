"""A job on a streamed dataset (above SECATEURS_DATASET_MEMORY_BYTES) against the same job on the same data held
in memory: the pipeline must give the same baseline, read every eval record, fine-tune from the shard stream
and name a bad record by shard and index.

Real TFRecord shards written with TensorFlow, read through the real FileSource, manifest and StreamedSet, as
``worker.datasets.open_for_job`` does for a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from app.config import Settings
from app.schemas.spec import PruneSpec
from app.storage import Storage
from worker.data.manifest import build_manifest
from worker.data.sources import open_source
from worker.data.stream import StreamedSet
from worker.errors import PipelineError
from worker.pipeline import run_pipeline
from worker.stages.feed import SAMPLE_RECORDS, Streamed

pytestmark = pytest.mark.tf

FEATURES = {
    "pixels": {"kind": "fixed", "dtype": "float32", "shape": [8, 8, 1]},
    "label": {"kind": "fixed", "dtype": "int64", "shape": []},
}
DESCRIPTION = {"format": "tfrecord", "features": FEATURES, "inputs": {"x": {"feature": "pixels"}}, "label": "label"}


def _write_shards(root: Path, x: np.ndarray, y: np.ndarray, shards: int = 3) -> None:
    root.mkdir(parents=True)
    for s in range(shards):
        with tf.io.TFRecordWriter(str(root / f"part-{s:05d}.tfrecord")) as writer:
            for i in range(s, len(x), shards):
                feature = {
                    "pixels": tf.train.Feature(float_list=tf.train.FloatList(value=x[i].ravel())),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y[i])])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _streamed(root: Path, tmp: Path) -> Streamed:
    settings = Settings(data_dir=tmp / "data")
    storage = Storage.from_settings(settings, worker=True)
    source = open_source(f"file://{root}/", storage=storage, settings=settings, allowed=None)
    manifest = build_manifest(source, DESCRIPTION, max_objects=100)
    reader = StreamedSet(manifest, source, input_specs={"image": {"shape": [None, 8, 8, 1], "dtype": "float32"}})
    return Streamed(reader.take(SAMPLE_RECORDS), reader)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, digits_cnn: Any) -> tuple[Path, Path]:
    train, test = digits_cnn
    root = tmp_path_factory.mktemp("shards")
    _write_shards(root / "train", train["x"], train["y"])
    _write_shards(root / "test", test["x"], test["y"])
    return root / "train", root / "test"


def test_streamed_job_matches_the_in_memory_baseline_and_fine_tunes_from_the_stream(
    keras3_export_dir: Path, digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = digits_cnn
    spec = PruneSpec.model_validate(
        {
            "target_sparsity": 0.8,
            "fine_tune": {"epochs": 1, "batch_size": 32, "steps_per_epoch": 7},
            "augmentation": [{"kind": "random_translation", "height_factor": 0.1, "width_factor": 0.1}],
        }
    )
    steps: list[float] = []
    streamed = run_pipeline(
        keras3_export_dir,
        spec,
        _streamed(shards[0], tmp_path),
        _streamed(shards[1], tmp_path),
        tmp_path / "streamed",
        lambda stage, progress: steps.append(progress) if stage == "fine_tuning" else None,
    )
    in_memory = run_pipeline(
        keras3_export_dir, spec, train, test, tmp_path / "memory", lambda stage, progress: None
    )
    # Same model, same records (the stream reads every eval record in shard order): the same baseline.
    assert streamed["baseline"]["metrics"]["accuracy"] == pytest.approx(in_memory["baseline"]["metrics"]["accuracy"])
    confusion = np.asarray(streamed["baseline"]["metrics"]["confusion_matrix"])
    assert confusion.sum() == len(test["y"])
    assert streamed["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    # 7 (augmented) steps of shuffled shards vs 7 of shuffled arrays: other batches, the same recovery
    assert streamed["pruned"]["metrics"]["accuracy"] == pytest.approx(
        in_memory["pruned"]["metrics"]["accuracy"], abs=0.1
    ), (streamed["pruned"]["metrics"]["accuracy"], in_memory["pruned"]["metrics"]["accuracy"])
    assert any("augmentation on training batches" in n for n in streamed["notes"])
    assert any(n.startswith(f"the eval dataset ({len(test['y'])} records) was streamed") for n in streamed["notes"])
    assert steps, "fine-tuning reported no progress"


def test_a_record_that_does_not_parse_fails_the_job_naming_shard_and_index(
    keras3_export_dir: Path, digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    train, _ = digits_cnn
    root = tmp_path / "bad"
    _write_shards(root, train["x"][:60], train["y"][:60], shards=2)
    with tf.io.TFRecordWriter(str(root / "part-00001.tfrecord")) as writer:  # a shard of the wrong feature type
        for _ in range(5):
            feature = {"pixels": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not floats"]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with pytest.raises(PipelineError) as failed:
        streamed = _streamed(root, tmp_path)
        run_pipeline(
            keras3_export_dir,
            PruneSpec.model_validate({"target_sparsity": 0.5}),
            None,
            streamed,
            tmp_path / "out",
            lambda stage, progress: None,
        )
    assert "part-00001.tfrecord" in failed.value.message


def _fold_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-fold rows without wall times (what a second run with the same seed must repeat)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in document["cross_validation"]["per_fold"]]


@pytest.mark.parametrize(("folds", "cut"), [(3, "by shard"), (4, "by record hash")])
def test_k_fold_on_a_streamed_train_set_partitions_it_and_repeats_for_a_seed(
    keras3_export_dir: Path, digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path, folds: int, cut: str
) -> None:
    train, _ = digits_cnn
    n = len(train["y"])
    spec: dict[str, Any] = {"target_sparsity": 0.5, "seed": 3, "evaluation": {"cross_validation": {"folds": folds}}}
    runs = 2 if folds == 4 else 1  # the record-hash folds are the ones whose determinism is not by construction
    # each fold fine-tunes from its own part of the stream, 2 x 64 samples: cheap (the whole train set per fold
    # and run made the record-hash case the suite's slowest test, 50 s), still shuffled by the seed
    spec["fine_tune"] = {"epochs": 1, "batch_size": 64, "max_samples": 128}

    documents = [
        run_pipeline(
            keras3_export_dir,
            PruneSpec.model_validate(spec),
            _streamed(shards[0], tmp_path),
            _streamed(shards[1], tmp_path),
            tmp_path / f"cv{run}",
            lambda stage, progress: None,
        )
        for run in range(runs)
    ]
    section = documents[0]["cross_validation"]
    assert section["folds"] == folds and section["stratified"] is False and cut in section["note"]
    rows = section["per_fold"]
    assert sum(row["n_test"] for row in rows) == n  # every record held out exactly once
    assert all(row["n_train"] + row["n_test"] == n for row in rows)
    assert all(row["n_test"] > 0 for row in rows)
    if cut == "by shard":  # 3 shards of records i, i+3, ... (see _write_shards): the held-out sizes are theirs
        assert sorted(row["n_test"] for row in rows) == sorted(len(range(s, n, 3)) for s in range(3))
    # each fold scored exactly its held-out records: the baseline's confusion matrix counts them
    for row in rows:
        assert np.asarray(row["baseline"]["confusion_matrix"]).sum() == row["n_test"]
        assert row["sparsity"] == pytest.approx(0.5, abs=0.01)
    if runs == 2:
        assert _fold_rows(documents[0]) == _fold_rows(documents[1])


def test_search_validation_fraction_splits_a_streamed_train_set_by_record_hash(
    keras3_export_dir: Path, digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    from worker.data import split

    train, _ = digits_cnn
    spec = PruneSpec.model_validate(
        {
            "search": {"max_drop": 0.05, "min_sparsity": 0.05, "max_sparsity": 0.6, "validation_fraction": 0.2},
            "preset": "fast",
            "seed": 5,
        }
    )
    document = run_pipeline(
        keras3_export_dir,
        spec,
        _streamed(shards[0], tmp_path),
        _streamed(shards[1], tmp_path),
        tmp_path / "search",
        lambda stage, progress: None,
    )
    assert document["search"]["selection_data"] == "validation split of the train set"
    # the held-out records are those whose seeded hash of (shard, record index) is below 0.2
    n = len(train["y"])
    shard_of = np.arange(n) % 3
    record_of = np.arange(n) // 3
    held = int(np.count_nonzero(split.record_bucket_np(shard_of, record_of, 5) < 0.2))
    note = next(line for line in document["notes"] if "held out" in line)
    assert f"{held} of {n} train samples held out (by a seeded hash" in note, note
    assert f"fine-tune on the other {n - held}" in note


def test_a_fixed_batch_signature_scores_the_whole_batches_of_a_stream(
    digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    """The pass stops at the partial last batch; the labels it read are still kept for scoring."""
    from worker.models import load_model
    from worker.stages.evaluate import score
    from worker.stages.job import predict
    from worker.stages.load import prepare

    module = tf.Module()
    module.w = tf.Variable(tf.random.stateless_normal([64, 10], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([32, 8, 8, 1], tf.float32, name="image")])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probs": tf.nn.softmax(tf.reshape(image, [32, 64]) @ module.w)}

    tf.saved_model.save(module, str(tmp_path / "fixed"), signatures={"serving_default": serve})
    job = prepare(
        load_model(tmp_path / "fixed"), PruneSpec.model_validate({"target_sparsity": 0.5}), None,
        _streamed(shards[1], tmp_path),
    )  # fmt: skip
    assert job.evaluation is not None
    n = len(digits_cnn[1]["y"])
    outputs = predict(job, job.evaluation)
    assert len(outputs["probs"]) == n // 32 * 32 < n
    metrics = score(job, job.evaluation, outputs).flat
    assert metrics is not None and np.asarray(metrics["confusion_matrix"]).sum() == n // 32 * 32


def test_repeated_streamed_passes_read_every_record_once_each_time(
    keras3_export_dir: Path, digits_cnn: Any, shards: tuple[Path, Path], tmp_path: Path
) -> None:
    """Passes after the first go on with one looped iterator (``feed._Passes``): each reads every record once, in
    shard order, also after a pass cut short by ``max_eval_samples`` or left by its caller."""
    from worker.models import load_model
    from worker.stages.job import predict
    from worker.stages.load import prepare

    _, test = digits_cnn
    n = len(test["y"])
    order = np.concatenate([np.arange(s, n, 3) for s in range(3)])  # _write_shards: record i in shard i % 3
    spec = PruneSpec.model_validate({"target_sparsity": 0.5})
    handle = load_model(keras3_export_dir)
    memory = prepare(handle, spec, None, {"x": test["x"][order], "y": test["y"][order]})
    assert memory.evaluation is not None
    expected = predict(memory, memory.evaluation)
    job = prepare(handle, spec, None, _streamed(shards[1], tmp_path))
    assert job.evaluation is not None and job.evaluation.stream is not None
    stream = job.evaluation.stream
    for cut in (None, None, 100, None, "caller", None):
        if cut == "caller":  # a caller that stops after one batch
            batches = stream.evaluation_batches(256)
            next(batches)
            batches.close()
            continue
        stream.max_eval_samples = cut
        outputs = predict(job, job.evaluation)
        kept = n if cut is None else cut
        for name, value in expected.items():
            np.testing.assert_allclose(outputs[name], value[:kept], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stream.labels[stream.output], test["y"][order][:kept])
    assert all(passes.looped for passes in stream._evaluation.values())
