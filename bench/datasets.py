"""Issue 20, datasets at scale: streamed input speed, shards from S3, one dataset in three forms, worker memory.

Two sections. ``datasets`` (part of the default run: ``python -m bench.run --only datasets``):

- **(b) input pipeline speed.** A small Fashion-MNIST CNN (Keras 3, ``Rescaling(1/255)`` inside, trained once on
  the train subset and kept in the model cache) is pruned by the job pipeline in-process (``run_pipeline``) on a
  STREAMED TFRecord dataset: the shards written by ``worker.data.convert.convert_npz`` (the registration path of
  a large ``.npz``), their manifest from ``build_manifest`` over a ``file://`` source, and the job's inputs from
  ``worker.datasets.open_for_job`` with ``dataset_memory_bytes=0`` (always streamed: ``Streamed(sample,
  reader)``). The spec: one-shot 50% magnitude (layer scope), ``fine_tune {epochs: 1, steps_per_epoch: N,
  batch_size: 128}``, Adam 1e-3; the evaluation set is streamed the same way. Fine-tuning samples/s =
  ``N x 128 / timings_s["fine_tune"]`` (the whole stage: the stream is opened, the step traced, masks applied after
  every step). Against it, bare Keras: the same architecture with the same weights, ``compile(Adam(1e-3),
  sparse CE)``, one cold ``model.fit(ds, epochs=1, steps_per_epoch=N)`` (tracing included, as in the job) over a
  ``tf.data.TFRecordDataset`` pipeline on the same shard files written as a user would (shard files shuffled,
  ``interleave`` of 4, ``shuffle(10_000)``, ``map(parse_single_example + parse_tensor)``, ``batch(128)``,
  ``repeat``, ``prefetch(AUTOTUNE)``). Evaluation samples/s = eval samples / ``timings_s["evaluate"]`` (the
  job's whole evaluate stage on the pruned model: the streamed prediction pass, scoring, fidelity, a 1-run
  latency probe, sparsity counts) vs a bare ``model.predict`` over the eval shards (same parse, batch 256, the
  job's ``PREDICT_BATCH``), timed on its second pass: the job's evaluate stage comes after its baseline
  pass, so both sides are traced (and the job's second pass goes on with the iterator of its first, as every
  evaluation pass of a job does: ``worker.stages.feed._Passes``; ``predict`` makes one per call). For context, the job's prediction pass alone (``streamed_pass``: the
  reader and the model, as the stage runs them, without scoring), timed the same way right after, and both
  passes in CPU seconds of the process (``time.process_time``, every thread): on shared cores wall time
  mostly says how many runnable threads each side had. One untimed warm-up job and fit first (a worker process is long-lived: the
  first job of a process pays one-off imports and set-up); then job and bare runs alternate for ``repeats``
  rounds (order reversed every other round); medians. Goals >= 0.90x.
- **(c) from S3.** The same streamed fine-tuning job with the train shards in SeaweedFS (``tests/support/seaweed``,
  loopback, ``s3://`` source through ``Settings.s3_endpoint_url`` and ``AWS_*``), a fresh shard cache per job so
  every shard is downloaded while training, vs the local job of (b) in the same rounds. Goal >= 0.80x.
- **(d) same data, three forms.** All of Fashion-MNIST (60,000 train, 10,000 eval: a 70,000-file PNG folder; the
  model is still the one trained on the first 12,000) as a ``.npz`` (in memory, as the worker holds a
  small ``.npz``), as TFRecord shards (``convert_npz``) and as a PNG image folder (``<class>/<n>.png``, converted
  by ``convert_image_folder`` + ``build_manifest`` of its shards, as registration does); the TFRecord and image
  forms are streamed (``dataset_memory_bytes=0``). The eval set takes the same form as the train set. The job:
  ``{"target_sparsity": 0.9, "preset": "recommended"}`` resolved as the API resolves it (3 epochs, batch 32,
  polynomial schedule, global LAMP, distillation), with seeds 1, 2 and 3 in each form (one run's accuracy moves
  with the order samples come in, which differs between forms even with one seed). Goal: the forms' mean pruned
  accuracies within 0.3 point of each other
  (the baselines must be identical: the same pixels in every form).

``datasets_memory`` (opt-in, like ``bigmodel``: ``python -m bench.run --only datasets_memory`` or
``python -m bench.datasets --memory [--small-gb G] [--large-gb G] [--work DIR]``):

- **(a) memory flat in dataset size.** TFRecord datasets of ~1 GB and >= 30 GB (the Fashion-MNIST records,
  train + test, written once as base shards and copied to size; refused below 40 GB free disk, or the sizes'
  sum + 9 GB for other sizes). Each runs the same job in its own subprocess (the streamed train set, fine-tuning
  a fixed number of steps, the streamed eval set bounded by ``evaluation.max_samples``) whose peak RSS is
  ``ru_maxrss``; goal large / small <= 1.10. The large set's subprocess then streams one full pass over it
  (``StreamedSet.batches(1024)``), timed. Manifests are built in the parent (registration), untimed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import ROOT, BenchError, md_table, run_json_child

FASHION = Path("/usr/share/datasets/fashion-mnist")
N_CLASSES = 10
BATCH = 128
PREDICT_BATCH = 256  # worker.stages.job.PREDICT_BATCH
SHUFFLE_BUFFER = 10_000  # worker.data.stream.StreamedSet.dataset's default
SPEED_GOAL, S3_GOAL, FORMS_GOAL_POINTS, RSS_GOAL = 0.90, 0.80, 0.3, 1.10
GB = 1_000_000_000

# (b), (c), (d) at full size and in smoke mode.
DEFAULTS: dict[str, Any] = {
    "n_train": 12_000,  # Fashion-MNIST train subset (the first ones) for the model, (b) and (c)
    "n_test": 5_000,
    "forms_n_train": None,  # (d): every image, 60,000 train + 10,000 test (a 70,000-file PNG folder)
    "forms_n_test": None,
    "forms_seeds": [1, 2, 3],  # (d): each form's job with each seed; the forms' mean accuracies are compared
    "model_epochs": 3,
    "steps": 150,  # fine-tuning steps of batch 128 in (b) and (c)
    "repeats": 3,
    "shard_bytes": 2 << 20,
    "forms": True,
}
SMOKE: dict[str, Any] = {
    "n_train": 384,
    "n_test": 256,
    "forms_n_train": 384,
    "forms_n_test": 256,
    "forms_seeds": [1],
    "model_epochs": 1,
    "steps": 3,
    "repeats": 1,
    "shard_bytes": 64 << 10,
    "forms": True,
}
# (a): sizes, steps, evaluated samples.
MEMORY_DEFAULTS: dict[str, Any] = {"small_bytes": 1 * GB, "large_bytes": 30 * GB, "steps": 50, "eval": 5_000}
MEMORY_SMOKE: dict[str, Any] = {"small_bytes": 3 << 20, "large_bytes": 12 << 20, "steps": 3, "eval": 256}
# The one-run latency probe: the evaluate stage always measures latency; keep it out of the way.
LATENCY = {"batch_sizes": [1], "runs": 1, "warmup": 0, "budget_s": 0.05}


def _log(message: str) -> None:
    print(f"[datasets] {message}", file=sys.stderr, flush=True)


# -- Fashion-MNIST and its model -----------------------------------------------------------------------------


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian magic (dtype 0x08 = uint8, ndim), dims, then the data."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion(n_train: int | None = None, n_test: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first ``n_train`` / ``n_test`` Fashion-MNIST samples: ``x`` uint8 (n, 28, 28, 1), ``y`` int64."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise BenchError(f"Fashion-MNIST is not installed at {FASHION} (train-images-idx3-ubyte.gz etc.)")
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = _idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")[:n, :, :, None]
        y = _idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
        out.append({"x": np.ascontiguousarray(x), "y": y})
    return out[0], out[1]


def fashion_cnn(seed: int = 0) -> Any:
    """The small CNN (pixels in [0, 255] in, softmax out), uncompiled."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="image"),
            layers.Rescaling(1.0 / 255.0, name="rescale"),
            layers.Conv2D(16, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(32, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dense(N_CLASSES, activation="softmax", name="logits"),
        ],
        name="fashion_cnn",
    )


