"""The tfmot side of the quality comparison, run as its own process: ``python -m bench.tfmot_side CMD ...``.

tfmot 0.8 needs Keras 2 (``tf_keras``) and ``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is imported, which
switches ``tf.keras`` for the whole process. So this module runs only in a subprocess started by
``bench.tfmot_quality`` (``run_side``), never imported by the service, the worker or the benchmark driver.
tfmot and tf_keras are bench-only extras (``pip install -e '.[bench]'``).

Commands (JSON on stdout, progress on stderr):

- ``baseline --out DIR --epochs E --seed S``: builds the digits CNN in tf_keras, trains it, writes
  ``DIR/weights.npz`` (``w0``, ``w1``, ... in ``get_weights()`` order: the Keras 3 twin loads the same arrays),
  and the dense model zipped the two ways tfmot users do (``.h5`` as in tfmot's tutorial, and a SavedModel).
- ``prune --weights W --cells CELLS.json --out DIR``: for every cell ``{"sparsity", "epochs", "seed",
  "batch_size", "learning_rate", "end_step", "frequency"}`` (optionally ``"split"`` and that split's
  ``"weights"``): the baseline weights, ``prune_low_magnitude``
  with ``PolynomialDecay(0 -> sparsity, power 3, begin 0, end_step, frequency)``,
  ``model.fit`` with Adam (constant learning rate) and ``UpdatePruningStep``, ``strip_pruning``, test accuracy,
  measured sparsity per kernel, and (cells with ``"sizes": true``) zip sizes of the stripped model (``.h5`` and
  SavedModel).

The data split and the architecture come from ``tests.support.model_factory`` (``digits_datasets``: scikit-learn digits,
stratified 75/25 with split seed ``--split``, 0 = the fixed split), so both sides see exactly the same arrays.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported anywhere in this process
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

N_CLASSES = 10


def build_cnn(seed: int) -> Any:
    """The digits CNN of ``tests.support.model_factory`` (same layers, names and order) in tf_keras."""
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    layers = tf_keras.layers
    return tf_keras.Sequential(
        [
            layers.Input(shape=(8, 8, 1), name="image"),
            layers.Conv2D(8, 3, padding="same", name="conv2d"),
            layers.BatchNormalization(name="batch_normalization"),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(32, activation="relu", name="dense"),
            layers.Dense(N_CLASSES, activation="softmax", name="dense_1"),
        ],
        name="digits_cnn",
    )


def zip_size(path: Path) -> int:
    """Bytes of ``path`` (a file or a directory) zipped with deflate (level 6, as the service zips)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "a.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                zf.write(file, file.name if path.is_file() else file.relative_to(path).as_posix())
        return archive.stat().st_size


def sizes(model: Any, work: Path) -> dict[str, int]:
    """Zip sizes of ``model`` saved as ``.h5`` (tfmot's tutorial: no optimizer) and as a SavedModel."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model.save(str(work / "model.h5"), include_optimizer=False)
    model.save(str(work / "saved_model"), include_optimizer=False)
    return {"h5_zip": zip_size(work / "model.h5"), "saved_model_zip": zip_size(work / "saved_model")}


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == y))


def cmd_baseline(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support import model_factory

    train, test = model_factory.digits_datasets(seed=args.split)
    model = build_cnn(args.seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    tick = time.perf_counter()
    model.fit(train["x"], train["y"], epochs=args.epochs, batch_size=32, verbose=0)
    train_s = time.perf_counter() - tick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = model.get_weights()
    np.savez(out / "weights.npz", **{f"w{i}": w for i, w in enumerate(weights)})
    return {
        "accuracy": accuracy(model, test["x"], test["y"]),
        "train_s": train_s,
        "epochs": args.epochs,
        "seed": args.seed,
        "split": args.split,
        "weight_shapes": [list(w.shape) for w in weights],
        "dense_sizes": sizes(model, out / "dense"),
    }


def load_weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as npz:
        return [npz[f"w{i}"] for i in range(len(npz.files))]


def prune_cell(cell: dict[str, Any], weights: list[np.ndarray], out: Path) -> dict[str, Any]:
    """One tfmot run: baseline weights -> prune_low_magnitude + PolynomialDecay + fit -> strip -> measure."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    from tests.support import model_factory

    train, test = model_factory.digits_datasets(seed=cell.get("split", 0))
    model = build_cnn(cell["seed"])
    model.set_weights(weights)
    steps = cell["epochs"] * math.ceil(len(train["y"]) / cell["batch_size"])
    end_step = cell["end_step"]
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=cell["sparsity"],
        begin_step=0,
        end_step=end_step,
        power=3,
        frequency=cell["frequency"],
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(cell["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    tf_keras.utils.set_random_seed(cell["seed"])  # the shuffling order of fit
    tick = time.perf_counter()
    pruned.fit(
        train["x"],
        train["y"],
        epochs=cell["epochs"],
        batch_size=cell["batch_size"],
        shuffle=True,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    fit_s = time.perf_counter() - tick
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    kernels = {w.name: w.numpy() for w in stripped.weights if w.name.endswith("kernel:0")}
    zeros = sum(int(np.sum(k == 0)) for k in kernels.values())
    total = sum(k.size for k in kernels.values())
    tag = f"split{cell.get('split', 0)}_s{cell['sparsity']}_e{cell['epochs']}_seed{cell['seed']}"
    return {
        **cell,
        "accuracy": accuracy(stripped, test["x"], test["y"]),
        "sparsity_measured": zeros / total,
        "kernel_sparsity": {n: float(np.mean(k == 0)) for n, k in kernels.items()},
        "end_step": end_step,
        "steps": steps,
        "fit_s": fit_s,
        "fit_samples_per_s": steps * cell["batch_size"] / fit_s,
        "sizes": sizes(stripped, out / tag) if cell.get("sizes") else None,
    }


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    cells = json.loads(Path(args.cells).read_text())
    out = Path(args.out)
    results = []
    for cell in cells:
        weights = load_weights(Path(cell.get("weights", args.weights)))
        results.append(prune_cell(cell, weights, out))
        print(
            f"[tfmot] sparsity {cell['sparsity']} epochs {cell['epochs']} seed {cell['seed']}: "
            f"accuracy {results[-1]['accuracy']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    return {
        "cells": results,
        "versions": {
            "tensorflow_model_optimization": tfmot.__version__,
            "tf_keras": tf_keras.__version__,
            "tensorflow": tf.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tfmot_side")
    sub = parser.add_subparsers(dest="cmd", required=True)
    base = sub.add_parser("baseline")
    base.add_argument("--out", required=True)
    base.add_argument("--epochs", type=int, default=20)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--split", type=int, default=0, help="digits_datasets split seed (0: the fixed split)")
    prune = sub.add_parser("prune")
    prune.add_argument("--weights", required=True)
    prune.add_argument("--cells", required=True)
    prune.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = cmd_baseline(args) if args.cmd == "baseline" else cmd_prune(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
