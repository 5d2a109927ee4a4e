"""Issue 21: pruning from calibration data alone (Wanda, SparseGPT, least-squares channel repair), measured.

Section ``calibration`` (``python -m bench.run --only calibration`` or ``python -m bench.calibration``). Every
job is ``worker.pipeline.run_pipeline`` in this process (the worker's own entry point, as bench/compaction.py and
bench/datasets.py run it), with the spec resolved as the API resolves it (``app.schemas.presets.resolve``); the
calibration set is passed as the job's calibration dataset (inputs only, no labels) -- through
``run_pipeline``'s ``calibration`` argument when the worker has one, else as the train dataset, which the
service then uses for calibration (the rule of ``POST /v1/jobs``: without ``calibration_dataset_id`` the train
dataset serves). One-shot, no fine-tuning, unless said. Calibration: 128 samples (``spec.calibration:
{"samples": 128, "batch_size": 32}``), seeded.

- **(a) language model** (bench/charlm.py: a char-level transformer, ~0.45 M parameters, context 128, trained
  here on the Python standard library's source, held-out files for scoring). Jobs at 50% unstructured and at
  2:4 with ``magnitude``, ``wanda`` and ``sparsegpt``, layer scope, ``include: ["block"]`` (the q/k/v/o
  attention and MLP kernels of both blocks; embeddings and head stay dense). Held-out perplexity of each
  artifact, computed here from the artifact's ``serving_default``. Ratio = (ppl - dense) / (magnitude's ppl -
  dense); goals: sparsegpt <= 0.5 (50%) and <= 0.3 (2:4); wanda <= 1.0 (no worse than magnitude).
- **(b) Fashion-MNIST CNN** (bench/datasets.py's ``fashion_cnn``, no BatchNorm, trained on all 60,000 train
  images); accuracy on the 10,000 test images. 2:4: sparsegpt vs magnitude, both layer scope; goal: drop
  ratio <= 1/3. 95% unstructured: sparsegpt vs the ``fast`` preset today (magnitude, global LAMP); sparsegpt runs
  under ``preset: fast`` too, resolved as the service resolves it for that criterion (what a user who names
  only the criterion gets); goal: drop ratio <= 1/2. Beside it, sparsegpt at the per-layer sparsities the
  ``fast`` job's global LAMP ranking chose (read from that job's per-layer rows, given as ``layer_sparsity``):
  the allocation of ``fast`` with sparsegpt's per-op reconstruction. ``wanda`` is reported beside both (no
  goal).
- **(c) channel repair one-shot**: a BatchNorm variant of the CNN (``fashion_bn_cnn`` below: BatchNorm after
  each conv), 30% of channels removed and compacted (``{"granularity": "channel", "preset": "fast"}``) with and
  without ``reconstruct: true``; goal: drop with reconstruct <= 1/2 of the drop without.
- **(d) repair, then fine-tuning**: the same BN CNN, 50% of channels compacted, ``preset: recommended`` (3 epochs,
  distillation) on a 20k train subset: the preset as it is today (polynomial schedule), one-shot + the same
  fine-tuning without repair, and one-shot + ``reconstruct`` + fine-tuning (the repaired model is where
  fine-tuning starts); goal: repaired drop <= 1 point.
- **(e) cost**: keras.applications ResNet-50 (random weights, seeded), 128 random calibration images, a
  ``sparsegpt`` job (50% unstructured, layer scope) vs a magnitude one-shot job (same spec, criterion
  ``magnitude``) on the same data; each job in its own subprocess (``--child``), wall time of ``run_pipeline``
  and peak RSS (``ru_maxrss``) of that process; goal: time ratio <= 5.

Criteria or fields the installed worker does not know yet (the vocabulary's ``CRITERIA`` and ``PruneSpec``'s
fields decide) are not run: their rows say so, and their goals are "not measured" -- never a fallback to
another method under the same name.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.charlm import SMOKE_LM, LMConfig, cached_char_lm, calibration_inputs, perplexity
from bench.common import ROOT, md_table, run_json_child

SAMPLES, BATCH = 128, 32
# bench.common.export_keras_application's models -> their input shape (one image)
INPUT_SHAPES = {"resnet50": (224, 224, 3), "mobilenetv2": (224, 224, 3), "small_mobilenet": (32, 32, 3)}
CHILD_FLAG = "--child"
LATENCY = {
    "batch_sizes": [1],
    "runs": 1,
    "warmup": 0,
    "budget_s": 0.05,
}  # the evaluate stage's probe, kept small
GOALS = {
    "lm_unstructured": 0.5,
    "lm_nm": 0.3,
    "lm_wanda_unstructured": 1.0,
    "lm_wanda_nm": 1.0,
    "cnn_nm": 1 / 3,
    "cnn_95": 0.5,
    "channel_repair": 0.5,
    "repair_fine_tune_points": 1.0,
    "resnet_time": 5.0,
}
FULL: dict[str, Any] = {
    "lm": LMConfig(),
    "samples": SAMPLES,
    "cnn_train": 60_000,
    "cnn_epochs": 4,
    "n_test": 10_000,
    "subset": 20_000,  # (d)'s fine-tuning set
    "resnet": "resnet50",
    "resnet_samples": SAMPLES,
}
SMOKE: dict[str, Any] = {
    "lm": SMOKE_LM,
    "samples": 16,
    "cnn_train": 512,
    "cnn_epochs": 1,
    "n_test": 256,
    "subset": 256,
    "resnet": "small_mobilenet",
    "resnet_samples": 8,
}


def _log(message: str) -> None:
    print(f"[calibration] {message}", file=sys.stderr, flush=True)


# -- what the installed service offers ------------------------------------------------------------------------


def unavailable(spec: dict[str, Any]) -> str | None:
    """Why this worker cannot run ``spec`` as asked (a criterion or field it does not know yet), else None."""
    from app.schemas.spec import PruneSpec
    from app.schemas.vocabulary import CRITERIA

    criterion = spec.get("criterion")
    if criterion is not None and criterion not in CRITERIA:
        return f"criterion {criterion!r} is not in this build's vocabulary"
    for name in ("reconstruct", "calibration"):
        if name in spec and name not in PruneSpec.model_fields:
            return f"spec field {name!r} is not in this build's PruneSpec"
    return None


def _with_calibration(spec: dict[str, Any], samples: int) -> dict[str, Any]:
    """``spec`` plus ``calibration`` when the criterion or ``reconstruct`` uses calibration data."""
    needs = spec.get("criterion") in ("wanda", "sparsegpt") or spec.get("reconstruct")
    return {**spec, "calibration": {"samples": samples, "batch_size": BATCH}} if needs else dict(spec)


def run_job(
    saved_model: Path,
    spec: dict[str, Any],
    *,
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
    calibration: dict[str, np.ndarray] | None,
    out: Path,
    score: Any = None,
) -> dict[str, Any]:
    """One job through ``run_pipeline``; ``score(artifact_dir)`` runs on the artifact before it is removed.

    Returns the metrics document's parts the tables read, ``wall_s`` (the ``run_pipeline`` call) and
    ``score``'s result."""
    from app.schemas.presets import resolve
    from app.schemas.spec import PruneSpec
    from worker.pipeline import run_pipeline

    takes_calibration = "calibration" in inspect.signature(run_pipeline).parameters
    job_train = train
    if calibration is not None and not takes_calibration and train is None:
        job_train = calibration  # the train dataset serves as calibration data
    flags = {"has_train": train is not None}
    if "has_calibration" in inspect.signature(resolve).parameters:
        flags["has_calibration"] = calibration is not None and takes_calibration
    resolved = resolve(PruneSpec.model_validate(spec), **flags)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    extra = {"calibration": calibration} if takes_calibration else {}
    try:
        tick = time.perf_counter()
        doc = run_pipeline(
            saved_model, resolved, job_train, evaluation, out, lambda stage, progress: None, **extra
        )
        wall = time.perf_counter() - tick
        scored = score(out / "saved_model") if score is not None else None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    metrics = (doc.get("pruned") or {}).get("metrics") or {}
    return {
        "spec": resolved.model_dump(mode="json", exclude_none=True),
        "wall_s": wall,
        "timings_s": doc.get("timings_s", {}),
        "accuracy": metrics.get("accuracy"),
        "baseline_accuracy": ((doc.get("baseline") or {}).get("metrics") or {}).get("accuracy"),
        "sparsity": (doc.get("pruned") or {}).get("sparsity"),
        "notes": doc.get("notes", []),
        "methods": _methods(doc),
        "layer_sparsity": {row["name"]: row["sparsity"] for row in doc.get("layers") or [] if "name" in row},
        "score": scored,
    }