def build_fashion_cnn(root: Path, n_train: int, epochs: int, seed: int) -> dict[str, Any]:
    """Train on the first ``n_train`` samples; ``root/saved_model`` (``model.export``) and
    ``root/model.weights.h5`` (for the bare-Keras twin)."""
    import keras

    train, test = fashion(n_train, None)
    model = fashion_cnn(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    tick = time.perf_counter()
    model.fit(train["x"].astype(np.float32), train["y"], batch_size=64, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - tick
    _, accuracy = model.evaluate(test["x"].astype(np.float32), test["y"], batch_size=512, verbose=0)
    model.save_weights(str(root / "model.weights.h5"))
    model.export(str(root / "saved_model"), verbose=False)
    return {
        "n_train": n_train,
        "epochs": epochs,
        "seed": seed,
        "params": int(model.count_params()),
        "test_accuracy": float(accuracy),
        "train_s": seconds,
    }


def cached_fashion_cnn(n_train: int, epochs: int, cache_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    from tests.support.model_cache import cached_model

    return cached_model(build_fashion_cnn, n_train, epochs, 0, cache_dir=cache_dir)


def keras_twin(weights: Path) -> Any:
    import keras

    model = fashion_cnn(0)
    model.load_weights(str(weights))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


# -- the forms of a dataset ----------------------------------------------------------------------------------


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=arrays["x"], y=arrays["y"])
    return path


def write_shards(arrays: dict[str, np.ndarray], out_dir: Path, shard_bytes: int) -> dict[str, Any]:
    """TFRecord shards as registration writes them from a large ``.npz`` (``convert_npz``)."""
    from worker.data.convert import convert_npz

    npz = write_npz(out_dir.parent / f".{out_dir.name}.npz", arrays)
    try:
        conversion = convert_npz(npz, out_dir, shard_bytes=shard_bytes)
    finally:
        npz.unlink(missing_ok=True)
    return {"description": dict(conversion.description), "shards": len(conversion.shards), "n": conversion.n}


def write_png_folder(arrays: dict[str, np.ndarray], root: Path) -> Path:
    """``root/c<label>/<index>.png`` (grayscale, lossless: the same pixels)."""
    from PIL import Image

    for label in range(N_CLASSES):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(arrays["x"], arrays["y"], strict=True)):
        Image.fromarray(image[:, :, 0]).save(root / f"c{int(label)}" / f"{i:06d}.png")
    return root


def convert_folder(folder: Path, out_dir: Path, shard_bytes: int) -> dict[str, Any]:
    """An image folder into shards, as registration converts one (``convert_image_folder``)."""
    from worker.data.convert import convert_image_folder

    conversion = convert_image_folder(folder, out_dir, shard_bytes=shard_bytes)
    return {
        "description": dict(conversion.description),
        "class_names": conversion.class_names,
        "shards": len(conversion.shards),
        "n": conversion.n,
    }


def local_settings(data_dir: Path, **extra: Any) -> Any:
    from app.config import Settings

    return Settings(data_dir=data_dir, dataset_memory_bytes=0, **extra)


def manifest_of(
    root: str, description: dict[str, Any], settings: Any, class_names: list[str] | None = None
) -> dict[str, Any]:
    """What registration stores for a ``file://`` / ``s3://`` root of shards."""
    from app.storage import Storage
    from worker.data.manifest import build_manifest
    from worker.data.sources import open_source

    storage = Storage(settings.data_dir)
    source = open_source(root, storage=storage, settings=settings, allowed=None)
    manifest = build_manifest(source, description, max_objects=settings.dataset_max_objects)
    if class_names is not None:
        manifest["class_names"] = class_names
    return manifest


def open_streamed(manifest: dict[str, Any], settings: Any, input_specs: dict[str, Any]) -> Any:
    """The job's input exactly as ``worker.datasets.open_for_job`` builds it (``Streamed`` below the budget 0)."""
    from app.storage import Storage
    from worker.datasets import open_for_job

    record = SimpleNamespace(manifest=manifest, source=None, tenant="bench")
    given, _notes = open_for_job(  # (data, notes of reading it into memory): none for a streamed set
        record,  # type: ignore[arg-type]
        Storage(settings.data_dir),
        settings,
        on_bad_record="fail",
        input_specs=input_specs,
    )
    return given


def input_specs_of(saved_model: Path) -> dict[str, Any]:
    from worker.models import load_model

    return dict(load_model(saved_model).signature("serving_default").inputs)


def run_job(
    saved_model: Path, spec: dict[str, Any], train: Any, evaluation: Any, out: Path
) -> dict[str, Any]:
    """``run_pipeline`` in-process; the metrics document."""
    from app.schemas.presets import resolve
    from app.schemas.spec import PruneSpec
    from worker.pipeline import run_pipeline

    resolved = resolve(PruneSpec.model_validate(spec), has_train=train is not None)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_pipeline(saved_model, resolved, train, evaluation, out, lambda stage, progress: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def speed_spec(steps: int, max_eval: int | None = None) -> dict[str, Any]:
    evaluation: dict[str, Any] = {"latency": LATENCY}
    if max_eval is not None:
        evaluation["max_samples"] = max_eval
    return {
        "target_sparsity": 0.5,
        "criterion": "magnitude",
        "scope": "layer",
        "normalization": "none",
        "schedule": {"kind": "one_shot"},
        "fine_tune": {
            "epochs": 1,
            "steps_per_epoch": steps,
            "batch_size": BATCH,
            "learning_rate": 1e-3,
            "optimizer": "adam",
        },
        "evaluation": evaluation,
    }


# -- the bare tf.data + Keras side ---------------------------------------------------------------------------


def bare_dataset(shard_dir: Path, batch: int, *, train: bool, seed: int = 0) -> Any:
    """What a user writes for the same shards: files, interleave, shuffle, parse per record, batch, prefetch."""
    import tensorflow as tf

    files = sorted(str(p) for p in shard_dir.glob("*.tfrecord"))
    spec = {"x": tf.io.FixedLenFeature([], tf.string), "y": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record: Any) -> tuple[Any, Any]:
        example = tf.io.parse_single_example(record, spec)
        image = tf.ensure_shape(tf.io.parse_tensor(example["x"], tf.uint8), (28, 28, 1))
        return tf.cast(image, tf.float32), example["y"]

    if train:
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed)
        ds = ds.interleave(
            tf.data.TFRecordDataset, cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed).repeat()
    else:
        ds = tf.data.TFRecordDataset(files)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def bare_fit(weights: Path, shard_dir: Path, steps: int) -> float:
    """Seconds of one cold ``model.fit`` of ``steps`` steps (tracing included, as in the job)."""
    model = keras_twin(weights)
    ds = bare_dataset(shard_dir, BATCH, train=True)
    tick = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - tick
    if int(model.optimizer.iterations.numpy()) != steps:
        raise BenchError(f"model.fit ran {int(model.optimizer.iterations.numpy())} steps, not {steps}")
    return seconds


def bare_predict(weights: Path, shard_dir: Path) -> tuple[float, int, float]:
    """Seconds of the second ``model.predict`` pass over the eval shards (the first one traces), the rows, and
    the CPU seconds of this process (every thread) during it: on shared cores the wall time mostly says how
    many runnable threads each side had, the CPU time what the work cost."""
    model = keras_twin(weights)
    ds = bare_dataset(shard_dir, PREDICT_BATCH, train=False)
    model.predict(ds, verbose=0)
    tick, cpu = time.perf_counter(), time.process_time()
    out = model.predict(ds, verbose=0)
    return time.perf_counter() - tick, len(out), time.process_time() - cpu


def streamed_pass(
    saved: Path, manifest: dict[str, Any], settings: Any, specs: dict[str, Any]
) -> tuple[float, int, float]:
    """Seconds of the job's prediction pass alone over the streamed eval set (``worker.stages.job.predict`` on
    the ``Stream`` a job binds), timed on its second pass like ``bare_predict``: the evaluate stage without
    its scoring (classification metrics), fidelity and latency probe."""
    from app.schemas.spec import PruneSpec
    from worker.models import load_model
    from worker.stages.job import predict
    from worker.stages.load import prepare

    job = prepare(
        load_model(saved),
        PruneSpec.model_validate({"target_sparsity": 0.5}),
        None,
        open_streamed(manifest, settings, specs),
    )
    assert job.evaluation is not None
    predict(job, job.evaluation)
    tick, cpu = time.perf_counter(), time.process_time()
    out = predict(job, job.evaluation)
    return time.perf_counter() - tick, len(next(iter(out.values()))), time.process_time() - cpu


# -- (b) and (c) ---------------------------------------------------------------------------------------------


class S3Shards:
    """A SeaweedFS server holding the train shards; ``AWS_*`` set in this process while it runs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.server: Any = None
        self.saved_env: dict[str, str | None] = {}

    def __enter__(self) -> S3Shards:
        from tests.support.seaweed import Seaweed

        self.server = Seaweed(self.work / "seaweed").start()
        for name, value in self.server.env().items():
            if name.startswith("AWS_"):
                self.saved_env[name] = os.environ.get(name)
                os.environ[name] = value
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.server is not None:
            self.server.stop()

    def upload(self, shard_dir: Path) -> str:
        from app.storage.s3 import S3BlobStore

        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        writer = S3BlobStore(f"s3://{self.server.bucket}/{prefix}", endpoint_url=self.server.endpoint)
        for path in sorted(shard_dir.glob("*.tfrecord")):
            copy = self.work / f".upload-{path.name}"
            shutil.copyfile(path, copy)
            writer.put_file(f"train/{path.name}", copy)  # moves the file it is given (a copy)
        return f"s3://{self.server.bucket}/{prefix}/train/"

    def settings(self, data_dir: Path) -> Any:
        return local_settings(data_dir, s3_endpoint_url=self.server.endpoint, s3_region="us-east-1")


def run_speed(
    model_root: Path, train: dict[str, Any], test: dict[str, Any], cfg: dict[str, Any], work: Path
) -> dict[str, Any]:
    """(b) and (c), interleaved rounds: job local, bare fit, bare predict, job from S3."""
    saved, weights = model_root / "saved_model", model_root / "model.weights.h5"
    shard_bytes = cfg["shard_bytes"]
    description = write_shards(train, work / "train-shards", shard_bytes)["description"]
    write_shards(test, work / "test-shards", shard_bytes)
    settings = local_settings(work / "data")
    specs = input_specs_of(saved)
    train_manifest = manifest_of(f"file://{work / 'train-shards'}/", description, settings)
    test_manifest = manifest_of(f"file://{work / 'test-shards'}/", description, settings)
    steps, n_test = cfg["steps"], len(test["y"])
    rounds: list[dict[str, Any]] = []
    with S3Shards(work) as s3:
        s3_root = s3.upload(work / "train-shards")
        s3_manifest = manifest_of(s3_root, description, s3.settings(work / "s3-register"))
        for index in range(cfg["repeats"]):
            row: dict[str, Any] = {}

            def job(manifest: dict[str, Any], job_settings: Any, row: dict[str, Any] = row) -> dict[str, Any]:
                doc = run_job(
                    saved,
                    speed_spec(steps),
                    open_streamed(manifest, job_settings, specs),
                    open_streamed(test_manifest, settings, specs),
                    work / f"job-{uuid.uuid4().hex[:6]}",
                )
                timings = doc["timings_s"]
                return {
                    "fine_tune_s": timings["fine_tune"],
                    "evaluate_s": timings["evaluate"],
                    "accuracy": (doc["pruned"]["metrics"] or {}).get("accuracy"),
                    "baseline_accuracy": (doc["baseline"]["metrics"] or {}).get("accuracy"),
                }

            if index == 0:  # untimed: the first job and fit of a process pay one-off imports and set-up
                warm = job(train_manifest, settings)
                bare_fit(weights, work / "train-shards", min(steps, 5))
                _log(f"warm-up job (untimed): {json.dumps(warm)}")
            order = ["job", "keras", "s3"] if index % 2 == 0 else ["s3", "keras", "job"]
            for side in order:
                if side == "job":
                    row["job"] = job(train_manifest, settings)
                elif side == "s3":  # a fresh shard cache: every shard comes from S3 during the job
                    row["s3"] = job(s3_manifest, s3.settings(work / f"s3-job-{index}"))
                    shutil.rmtree(work / f"s3-job-{index}", ignore_errors=True)
                else:
                    fit_s = bare_fit(weights, work / "train-shards", steps)
                    predict_s, predicted, predict_cpu_s = bare_predict(weights, work / "test-shards")
                    if predicted != n_test:
                        raise BenchError(f"model.predict returned {predicted} rows for {n_test} eval samples")
                    pass_s, passed, pass_cpu_s = streamed_pass(saved, test_manifest, settings, specs)
                    if passed != n_test:
                        raise BenchError(f"the streamed pass returned {passed} rows for {n_test} eval samples")
                    row["keras"] = {"fit_s": fit_s, "predict_s": predict_s, "predict_cpu_s": predict_cpu_s}
                    row["job_pass"] = {"predict_s": pass_s, "predict_cpu_s": pass_cpu_s}
            rounds.append(row)
            _log(f"speed round {index + 1}/{cfg['repeats']}: {json.dumps(row)}")
    trained = steps * BATCH

    def med(values: list[float]) -> float:
        return statistics.median(values)

    job_fit = med([trained / r["job"]["fine_tune_s"] for r in rounds])
    keras_fit = med([trained / r["keras"]["fit_s"] for r in rounds])
    job_eval = med([n_test / r["job"]["evaluate_s"] for r in rounds])
    keras_eval = med([n_test / r["keras"]["predict_s"] for r in rounds])
    pass_eval = med([n_test / r["job_pass"]["predict_s"] for r in rounds])
    pass_cpu = med([r["job_pass"]["predict_cpu_s"] for r in rounds])
    keras_cpu = med([r["keras"]["predict_cpu_s"] for r in rounds])
    s3_fit = med([trained / r["s3"]["fine_tune_s"] for r in rounds])
    return {
        "rounds": rounds,
        "steps": steps,
        "batch_size": BATCH,
        "n_train": len(train["y"]),
        "n_test": n_test,
        "train_shards": len(train_manifest["shards"]),
        "train_bytes": sum(int(s["size"]) for s in train_manifest["shards"]),
        "samples_per_s": {
            "job_fine_tune": job_fit,
            "keras_fit": keras_fit,
            "job_evaluate": job_eval,
            "keras_predict": keras_eval,
            "job_predict_pass": pass_eval,
            "job_fine_tune_s3": s3_fit,
        },
        "cpu_s": {"job_predict_pass": pass_cpu, "keras_predict": keras_cpu},
        "ratios": {
            "fine_tune": job_fit / keras_fit,
            "evaluate": job_eval / keras_eval,
            "predict_pass": pass_eval / keras_eval,
            "predict_pass_cpu": keras_cpu / pass_cpu,  # > 1: the job's pass costs less CPU than predict
            "s3_vs_local": s3_fit / job_fit,
        },
    }


# -- (d) -----------------------------------------------------------------------------------------------------


def run_forms(
    model_root: Path, train: dict[str, Any], test: dict[str, Any], cfg: dict[str, Any], work: Path
) -> dict[str, Any]:
    """The recommended job at 90% on the same samples as .npz (in memory), TFRecord and PNG folder (streamed)."""
    saved = model_root / "saved_model"
    specs = input_specs_of(saved)
    settings = local_settings(work / "data")
    spec = {"target_sparsity": 0.9, "preset": "recommended", "evaluation": {"latency": LATENCY}}
    prepared: dict[str, tuple[Any, Any]] = {}
    tick = time.perf_counter()
    prepared["npz"] = (  # as the worker reads a small .npz: np.load, every array
        dict(np.load(write_npz(work / "npz" / "train.npz", train))),
        dict(np.load(write_npz(work / "npz" / "test.npz", test))),
    )
    streams: dict[str, list[Any]] = {"tfrecord": [], "image_folder": []}
    for role, arrays in (("train", train), ("test", test)):
        written = write_shards(arrays, work / "tfrecord" / role, cfg["shard_bytes"])
        streams["tfrecord"].append(
            manifest_of(f"file://{work / 'tfrecord' / role}/", written["description"], settings)
        )
        folder = write_png_folder(arrays, work / "png" / role)
        converted = convert_folder(folder, work / "png-shards" / role, cfg["shard_bytes"])
        streams["image_folder"].append(
            manifest_of(
                f"file://{work / 'png-shards' / role}/",
                converted["description"],
                settings,
                converted["class_names"],
            )
        )
    prepare_s = time.perf_counter() - tick
    runs: dict[str, dict[str, Any]] = {}
    for form in ("npz", "tfrecord", "image_folder"):
        seeded: list[dict[str, Any]] = []
        for seed in cfg["forms_seeds"]:
            if form == "npz":
                train_in, test_in = prepared["npz"]
            else:
                train_in, test_in = (open_streamed(m, settings, specs) for m in streams[form])
            tick = time.perf_counter()
            doc = run_job(saved, {**spec, "seed": seed}, train_in, test_in, work / f"job-{form}-{seed}")
            seeded.append(
                {
                    "seed": seed,
                    "baseline_accuracy": doc["baseline"]["metrics"]["accuracy"],
                    "accuracy": doc["pruned"]["metrics"]["accuracy"],
                    "sparsity": doc["pruned"].get("sparsity"),
                    "fine_tune_s": doc["timings_s"].get("fine_tune"),
                    "job_s": time.perf_counter() - tick,
                }
            )
            _log(f"form {form}: {json.dumps(seeded[-1])}")
        # The mean over seeds: one run's accuracy moves with the order samples come in, which differs between
        # an in-memory permutation and streamed shards even with the same seed.
        runs[form] = {
            "streamed": form != "npz",
            "seeds": seeded,
            "baseline_accuracy": seeded[0]["baseline_accuracy"],
            "baselines": sorted({r["baseline_accuracy"] for r in seeded}),
            "accuracy": statistics.mean(r["accuracy"] for r in seeded),
            "sparsity": seeded[0]["sparsity"],
            "fine_tune_s": statistics.mean(r["fine_tune_s"] for r in seeded),
        }
    accuracies = [r["accuracy"] for r in runs.values()]
    baselines = {b for r in runs.values() for b in r["baselines"]}
    spread = (max(accuracies) - min(accuracies)) * 100
    return {
        "spec": spec,
        "runs": runs,
        "n_train": len(train["y"]),
        "n_test": len(test["y"]),
        "spread_points": spread,
        "baselines_identical": len(baselines) == 1,
        "prepare_s": prepare_s,
    }


# -- the section ---------------------------------------------------------------------------------------------


def run_datasets(
    smoke: bool = False,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = {**(SMOKE if smoke else DEFAULTS), **(overrides or {})}
    work = work_dir or Path(tempfile.mkdtemp(prefix="bench-datasets-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tick = time.perf_counter()
        model_root, model = cached_fashion_cnn(cfg["n_train"], cfg["model_epochs"], cache_dir)
        _log(f"model: {model} ({time.perf_counter() - tick:.0f} s)")
        train, test = fashion(cfg["n_train"], cfg["n_test"])
        speed = run_speed(model_root, train, test, cfg, work / "speed")
        forms = None
        if cfg["forms"]:
            forms_train, forms_test = fashion(cfg["forms_n_train"], cfg["forms_n_test"])
            forms = run_forms(model_root, forms_train, forms_test, cfg, work / "forms")
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratios = speed["ratios"]
    goals = {
        "fine_tune": {
            "ratio": ratios["fine_tune"],
            "goal": SPEED_GOAL,
            "met": ratios["fine_tune"] >= SPEED_GOAL,
        },
        "evaluate": {
            "ratio": ratios["evaluate"],
            "goal": SPEED_GOAL,
            "met": ratios["evaluate"] >= SPEED_GOAL,
        },
        "s3_vs_local": {
            "ratio": ratios["s3_vs_local"],
            "goal": S3_GOAL,
            "met": ratios["s3_vs_local"] >= S3_GOAL,
        },
    }
    if forms is not None:
        goals["forms"] = {
            "spread_points": forms["spread_points"],
            "goal": FORMS_GOAL_POINTS,
            "met": forms["spread_points"] <= FORMS_GOAL_POINTS and forms["baselines_identical"],
        }
    result: dict[str, Any] = {
        "smoke": smoke,
        "config": cfg,
        "model": model,
        "speed": speed,
        "forms": forms,
        "goals": goals,
    }
    result["markdown"] = markdown(result)
    return result


def _met(flag: bool) -> str:
    return "met" if flag else "**missed**"


def markdown(result: dict[str, Any]) -> str:
    speed, goals, model = result["speed"], result["goals"], result["model"]
    rate = speed["samples_per_s"]
    lines = [
        "### Streamed datasets: input speed, S3 vs local, one dataset in three forms\n",
        f"Fashion-MNIST: the first {speed['n_train']:,} train samples ({speed['train_shards']} TFRecord shards, "
        f"{speed['train_bytes'] / 1e6:.1f} MB, written by `convert_npz`), the first {speed['n_test']:,} test "
        f"samples as the eval set; a small CNN ({model['params']:,} parameters, {model['epochs']} epochs on the "
        f"same subset, test accuracy {model['test_accuracy']:.4f}). (b) and (c): {speed['steps']} fine-tuning steps "
        f"of batch {speed['batch_size']} per job, one-shot 50% magnitude, {len(speed['rounds'])} interleaved "
        "rounds, medians; every job is `run_pipeline` in-process on `open_for_job`'s `Streamed` input "
        "(`dataset_memory_bytes=0`). Method: the docstring of bench/datasets.py.\n",
        md_table(
            ["measure", "job (samples/s)", "reference (samples/s)", "ratio", "goal", ""],
            [
                [
                    "(b) fine-tuning, streamed TFRecord vs Keras `fit` on the same `TFRecordDataset` shards",
                    f"{rate['job_fine_tune']:,.0f}",
                    f"{rate['keras_fit']:,.0f}",
                    f"{goals['fine_tune']['ratio']:.2f}",
                    f">= {SPEED_GOAL:.2f}",
                    _met(goals["fine_tune"]["met"]),
                ],
                [
                    "(b) evaluation, streamed eval set vs Keras `predict`",
                    f"{rate['job_evaluate']:,.0f}",
                    f"{rate['keras_predict']:,.0f}",
                    f"{goals['evaluate']['ratio']:.2f}",
                    f">= {SPEED_GOAL:.2f}",
                    _met(goals["evaluate"]["met"]),
                ],
                [
                    "(b) of which the prediction pass alone (reader + model; no scoring, fidelity or latency)",
                    f"{rate['job_predict_pass']:,.0f}",
                    f"{rate['keras_predict']:,.0f}",
                    f"{speed['ratios']['predict_pass']:.2f}",
                    "(context)",
                    "",
                ],
                [
                    "(b) the same pass in CPU seconds of the process (Keras CPU-s / job CPU-s; robust to other "
                    "load on shared cores)",
                    f"{speed['cpu_s']['job_predict_pass']:.3f} CPU-s",
                    f"{speed['cpu_s']['keras_predict']:.3f} CPU-s",
                    f"{speed['ratios']['predict_pass_cpu']:.2f}",
                    "(context)",
                    "",
                ],
                [
                    "(c) fine-tuning, shards from S3 (SeaweedFS, loopback) vs local shards",
                    f"{rate['job_fine_tune_s3']:,.0f}",
                    f"{rate['job_fine_tune']:,.0f}",
                    f"{goals['s3_vs_local']['ratio']:.2f}",
                    f">= {S3_GOAL:.2f}",
                    _met(goals["s3_vs_local"]["met"]),
                ],
            ],
        ),
    ]
    forms = result["forms"]
    if forms is not None:
        rows = [
            [
                form,
                "streamed" if run["streamed"] else "in memory",
                f"{run['baseline_accuracy']:.4f}",
                f"{run['accuracy']:.4f} (" + " / ".join(f"{r['accuracy']:.4f}" for r in run["seeds"]) + ")",
                f"{run['fine_tune_s']:.1f}",
            ]
            for form, run in forms["runs"].items()
        ]
        lines += [
            f"(d) {forms['n_train']:,} train / {forms['n_test']:,} eval samples (a PNG folder of "
            f"{forms['n_train'] + forms['n_test']:,} files) as `.npz`, TFRecord shards and a PNG image folder "
            "(converted by `convert_image_folder`); the same pixels in every form; the job "
            '`{"target_sparsity": 0.9, "preset": "recommended"}` (3 epochs, batch 32, distillation) with seeds '
            + ", ".join(str(r["seed"]) for r in next(iter(forms["runs"].values()))["seeds"])
            + " in each form:\n",
            md_table(
                ["form", "read", "baseline accuracy", "pruned accuracy: mean (per seed)", "fine-tuning s (mean)"],
                rows,
            ),
            f"Spread of the forms' mean pruned accuracies: {forms['spread_points']:.2f} points (goal <= "
            f"{FORMS_GOAL_POINTS} point: {_met(goals['forms']['met'])}); baselines identical in every form: "
            f"{'yes' if forms['baselines_identical'] else '**no**'}.\n",
        ]
    return "\n".join(lines)


# -- (a) memory ----------------------------------------------------------------------------------------------

CHILD_FLAG = "--rss-child"


def write_sized(base_dir: Path, out_dir: Path, target: int) -> dict[str, Any]:
    """Copies of the base shards, in turn, until ``target`` bytes (real copies: the bytes are on disk)."""
    base = sorted(base_dir.glob("*.tfrecord"))
    out_dir.mkdir(parents=True, exist_ok=True)
    total, count = 0, 0
    while total < target:
        src = base[count % len(base)]
        dest = out_dir / f"part-{count:06d}.tfrecord"
        shutil.copyfile(src, dest)
        total += dest.stat().st_size
        count += 1
    return {"bytes": total, "shards": count}


def child_main(args: dict[str, Any]) -> dict[str, Any]:
    """One job on a streamed set in this process; peak RSS after it (and after a full pass when asked)."""
    import resource

    saved = Path(args["saved_model"])
    manifest = json.loads(Path(args["manifest"]).read_text())
    settings = local_settings(Path(args["data_dir"]))
    specs = input_specs_of(saved)
    tick = time.perf_counter()
    doc = run_job(
        saved,
        speed_spec(args["steps"], args["eval"]),
        open_streamed(manifest, settings, specs),
        open_streamed(manifest, settings, specs),
        Path(args["data_dir"]) / "job",
    )
    out: dict[str, Any] = {
        "job_s": time.perf_counter() - tick,
        "timings_s": doc["timings_s"],
        "accuracy": (doc["pruned"]["metrics"] or {}).get("accuracy"),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    if args.get("full_pass"):
        from app.storage import Storage
        from worker.data.sources import open_source
        from worker.data.stream import StreamedSet

        source = open_source(
            manifest["root"], storage=Storage(settings.data_dir), settings=settings, allowed=None
        )
        reader = StreamedSet(manifest, source, input_specs=specs)
        tick, records = time.perf_counter(), 0
        for item in reader.batches(1024, shuffle=False):
            records += int(item[1].shape[0])
        seconds = time.perf_counter() - tick
        out["full_pass"] = {
            "records": records,
            "seconds": seconds,
            "records_per_s": records / seconds,
            "peak_rss_kib_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
    return out


def run_child(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_json_child("bench.datasets", CHILD_FLAG, args, timeout, "memory")


def run_memory(
    smoke: bool = False,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
    small_bytes: int | None = None,
    large_bytes: int | None = None,
) -> dict[str, Any]:
    """(a): the same job on a small and a large streamed set, each in its own subprocess; peak RSS ratio."""
    cfg = dict(MEMORY_SMOKE if smoke else MEMORY_DEFAULTS)
    cfg["small_bytes"] = small_bytes or cfg["small_bytes"]
    cfg["large_bytes"] = large_bytes or cfg["large_bytes"]
    work = work_dir or Path(tempfile.mkdtemp(prefix="bench-datasets-memory-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (
        max(40 * GB, cfg["small_bytes"] + cfg["large_bytes"] + 9 * GB)
        if cfg["large_bytes"] >= 30 * GB
        else (cfg["small_bytes"] + cfg["large_bytes"] + 2 * GB)
    )
    _log(f"memory: work directory {work} ({free / 1e9:.0f} GB free, {need / 1e9:.0f} GB needed)")
    if free < need:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise BenchError(
            f"{free / 1e9:.0f} GB free under {work}: the {cfg['large_bytes'] / 1e9:.1f} GB dataset run needs "
            f"{need / 1e9:.0f} GB"
        )
    try:
        model_root, model = cached_fashion_cnn(
            SMOKE["n_train"] if smoke else DEFAULTS["n_train"],
            SMOKE["model_epochs"] if smoke else DEFAULTS["model_epochs"],
            cache_dir,
        )
        train, test = fashion(None, None)
        every = {"x": np.concatenate([train["x"], test["x"]]), "y": np.concatenate([train["y"], test["y"]])}
        base_bytes = int(min(16 << 20, max(256 << 10, cfg["small_bytes"] // 4)))
        written = write_shards(every, work / "base", base_bytes)
        settings = local_settings(work / "data")
        sets: dict[str, dict[str, Any]] = {}
        for name in ("small", "large"):
            tick = time.perf_counter()
            sized = write_sized(work / "base", work / name, cfg[f"{name}_bytes"])
            sized["write_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            manifest = manifest_of(f"file://{work / name}/", written["description"], settings)
            sized["manifest_s"] = time.perf_counter() - tick
            sized["records"] = manifest["n_samples"]
            (work / f"{name}.manifest.json").write_text(json.dumps(manifest))
            sets[name] = sized
            _log(f"memory: {name} set {sized}")
        for name in ("small", "large"):
            args = {
                "saved_model": str(model_root / "saved_model"),
                "manifest": str(work / f"{name}.manifest.json"),
                "data_dir": str(work / f"child-{name}"),
                "steps": cfg["steps"],
                "eval": cfg["eval"],
                "full_pass": name == "large",
            }
            sets[name]["child"] = run_child(args, timeout=6 * 3600)
            _log(f"memory: {name} child {sets[name]['child']}")
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("base", "small", "large"):
                shutil.rmtree(work / name, ignore_errors=True)
    ratio = sets["large"]["child"]["peak_rss_kib"] / sets["small"]["child"]["peak_rss_kib"]
    result: dict[str, Any] = {
        "smoke": smoke,
        "config": cfg,
        "model": model,
        "sets": sets,
        "goal": {"ratio": ratio, "goal": RSS_GOAL, "met": ratio <= RSS_GOAL},
    }
    result["markdown"] = memory_markdown(result)
    return result


def memory_markdown(result: dict[str, Any]) -> str:
    cfg, sets, goal = result["config"], result["sets"], result["goal"]
    rows = []
    for name in ("small", "large"):
        s = sets[name]
        rows.append(
            [
                name,
                f"{s['bytes'] / 1e9:.3f} GB",
                f"{s['records']:,}",
                s["shards"],
                f"{s['child']['peak_rss_kib'] / 1024:,.0f} MiB",
                f"{s['child']['timings_s'].get('fine_tune', 0):.1f}",
                f"{s['child']['job_s']:.1f}",
            ]
        )
    full = sets["large"]["child"]["full_pass"]
    scaled_down = cfg["large_bytes"] < MEMORY_DEFAULTS["large_bytes"]
    caveat = (
        f"**Scaled-down run** ({cfg['small_bytes'] / 1e9:g} GB vs {cfg['large_bytes'] / 1e9:g} GB) that proves the "
        f"code path; the section's own sizes ({MEMORY_DEFAULTS['small_bytes'] / 1e9:g} GB vs "
        f"{MEMORY_DEFAULTS['large_bytes'] / 1e9:g} GB, `python -m bench.run --only datasets_memory`, needs 40 GB "
        "free disk) have not been run yet.\n"
        if scaled_down
        else ""
    )
    return "\n".join(
        [
            "### Worker memory vs dataset size (streamed TFRecord)\n",
            *([caveat] if caveat else []),
            f"The same job on each set in its own subprocess: one-shot 50% magnitude, {cfg['steps']} fine-tuning "
            f"steps of batch {BATCH} on the streamed set, evaluation of {cfg['eval']:,} samples of it "
            "(`evaluation.max_samples`); peak RSS = the subprocess's `ru_maxrss` after the job. The sets repeat "
            "the 70,000 Fashion-MNIST records (serialized uint8 tensors) to size. Method: bench/datasets.py.\n",
            md_table(["set", "size", "records", "shards", "peak RSS", "fine-tuning s", "job s"], rows),
            f"Peak RSS large / small: {goal['ratio']:.3f} (goal <= {RSS_GOAL:.2f}: {_met(goal['met'])}). One full "
            f"streamed pass over the large set (`StreamedSet.batches(1024)`, in order): {full['records']:,} "
            f"records in {full['seconds']:.1f} s ({full['records_per_s']:,.0f} records/s, "
            f"{sets['large']['bytes'] / full['seconds'] / 1e6:,.0f} MB/s); peak RSS after it "
            f"{full['peak_rss_kib_after'] / 1024:,.0f} MiB.\n",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    from bench.results import write_section

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(child_main(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="(a), the opt-in datasets_memory section")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; writes bench/out/RESULTS.<name>-smoke.md"
    )
    parser.add_argument("--small-gb", type=float, default=None, help="(a) small set (default 1)")
    parser.add_argument("--large-gb", type=float, default=None, help="(a) large set (default 30)")
    parser.add_argument("--n-train", type=int, default=None, help="(b)/(c) train subset")
    parser.add_argument("--n-test", type=int, default=None, help="(b)/(c) eval subset")
    parser.add_argument("--steps", type=int, default=None, help="(b)/(c) fine-tuning steps")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    tick = time.perf_counter()
    if args.memory:
        name = "datasets_memory"
        result = run_memory(
            smoke=args.smoke,
            work_dir=args.work,
            small_bytes=int(args.small_gb * GB) if args.small_gb else None,
            large_bytes=int(args.large_gb * GB) if args.large_gb else None,
        )
    else:
        name = "datasets"
        overrides = {
            key: value
            for key, value in (("n_train", args.n_train), ("n_test", args.n_test), ("steps", args.steps))
            if value is not None
        }
        result = run_datasets(smoke=args.smoke, work_dir=args.work, overrides=overrides)
    result["bench_wall_s"] = time.perf_counter() - tick
    print(result["markdown"])
    if not args.no_write:
        path = write_section(name, result, args.smoke)
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