def _methods(doc: dict[str, Any]) -> dict[str, int]:
    """How many variables each method pruned, from the per-layer rows (a ``method`` or ``criterion`` key)."""
    counts: dict[str, int] = {}
    for row in doc.get("layers") or []:
        method = row.get("method") or row.get("criterion")
        if method:
            counts[str(method)] = counts.get(str(method), 0) + 1
    return counts


def _skip(spec: dict[str, Any], why: str) -> dict[str, Any]:
    _log(f"skipped {json.dumps(spec)}: {why}")
    return {"spec": spec, "skipped": why}


def _ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` (both harms: drops or perplexity increases); None when either is missing or the
    reference did no harm (a ratio of harms is undefined then)."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _goal(ratio: float | None, goal: float) -> dict[str, Any]:
    return {"ratio": ratio, "goal": goal, "met": None if ratio is None else bool(ratio <= goal)}


# -- models ---------------------------------------------------------------------------------------------------


def fashion_bn_cnn(seed: int = 0) -> Any:
    """The Fashion-MNIST CNN with BatchNorm after every conv (convs without bias, as BN makes it redundant)."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="image"),
            layers.Rescaling(1.0 / 255.0, name="rescale"),
            layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.ReLU(name="relu1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2"),
            layers.BatchNormalization(name="bn2"),
            layers.ReLU(name="relu2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Conv2D(64, 3, padding="same", use_bias=False, name="conv3"),
            layers.BatchNormalization(name="bn3"),
            layers.ReLU(name="relu3"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dense(10, activation="softmax", name="logits"),
        ],
        name="fashion_bn_cnn",
    )


def build_fashion_bn_cnn(root: Path, n_train: int, epochs: int, seed: int) -> dict[str, Any]:
    """A ``cached_model`` builder: trained on the first ``n_train`` train images, ``root/saved_model``."""
    import keras

    from bench.datasets import fashion

    train, test = fashion(n_train, None)
    model = fashion_bn_cnn(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    tick = time.perf_counter()
    model.fit(train["x"].astype(np.float32), train["y"], batch_size=64, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - tick
    _, accuracy = model.evaluate(test["x"].astype(np.float32), test["y"], batch_size=512, verbose=0)
    model.export(str(root / "saved_model"), verbose=False)
    return {
        "n_train": n_train,
        "epochs": epochs,
        "seed": seed,
        "params": int(model.count_params()),
        "test_accuracy": float(accuracy),
        "train_s": seconds,
    }


def _models(cfg: dict[str, Any], cache_dir: Path | None) -> dict[str, tuple[Path, dict[str, Any]]]:
    from bench.common import export_and_zip, export_keras_application
    from bench.datasets import cached_fashion_cnn
    from tests.support.model_cache import cached_model

    models = {}
    tick = time.perf_counter()
    models["lm"] = cached_char_lm(cfg["lm"], cache_dir)
    _log(f"char LM ready in {time.perf_counter() - tick:.0f} s: {models['lm'][1]}")
    models["cnn"] = cached_fashion_cnn(cfg["cnn_train"], cfg["cnn_epochs"], cache_dir)
    models["bn_cnn"] = cached_model(
        build_fashion_bn_cnn, cfg["cnn_train"], cfg["cnn_epochs"], 0, cache_dir=cache_dir
    )
    models["resnet"] = cached_model(
        export_and_zip, export_keras_application, cfg["resnet"], cache_dir=cache_dir
    )
    return models


# -- (a) language model --------------------------------------------------------------------------------------


def lm_spec(criterion: str, granularity: str, samples: int) -> dict[str, Any]:
    spec = {
        "target_sparsity": 0.5,
        "criterion": criterion,
        "granularity": granularity,
        "scope": "layer",
        "normalization": "none",
        "schedule": {"kind": "one_shot"},
        "include": ["block"],
        "evaluation": {"latency": LATENCY},
    }
    return _with_calibration(spec, samples)


def run_lm(root: Path, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    lm: LMConfig = cfg["lm"]
    saved = root / "saved_model"
    calib = calibration_inputs(lm, cfg["samples"])
    dense = perplexity(saved, lm)
    rows: dict[str, dict[str, Any]] = {}
    for granularity in ("unstructured", "2:4"):
        for criterion in ("magnitude", "wanda", "sparsegpt"):
            key = f"{criterion}@{granularity}"
            spec = lm_spec(criterion, granularity, cfg["samples"])
            why = unavailable(spec)
            if why:
                rows[key] = _skip(spec, why)
                continue
            run = run_job(
                saved,
                spec,
                train=None,
                evaluation=None,
                calibration=calib,
                out=work / "lm-job",
                score=lambda artifact: perplexity(artifact, lm),
            )
            run["perplexity"] = run.pop("score")
            run["increase"] = run["perplexity"] - dense
            rows[key] = run
            _log(f"LM {key}: perplexity {run['perplexity']:.3f} (dense {dense:.3f}) in {run['wall_s']:.1f} s")
    for granularity in ("unstructured", "2:4"):
        reference = rows[f"magnitude@{granularity}"].get("increase")
        for criterion in ("wanda", "sparsegpt"):
            row = rows[f"{criterion}@{granularity}"]
            row["ratio"] = _ratio(row.get("increase"), reference)
    return {"dense_perplexity": dense, "rows": rows}


# -- (b) CNN one-shot ----------------------------------------------------------------------------------------


def cnn_spec(
    criterion: str, granularity: str, target: float, samples: int, preset: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "target_sparsity": target,
        "criterion": criterion,
        "granularity": granularity,
        "evaluation": {"latency": LATENCY},
    }
    if preset is not None:
        spec["preset"] = preset
    else:
        spec.update({"scope": "layer", "normalization": "none", "schedule": {"kind": "one_shot"}})
    return _with_calibration(spec, samples)


def _accuracy_rows(
    saved: Path,
    specs: dict[str, dict[str, Any]],
    test: dict[str, np.ndarray],
    calib: dict[str, np.ndarray],
    work: Path,
    train: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key, spec in specs.items():
        why = unavailable(spec)
        if why:
            rows[key] = _skip(spec, why)
            continue
        run = run_job(saved, spec, train=train, evaluation=test, calibration=calib, out=work / "cnn-job")
        run["drop_points"] = 100.0 * (run["baseline_accuracy"] - run["accuracy"])
        rows[key] = run
        _log(
            f"{key}: accuracy {run['accuracy']:.4f} (baseline {run['baseline_accuracy']:.4f}) in {run['wall_s']:.1f} s"
        )
    return rows


def run_cnn(
    root: Path, cfg: dict[str, Any], calib: dict[str, np.ndarray], test: dict[str, np.ndarray], work: Path
) -> dict[str, Any]:
    n = cfg["samples"]
    specs = {
        "magnitude@2:4": cnn_spec("magnitude", "2:4", 0.5, n, None),
        "wanda@2:4": cnn_spec("wanda", "2:4", 0.5, n, None),
        "sparsegpt@2:4": cnn_spec("sparsegpt", "2:4", 0.5, n, None),
        "fast@95%": cnn_spec("magnitude", "unstructured", 0.95, n, "fast"),
        "wanda+fast@95%": cnn_spec("wanda", "unstructured", 0.95, n, "fast"),
        "sparsegpt+fast@95%": cnn_spec("sparsegpt", "unstructured", 0.95, n, "fast"),
    }
    rows = _accuracy_rows(root / "saved_model", specs, test, calib, work)
    # sparsegpt at the per-layer sparsities fast's global LAMP ranking chose (spec ``layer_sparsity``, one
    # anchored pattern per variable): the allocation of ``fast`` with sparsegpt's per-op reconstruction.
    allocation = {
        f"^{re.escape(name)}$": round(min(sparsity, 0.999), 4)
        for name, sparsity in rows["fast@95%"].get("layer_sparsity", {}).items()
        if sparsity > 0
    }
    allocated = {
        "sparsegpt+lamp_allocation@95%": {
            **cnn_spec("sparsegpt", "unstructured", 0.95, n, None),
            "layer_sparsity": allocation,
        }
    }
    rows.update(_accuracy_rows(root / "saved_model", allocated, test, calib, work))
    for key, reference in (
        ("wanda@2:4", "magnitude@2:4"),
        ("sparsegpt@2:4", "magnitude@2:4"),
        ("wanda+fast@95%", "fast@95%"),
        ("sparsegpt+fast@95%", "fast@95%"),
        ("sparsegpt+lamp_allocation@95%", "fast@95%"),
    ):
        rows[key]["ratio"] = _ratio(rows[key].get("drop_points"), rows[reference].get("drop_points"))
    return {"rows": rows}


# -- (c) and (d) channel repair ------------------------------------------------------------------------------


def run_repair(
    root: Path,
    cfg: dict[str, Any],
    calib: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    subset: dict[str, np.ndarray],
    work: Path,
) -> dict[str, Any]:
    n = cfg["samples"]
    one_shot = {
        "target_sparsity": 0.3,
        "granularity": "channel",
        "preset": "fast",
        "evaluation": {"latency": LATENCY},
    }
    c_specs = {
        "channel30": one_shot,
        "channel30+reconstruct": _with_calibration({**one_shot, "reconstruct": True}, n),
    }
    c_rows = _accuracy_rows(root / "saved_model", c_specs, test, calib, work)
    c_rows["channel30+reconstruct"]["ratio"] = _ratio(
        c_rows["channel30+reconstruct"].get("drop_points"), c_rows["channel30"].get("drop_points")
    )
    tuned = {
        "target_sparsity": 0.5,
        "granularity": "channel",
        "preset": "recommended",
        "evaluation": {"latency": LATENCY},
    }
    d_specs = {
        "recommended": tuned,
        "recommended+one_shot": {**tuned, "schedule": {"kind": "one_shot"}},
        "recommended+one_shot+reconstruct": _with_calibration(
            {**tuned, "schedule": {"kind": "one_shot"}, "reconstruct": True}, n
        ),
    }
    d_rows = _accuracy_rows(root / "saved_model", d_specs, test, calib, work, train=subset)
    return {"one_shot": c_rows, "fine_tuned": d_rows}


# -- (e) cost on ResNet-50 ------------------------------------------------------------------------------------


def resnet_spec(criterion: str, samples: int) -> dict[str, Any]:
    spec = {
        "target_sparsity": 0.5,
        "criterion": criterion,
        "scope": "layer",
        "normalization": "none",
        "schedule": {"kind": "one_shot"},
        "evaluation": {"latency": LATENCY},
    }
    return _with_calibration(spec, samples)


def child_main(args: dict[str, Any]) -> dict[str, Any]:
    """One ResNet job in this fresh process: wall time of ``run_pipeline`` and the process's peak RSS."""
    import resource

    saved = Path(args["saved_model"])
    rng = np.random.default_rng(0)
    shape = [args["samples"], *INPUT_SHAPES[args["model"]]]
    calib = {"x": rng.uniform(0.0, 255.0, size=shape).astype(np.float32)}
    before = resource.getrusage(resource.RUSAGE_SELF)
    run = run_job(saved, args["spec"], train=None, evaluation=None, calibration=calib, out=Path(args["out"]))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": run["wall_s"],
        "timings_s": run["timings_s"],
        "sparsity": run["sparsity"],
        "methods": run["methods"],
        "notes": run["notes"],
        "peak_rss_kib": after.ru_maxrss,
        "rss_before_job_kib": before.ru_maxrss,
        # CPU seconds of the job (all threads): on a shared machine the wall time depends on the neighbours
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def run_child(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_json_child("bench.calibration", CHILD_FLAG, args, timeout, "ResNet job")


def run_cost(root: Path, cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for criterion in ("magnitude", "sparsegpt"):
        spec = resnet_spec(criterion, cfg["resnet_samples"])
        why = unavailable(spec)
        if why:
            rows[criterion] = _skip(spec, why)
            continue
        args = {
            "saved_model": str(root / "saved_model"),
            "spec": spec,
            "samples": cfg["resnet_samples"],
            "model": cfg["resnet"],
            "out": str(work / f"resnet-{criterion}"),
        }
        rows[criterion] = {"spec": spec, **run_child(args, timeout=3 * 3600)}
        _log(
            f"{cfg['resnet']} {criterion}: {rows[criterion]['wall_s']:.1f} s, peak {rows[criterion]['peak_rss_kib'] / 1024:.0f} MiB"
        )
    sparse = rows["sparsegpt"]
    if "wall_s" in sparse:
        sparse["ratio"] = _ratio(sparse["wall_s"], rows["magnitude"]["wall_s"])
        sparse["cpu_ratio"] = _ratio(sparse["cpu_s"], rows["magnitude"]["cpu_s"])
    return {"model": cfg["resnet"], "rows": rows}


# -- the section ---------------------------------------------------------------------------------------------


def run_calibration(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    from bench.datasets import fashion

    cfg = dict(SMOKE if smoke else FULL)
    work = work_dir or Path(tempfile.mkdtemp(prefix="bench-calibration-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = _models(cfg, cache_dir)
        train, test = fashion(None, cfg["n_test"])
        rng = np.random.default_rng(0)
        calib = {"x": train["x"][np.sort(rng.choice(len(train["y"]), size=cfg["samples"], replace=False))]}
        subset = {k: v[: cfg["subset"]] for k, v in train.items()}
        lm = run_lm(models["lm"][0], cfg, work)
        cnn = run_cnn(models["cnn"][0], cfg, calib, test, work)
        repair = run_repair(models["bn_cnn"][0], cfg, calib, test, subset, work)
        cost = run_cost(models["resnet"][0], cfg, work)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "smoke": smoke,
        "config": {k: (asdict(v) if isinstance(v, LMConfig) else v) for k, v in cfg.items()},
        "models": {name: meta for name, (_, meta) in models.items()},
        "lm": lm,
        "cnn": cnn,
        "repair": repair,
        "cost": cost,
    }
    result["goals"] = goals(result)
    result["markdown"] = render(result)
    return result


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    lm, cnn, repair, cost = (result[k] for k in ("lm", "cnn", "repair", "cost"))
    tuned = repair["fine_tuned"].get("recommended+one_shot+reconstruct", {})
    drop = tuned.get("drop_points")
    return {
        "lm_unstructured": _goal(lm["rows"]["sparsegpt@unstructured"].get("ratio"), GOALS["lm_unstructured"]),
        "lm_nm": _goal(lm["rows"]["sparsegpt@2:4"].get("ratio"), GOALS["lm_nm"]),
        "lm_wanda_unstructured": _goal(
            lm["rows"]["wanda@unstructured"].get("ratio"), GOALS["lm_wanda_unstructured"]
        ),
        "lm_wanda_nm": _goal(lm["rows"]["wanda@2:4"].get("ratio"), GOALS["lm_wanda_nm"]),
        "cnn_nm": _goal(cnn["rows"]["sparsegpt@2:4"].get("ratio"), GOALS["cnn_nm"]),
        "cnn_95": _goal(cnn["rows"]["sparsegpt+fast@95%"].get("ratio"), GOALS["cnn_95"]),
        "channel_repair": _goal(
            repair["one_shot"]["channel30+reconstruct"].get("ratio"), GOALS["channel_repair"]
        ),
        "repair_fine_tune_points": {
            "points": drop,
            "goal": GOALS["repair_fine_tune_points"],
            "met": None if drop is None else bool(drop <= GOALS["repair_fine_tune_points"]),
        },
        "resnet_time": _goal(cost["rows"]["sparsegpt"].get("ratio"), GOALS["resnet_time"]),
    }


# -- markdown ------------------------------------------------------------------------------------------------


def _met(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**missed**")


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _why(row: dict[str, Any]) -> str:
    return f"not run: {row['skipped']}"


def render(result: dict[str, Any]) -> str:
    models, lm, cnn, repair, cost, goal = (
        result[k] for k in ("models", "lm", "cnn", "repair", "cost", "goals")
    )
    lm_meta, cnn_meta, bn_meta = models["lm"], models["cnn"], models["bn_cnn"]
    cfg = result["config"]
    lines = [
        "### Pruning from calibration data alone (issue 21)\n",
        f"One-shot jobs through `run_pipeline` in-process, {cfg['samples']} calibration samples (inputs only, "
        f"batch {BATCH}), no fine-tuning unless said. Method: the docstring of bench/calibration.py.\n",
        f"Models (built here, cached): char-level transformer LM, {lm_meta['params']:,} parameters, context "
        f"{lm_meta['config']['context']}, {lm_meta['config']['blocks']} blocks, {lm_meta['config']['steps']} steps of "
        f"{lm_meta['config']['batch']} on {lm_meta['corpus']['chars']['train']:,} characters of "
        f"{lm_meta['corpus']['files']['train']} stdlib files (Python {lm_meta['python']}), trained in "
        f"{lm_meta['train_s']:.0f} s, held-out perplexity {lm_meta['held_out_perplexity']:.3f} on "
        f"{lm_meta['corpus']['files']['held_out']} held-out files; Fashion-MNIST CNN {cnn_meta['params']:,} "
        f"parameters, {cnn_meta['epochs']} epochs on {cnn_meta['n_train']:,} images in {cnn_meta['train_s']:.0f} s, "
        f"test accuracy {cnn_meta['test_accuracy']:.4f}; its BatchNorm variant {bn_meta['params']:,} parameters, "
        f"{bn_meta['train_s']:.0f} s, {bn_meta['test_accuracy']:.4f}.\n",
        f"**(a) Language model**, half of every attention (q/k/v/o) and MLP kernel's weights (50% unstructured "
        f"or 2:4, layer scope; embeddings and head dense), held-out perplexity (dense "
        f"{lm['dense_perplexity']:.3f}); ratio = increase / magnitude's increase:\n",
    ]
    rows = []
    for key, row in lm["rows"].items():
        criterion, granularity = key.split("@")
        if "skipped" in row:
            rows.append([granularity, criterion, _why(row), "", "", ""])
            continue
        rows.append(
            [
                granularity,
                criterion,
                f"{row['perplexity']:.3f}",
                f"{row['increase']:+.3f}",
                _x(row.get("ratio")) if criterion != "magnitude" else "1.00x",
                f"{row['wall_s']:.1f}",
            ]
        )
    lines.append(md_table(["granularity", "criterion", "perplexity", "increase", "ratio", "job s"], rows))
    lines.append(
        f"Goals: sparsegpt at 50% <= {GOALS['lm_unstructured']}x: {_x(goal['lm_unstructured']['ratio'])} "
        f"{_met(goal['lm_unstructured']['met'])}; at 2:4 <= {GOALS['lm_nm']}x: {_x(goal['lm_nm']['ratio'])} "
        f"{_met(goal['lm_nm']['met'])}; wanda no worse than magnitude: 50% {_x(goal['lm_wanda_unstructured']['ratio'])} "
        f"{_met(goal['lm_wanda_unstructured']['met'])}, 2:4 {_x(goal['lm_wanda_nm']['ratio'])} "
        f"{_met(goal['lm_wanda_nm']['met'])}.\n"
    )
    lines.append(f"**(b) Fashion-MNIST CNN**, {cfg['n_test']:,} test images, one-shot:\n")
    lines.append(_accuracy_table(cnn["rows"]))
    lines.append(
        f"Goals: 2:4 sparsegpt drop <= 1/3 of magnitude's: {_x(goal['cnn_nm']['ratio'])} {_met(goal['cnn_nm']['met'])}; "
        f"95% sparsegpt (under `fast`, as the service resolves it) <= 1/2 of `fast` today: "
        f"{_x(goal['cnn_95']['ratio'])} {_met(goal['cnn_95']['met'])}; sparsegpt at `fast`'s LAMP allocation: "
        f"{_x(cnn['rows']['sparsegpt+lamp_allocation@95%'].get('ratio'))}.\n"
    )
    lines.append("**(c) 30% of channels removed one-shot** (BN CNN, compacted, `preset: fast`):\n")
    lines.append(_accuracy_table(repair["one_shot"]))
    lines.append(
        f"Goal: drop with reconstruct <= 1/2 of the drop without: {_x(goal['channel_repair']['ratio'])} "
        f"{_met(goal['channel_repair']['met'])}.\n"
    )
    lines.append(
        f"**(d) 50% of channels compacted, `preset: recommended`** (3 epochs, distillation) on the first "
        f"{cfg['subset']:,} train images (BN CNN):\n"
    )
    lines.append(_accuracy_table(repair["fine_tuned"]))
    points = goal["repair_fine_tune_points"]["points"]
    lines.append(
        f"Goal: from the repaired model, drop <= {GOALS['repair_fine_tune_points']:g} point: "
        f"{'n/a' if points is None else f'{points:.2f} points'} {_met(goal['repair_fine_tune_points']['met'])}.\n"
    )
    lines.append(
        f"**(e) Cost** on `{cost['model']}` (random weights), 50% unstructured, layer scope, each job in its own process:\n"
    )
    rows = []
    for criterion, row in cost["rows"].items():
        if "skipped" in row:
            rows.append([criterion, _why(row), "", "", ""])
            continue
        rows.append(
            [
                criterion,
                f"{row['wall_s']:.1f}",
                f"{row['timings_s'].get('prune', float('nan')):.1f}",
                f"{row['cpu_s']:.0f}",
                f"{row['peak_rss_kib'] / 1024:,.0f} MiB",
                _x(row.get("ratio")) if criterion != "magnitude" else "1.00x",
                _x(row.get("cpu_ratio")) if criterion != "magnitude" else "1.00x",
            ]
        )
    lines.append(
        md_table(
            ["criterion", "job s", "prune stage s", "job CPU s", "peak RSS", "time ratio", "CPU ratio"], rows
        )
    )
    spent = cost["rows"]["sparsegpt"].get("timings_s", {}).get("calibration")
    lines.append(
        f"Goal: sparsegpt <= {GOALS['resnet_time']:g}x the magnitude job's time: {_x(goal['resnet_time']['ratio'])} "
        f"{_met(goal['resnet_time']['met'])}"
        + (
            f" (its calibration stage, the sequential Hessian passes and OBS updates: {spent:.0f} s)"
            if spent is not None
            else ""
        )
        + ".\n"
    )
    return "\n".join(lines)


def _accuracy_table(rows_in: dict[str, dict[str, Any]]) -> str:
    rows = []
    for key, row in rows_in.items():
        if "skipped" in row:
            rows.append([key, _why(row), "", "", "", "", ""])
            continue
        spec = row["spec"]
        rows.append(
            [
                key,
                f"{spec.get('criterion', 'magnitude')}, {spec.get('scope')}"
                + (f", preset {spec['preset']}" if spec.get("preset") else ""),
                f"{row['baseline_accuracy']:.4f}",
                f"{row['accuracy']:.4f}",
                f"{row['drop_points']:+.2f}",
                _x(row.get("ratio")) if "ratio" in row else "",
                f"{row['wall_s']:.1f}",
            ]
        )
    return md_table(
        ["job", "resolved spec", "baseline", "accuracy", "drop (points)", "drop ratio", "job s"], rows
    )


def main(argv: list[str] | None = None) -> int:
    from bench.results import SMOKE_RESULTS, write_section

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(child_main(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; writes bench/out/RESULTS.smoke.md")
    parser.add_argument(
        "--build-only", action="store_true", help="build (or find) the cached models and stop"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.build_only:
        models = _models(dict(SMOKE if args.smoke else FULL), None)
        print(json.dumps({name: meta for name, (_, meta) in models.items()}, indent=2))
        return 0
    tick = time.perf_counter()
    result = run_calibration(smoke=args.smoke)
    result["bench_wall_s"] = time.perf_counter() - tick
    print(result["markdown"])
    if not args.no_write:
        path = write_section("calibration", result, args.smoke, SMOKE_RESULTS)
        print(f"wrote {path.relative_to(ROOT)} ({platform.node()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
