"""Quality vs tfmot: the digits CNN pruned by tfmot and by Secateurs (through its HTTP API) from the same weights.

Fairness, point by point:

- Same baseline weights. The CNN (``tests.support.model_factory``'s architecture: Conv2D 8 + BatchNorm + Dense 32 +
  Dense 10, softmax) is trained ONCE, in tf_keras, by ``bench.tfmot_side baseline`` (``BASELINE_EPOCHS``
  epochs, seed 0), and its weights are saved as NumPy arrays. tfmot starts from those arrays; the Keras 3 twin
  that is exported and uploaded to Secateurs loads the very same arrays. Both baselines are scored on the test
  split here and must agree exactly (and their softmax outputs to 1e-5), else the run fails.
- Same data: scikit-learn ``load_digits``, ``tests.support.model_factory.digits_datasets()`` = pixels / 16, stratified
  75/25 split with seed 0: 1347 train / 450 test. Fine-tuning sees the train split only; every accuracy is on
  the test split.
- Same budget: ``epochs`` in ``BUDGETS`` (3 and 10), batch 32, Adam with learning rate 1e-3, and the same
  gradual schedule: our ``{"kind": "polynomial"}`` with its defaults -- cubic (power 3) from 0 to the target,
  reached after 75% of the steps, masks updated about 100 times over that ramp (every step at 3 epochs, every
  4 at 10) -- built by ``worker.pruning.schedules.build_schedule`` and handed to tfmot as
  ``PolynomialDecay(0, s, begin_step=0, end_step, frequency)`` with the same end step and frequency. Seeds
  ``SEEDS``: they set the shuffling order on both sides (tfmot: ``tf_keras.utils.set_random_seed``; ours: the
  spec's ``seed``).
- tfmot runs as tfmot users run it (``prune_low_magnitude`` on the whole model: every Conv2D/Dense kernel to the
  target sparsity; ``model.fit`` with ``UpdatePruningStep``; BatchNorm in training mode; ``strip_pruning``) in its
  own process (``bench.tfmot_side``), because it needs ``TF_USE_LEGACY_KERAS=1``.
- Ours is ``RECOMMENDED`` (what we recommend for quality; defaults where it says nothing): global ranking with
  LAMP scores and distillation from the dense model. Its two additions over the contract's defaults are what
  tfmot does not offer. The row "ours, contract defaults" runs the same jobs with the default layer scope and no
  distillation (tfmot's allocation), so the table also shows what the allocation is worth. Every job runs in a
  real ``secateurs serve`` (embedded worker) over HTTP; accuracies are the service's metrics JSON, and every
  artifact is downloaded, verified (signatures, exact zeros, overall sparsity) and scored again here.
- Latency measurement inside the jobs is cut to batch 1, 3 runs (it is not compared here).
- How the recommended spec was chosen: LAMP and distillation from first measurements on this split; the
  remaining knobs (distillation alpha / temperature, mask-update frequency, end fraction, learning rate) were
  compared on splits 1 and 2 (other test sets) and left at their defaults where no setting was better on both.
  The goal's cell is also run on those splits (``CHECK_SPLITS``, own baselines trained the same way), to show
  how much of its drop belongs to one 450-sample test set.

Sizes (the issue's item 4) come from the same run: the service's ``size_bytes.zip`` (deflate level 6 of the
SavedModel directory, what a user downloads) of the 80% and 90% artifacts vs the uploaded dense model, next to
tfmot's stripped model zipped as ``.h5`` (tfmot's tutorial) and as a SavedModel, vs the dense tf_keras model
saved the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from bench.common import (
    OUT_DIR,
    ROOT,
    Api,
    BenchError,
    Server,
    md_table,
    mean_std,
    signature_names,
    subprocess_env,
    unzip,
    verify_pruned,
)
from tests.support.model_cache import cached_model

BASELINE_EPOCHS = 20
BASELINE_MIN_ACCURACY = 0.97
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BUDGETS = (3, 10)
EXTRA_CELLS = ((0.92, 10),)  # the second goal: <= 0.5 point drop at 92%, 10 epochs
SEEDS = (0, 1, 2)
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
SIZE_SPARSITIES = (0.8, 0.9)
# The goal's cell again on other splits (own baselines, same recipe): how much of the drop is this test set.
CHECK_SPLITS = (1, 2)
# Goals of the issue (checked and reported, never asserted: the bench reports what it measures).
GOAL_RATIO = 1.00
GOAL_DROP_CELL = (0.92, 10)
GOAL_DROP_POINTS = 0.5
GOAL_ZIP_RATIO_80 = 0.35

RECOMMENDED: dict[str, Any] = {
    "scope": "global",
    "normalization": "lamp",
    "schedule": {"kind": "polynomial"},
    "fine_tune": {"distill": {"alpha": 0.5, "temperature": 2.0}},
}
CONTRACT_DEFAULTS: dict[str, Any] = {"schedule": {"kind": "polynomial"}, "fine_tune": {}}
# The contract defaults as they were before mask updates defaulted to about 100 per ramp (README: why).
PREVIOUS_DEFAULTS: dict[str, Any] = {"schedule": {"kind": "polynomial", "frequency": 10}, "fine_tune": {}}
# The recommended spec without its teacher: what the allocation alone is worth.
LAMP_ONLY: dict[str, Any] = {**RECOMMENDED, "fine_tune": {}}
VARIANTS: dict[str, dict[str, Any]] = {
    "ours": RECOMMENDED,
    "ours_layer": CONTRACT_DEFAULTS,
    "ours_layer_f10": PREVIOUS_DEFAULTS,
    "ours_lamp": LAMP_ONLY,
}
LABELS = {
    "tfmot": "tfmot",
    "ours": "Secateurs, recommended spec",
    "ours_layer": "Secateurs, contract defaults (layer scope)",
    "ours_layer_f10": "Secateurs, previous defaults (masks every 10 steps)",
    "ours_lamp": "Secateurs, global LAMP without distillation",
}
IN_FLIGHT = 4  # jobs queued at once (the service limits active jobs per tenant)
FAST_LATENCY = {"latency": {"batch_sizes": [1], "runs": 3, "warmup": 1}}
SMOKE = {
    "baseline_epochs": 3,
    "sparsities": (0.8,),
    "budgets": (1,),
    "extra": (),
    "seeds": (0,),
    "size_sparsities": (0.8,),
    "check_splits": (),
}
PLOT = ROOT / "bench" / "plots" / "tfmot_quality.png"


def run_side(args: list[str], log: Path) -> dict[str, Any]:
    """``python -m bench.tfmot_side ARGS`` in its own process (legacy Keras stays there); its JSON answer."""
    with log.open("ab") as err:
        done = subprocess.run(
            [sys.executable, "-m", "bench.tfmot_side", *args],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise BenchError(f"bench.tfmot_side {args[0]} exited with {done.returncode}:\n" + "\n".join(tail))
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def keras3_twin(weights: Path) -> Any:
    """The Keras 3 model of ``tests.support.model_factory`` with the tf_keras baseline's arrays loaded."""
    import numpy as np

    from tests.support import model_factory

    model = model_factory._keras3_cnn(0)
    with np.load(weights) as npz:
        arrays = [npz[f"w{i}"] for i in range(len(npz.files))]
    model.set_weights(arrays)
    return model


def tf_keras_baseline(root: Path, epochs: int, split: int) -> dict[str, Any]:
    """A ``cached_model`` builder: the tf_keras baseline (base/weights.npz, trained in bench.tfmot_side), its
    Keras 3 twin exported + zipped, train/test npz of ``digits_datasets(seed=split)``, and the test accuracy
    of each."""
    import numpy as np

    from tests.support import model_factory

    base = run_side(
        ["baseline", "--out", str(root / "base"), "--epochs", str(epochs), "--seed", "0", "--split", str(split)],
        root / "side.log",
    )
    train, test = model_factory.digits_datasets(seed=split)
    twin = keras3_twin(root / "base" / "weights.npz")
    probs = twin.predict(test["x"], batch_size=256, verbose=0)
    twin.export(str(root / "saved_model"), verbose=False)
    model_factory.zip_saved_model(root / "saved_model", root / "model.zip", top="digits_cnn")
    model_factory.write_npz(root / "train.npz", train)
    model_factory.write_npz(root / "test.npz", test)
    return {
        "epochs": epochs,
        "tf_keras": base,
        "keras3_accuracy": float(np.mean(np.argmax(probs, axis=1) == test["y"])),
        "export_accuracy": export_accuracy(root / "saved_model", split),
        "split": split,
        "n_train": len(train["y"]),
        "n_test": len(test["y"]),
    }


def prepare(cache_dir: Path, epochs: int, split: int = 0) -> dict[str, Any]:
    """The tf_keras baseline and its twin (``tf_keras_baseline``, cached) with the paths of their files;
    checks that both baselines score identically on the test split."""
    root, meta = cached_model(tf_keras_baseline, epochs, split, cache_dir=cache_dir)
    if not meta["tf_keras"]["accuracy"] == meta["keras3_accuracy"] == meta["export_accuracy"]:
        raise BenchError(
            f"the two baselines differ: tf_keras {meta['tf_keras']['accuracy']}, Keras 3 {meta['keras3_accuracy']}, "
            f"exported {meta['export_accuracy']}"
        )
    return {
        **meta,
        "weights": root / "base" / "weights.npz",
        "saved_model": root / "saved_model",
        "zip": root / "model.zip",
        "train": root / "train.npz",
        "test": root / "test.npz",
    }


def export_accuracy(saved_model: Path, split: int = 0) -> float:
    """Test-split accuracy of a SavedModel's ``serving_default``, computed here (not by the service)."""
    import numpy as np
    import tensorflow as tf

    from tests.support import model_factory

    _, test = model_factory.digits_datasets(seed=split)
    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    probs = next(iter(fn(**{name: tf.constant(test["x"])}).values())).numpy()
    return float(np.mean(np.argmax(probs, axis=1) == test["y"]))


def grid(smoke: bool) -> list[tuple[float, int]]:
    """(sparsity, epochs) cells: every sparsity at every budget, then the extra cells."""
    sparsities = SMOKE["sparsities"] if smoke else SPARSITIES
    budgets = SMOKE["budgets"] if smoke else BUDGETS
    extra = SMOKE["extra"] if smoke else EXTRA_CELLS
    return [(s, e) for e in budgets for s in sparsities] + list(extra)


def schedule_of(epochs: int, n_train: int) -> dict[str, Any]:
    """Our default polynomial schedule for this budget (what the service builds), to hand to tfmot."""
    from worker.pruning.finetune import count_steps
    from worker.pruning.schedules import build_schedule

    config = build_schedule(
        {"kind": "polynomial"}, 1.0, count_steps(n_train, BATCH_SIZE, epochs)
    ).get_config()
    return {"end_step": config["end_step"], "frequency": config["frequency"], "power": config["power"]}


def run_tfmot(
    models: dict[int, dict[str, Any]],
    cells: list[tuple[int, float, int]],
    seeds: tuple[int, ...],
    work: Path,
    size_sparsities: tuple[float, ...],
) -> dict[str, Any]:
    """Every (split, sparsity, epochs) cell and seed through tfmot in one subprocess."""
    jobs = [
        {
            "split": split,
            "weights": str(models[split]["weights"]),
            "sparsity": s,
            "epochs": e,
            "seed": seed,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            **{k: v for k, v in schedule_of(e, models[split]["n_train"]).items() if k != "power"},
            "sizes": split == 0 and s in size_sparsities,
        }
        for split, s, e in cells
        for seed in seeds
    ]
    cells_path = work / "tfmot_cells.json"
    cells_path.write_text(json.dumps(jobs))
    return run_side(
        [
            "prune",
            "--weights",
            str(models[0]["weights"]),
            "--cells",
            str(cells_path),
            "--out",
            str(work / "tfmot"),
        ],
        work / "tfmot_side.log",
    )


def job_spec(fragment: dict[str, Any], sparsity: float, epochs: int, seed: int) -> dict[str, Any]:
    """One job's spec: the variant's fragment with this cell's sparsity, budget and seed."""
    return {
        **fragment,
        "target_sparsity": sparsity,
        "fine_tune": {
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            **fragment.get("fine_tune", {}),
            "epochs": epochs,
        },
        "seed": seed,
        "evaluation": FAST_LATENCY,
    }


def collect(api: Api, run: dict[str, Any], work: Path) -> None:
    """Wait for ``run``'s job, then record its metrics and download its artifact."""
    done = api.wait_job(run["job_id"], run.pop("submitted"))
    metrics = api.get(f"/v1/jobs/{done.body['id']}/metrics")
    artifact = (
        work
        / f"{run['variant']}_split{run['split']}_s{run['sparsity']}_e{run['epochs']}_seed{run['seed']}.zip"
    )
    run["artifact_bytes"] = api.download(done.body["id"], artifact)
    run.update(
        artifact=artifact,
        baseline_accuracy=metrics["baseline"]["metrics"]["accuracy"],
        accuracy=metrics["pruned"]["metrics"]["accuracy"],
        sparsity_measured=metrics["pruned"]["sparsity"],
        size_bytes=metrics["pruned"]["size_bytes"],
        baseline_size_bytes=metrics["baseline"]["size_bytes"],
        layers={row["name"]: row["sparsity"] for row in metrics["layers"]},
        job_s=metrics["timings_s"]["total"],
        fine_tune_s=metrics["timings_s"]["fine_tune"],
    )
    print(
        f"[tfmot-quality]   {run['variant']} split {run['split']} {run['sparsity']} x {run['epochs']} ep "
        f"seed {run['seed']}: "
        f"{run['accuracy']:.4f}",
        file=sys.stderr,
        flush=True,
    )


def run_ours(
    models: dict[int, dict[str, Any]],
    cells: list[tuple[int, float, int]],
    seeds: tuple[int, ...],
    work: Path,
) -> dict[str, Any]:
    """Every (variant, cell, seed) as one job of one ``secateurs serve`` (split 0: both variants; the other
    splits: the recommended spec); artifacts verified and rescored."""
    runs = [
        {
            "variant": variant,
            "split": split,
            "sparsity": sparsity,
            "epochs": epochs,
            "seed": seed,
            "spec": job_spec(fragment, sparsity, epochs, seed),
        }
        for variant, fragment in VARIANTS.items()
        for split, sparsity, epochs in cells
        if split == 0 or variant == "ours"
        for seed in seeds
    ]
    started = time.perf_counter()
    with Server(work / "server") as server, Api(server.base_url) as api:
        ids: dict[int, dict[str, str]] = {}
        for split, inputs in models.items():
            model = api.upload("/v1/models", inputs["zip"], name=f"digits-cnn-split{split}")
            train = api.upload("/v1/datasets", inputs["train"])
            test = api.upload("/v1/datasets", inputs["test"])
            api.wait_model(model["id"])
            ids[split] = {
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "eval_dataset_id": test["id"],
            }
        # A few jobs queued ahead keep the one embedded worker busy, below the per-tenant limit of active jobs.
        in_flight: deque[dict[str, Any]] = deque()
        pending = deque(runs)
        while pending or in_flight:
            while pending and len(in_flight) < IN_FLIGHT:
                run = pending.popleft()
                body, run["submitted"] = api.submit_job({**ids[run["split"]], "spec": run["spec"]})
                run["job_id"] = body["id"]
                in_flight.append(run)
            collect(api, in_flight.popleft(), work)
    wall = time.perf_counter() - started
    expected = signature_names(models[0]["saved_model"])
    for run in runs:
        unzipped = unzip(run.pop("artifact"), work / run["job_id"])
        layer_scope = "scope" not in VARIANTS[run["variant"]]
        check = verify_pruned(unzipped, expected, run["sparsity"], per_variable=layer_scope)
        run["verified"] = check["ok"]
        run["local_accuracy"] = export_accuracy(unzipped, run["split"])
        if not check["ok"]:
            raise BenchError(f"artifact of {run['job_id']} failed verification: {check}")
        shutil.rmtree(work / run["job_id"], ignore_errors=True)
    return {"runs": runs, "wall_s": wall}


def summarize(
    tfmot: list[dict[str, Any]],
    ours: list[dict[str, Any]],
    cells: list[tuple[float, int]],
    baseline: float,
    split: int = 0,
) -> list[dict[str, Any]]:
    """Per cell of ``split``: mean ± std per side, ratio ours/tfmot of the means, drop from the baseline
    (points). Sides without runs in that split (the contract defaults off split 0) are left out."""
    rows = []
    for sparsity, epochs in cells:
        row: dict[str, Any] = {"sparsity": sparsity, "epochs": epochs, "split": split, "baseline": baseline}
        for side, runs in (
            ("tfmot", tfmot),
            *((v, [r for r in ours if r["variant"] == v]) for v in VARIANTS),
        ):
            accs = [
                r["accuracy"]
                for r in runs
                if r.get("split", 0) == split and r["sparsity"] == sparsity and r["epochs"] == epochs
            ]
            if not accs:
                continue
            mean, std = mean_std(accs)
            row[side] = {"mean": mean, "std": std, "per_seed": accs, "drop_points": 100 * (baseline - mean)}
        for variant in VARIANTS:
            if variant in row:
                row[variant]["ratio"] = row[variant]["mean"] / row["tfmot"]["mean"]
        rows.append(row)
    return rows


def size_rows(
    tfmot: list[dict[str, Any]],
    ours: list[dict[str, Any]],
    dense: dict[str, Any],
    sparsities: tuple[float, ...],
) -> list[dict[str, Any]]:
    """Zip sizes (seed 0, longest budget) of the artifacts at ``sparsities`` and of the dense models."""
    rows = []
    ours = [r for r in ours if r["split"] == 0]
    dense_ours = ours[0]["baseline_size_bytes"]["zip"]
    rows.append(
        {
            "model": "dense",
            "ours_zip": dense_ours,
            "tfmot_h5_zip": dense["h5_zip"],
            "tfmot_saved_model_zip": dense["saved_model_zip"],
        }
    )
    for s in sparsities:
        mine = [r for r in ours if r["variant"] == "ours" and r["sparsity"] == s and r["seed"] == 0]
        theirs = [r for r in tfmot if r["sparsity"] == s and r["seed"] == 0 and r.get("sizes")]
        if not mine or not theirs:
            continue
        a = max(mine, key=lambda r: r["epochs"])
        b = max(theirs, key=lambda r: r["epochs"])
        rows.append(
            {
                "model": f"{s:.0%} sparse",
                "ours_zip": a["size_bytes"]["zip"],
                "ours_download": a["artifact_bytes"],
                "tfmot_h5_zip": b["sizes"]["h5_zip"],
                "tfmot_saved_model_zip": b["sizes"]["saved_model_zip"],
            }
        )
    for row in rows:
        row["ours_ratio"] = row["ours_zip"] / dense_ours
        row["tfmot_h5_ratio"] = row["tfmot_h5_zip"] / dense["h5_zip"]
        row["tfmot_saved_model_ratio"] = row["tfmot_saved_model_zip"] / dense["saved_model_zip"]
    return rows


def run_tfmot_quality(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    """The whole comparison; returns the numbers, the goal checks and the markdown (and writes the plot)."""
    cache_dir = cache_dir or OUT_DIR / "cache"
    work = work_dir or OUT_DIR / ("tfmot-smoke" if smoke else "tfmot")
    epochs = SMOKE["baseline_epochs"] if smoke else BASELINE_EPOCHS
    seeds: tuple[int, ...] = SMOKE["seeds"] if smoke else SEEDS
    size_sparsities: tuple[float, ...] = SMOKE["size_sparsities"] if smoke else SIZE_SPARSITIES
    check_splits: tuple[int, ...] = SMOKE["check_splits"] if smoke else CHECK_SPLITS
    cells = grid(smoke)
    models = {split: prepare(cache_dir, epochs, split) for split in (0, *check_splits)}
    inputs = models[0]
    baseline = inputs["keras3_accuracy"]
    if not smoke and baseline < BASELINE_MIN_ACCURACY:
        raise BenchError(f"baseline test accuracy {baseline:.4f} < {BASELINE_MIN_ACCURACY}: train longer")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    all_cells = [(0, s, e) for s, e in cells] + [(split, *GOAL_DROP_CELL) for split in check_splits]

    tick = time.perf_counter()
    side = run_tfmot(models, all_cells, seeds, work, size_sparsities)
    tfmot_s = time.perf_counter() - tick
    ours = run_ours(models, all_cells, seeds, work)
    rows = summarize(side["cells"], ours["runs"], cells, baseline)
    split_rows = [
        row
        for split in check_splits
        for row in summarize(
            side["cells"], ours["runs"], [GOAL_DROP_CELL], models[split]["keras3_accuracy"], split
        )
    ]
    sizes = size_rows(side["cells"], ours["runs"], inputs["tf_keras"]["dense_sizes"], size_sparsities)
    goals = check_goals(rows, sizes, baseline)
    plot = PLOT if not smoke else work / "tfmot_quality.png"
    write_plot(rows, baseline, plot)
    result = {
        "smoke": smoke,
        "baseline": {
            "epochs": epochs,
            "accuracy_tf_keras": inputs["tf_keras"]["accuracy"],
            "accuracy_keras3": baseline,
            "accuracy_service": ours["runs"][0]["baseline_accuracy"],
            "n_train": inputs["n_train"],
            "n_test": inputs["n_test"],
        },
        "cells": cells,
        "seeds": list(seeds),
        "specs": VARIANTS,
        "tfmot": side,
        "ours": ours,
        "rows": rows,
        "split_rows": split_rows,
        "sizes": sizes,
        "goals": goals,
        "tfmot_wall_s": tfmot_s,
        "plot": str(plot),
    }
    result["markdown"] = render(result)
    return result


def check_goals(rows: list[dict[str, Any]], sizes: list[dict[str, Any]], baseline: float) -> dict[str, Any]:
    """The issue's goals, measured: ratio >= 1 in every cell, the 92%/10-epoch drop, the 80% zip ratio."""
    worst = min(rows, key=lambda r: r["ours"]["ratio"])
    drop_row = next((r for r in rows if (r["sparsity"], r["epochs"]) == GOAL_DROP_CELL), None)
    zip80 = next((r for r in sizes if r["model"] == "80% sparse"), None)
    return {
        "ratio_min": worst["ours"]["ratio"],
        "ratio_min_cell": [worst["sparsity"], worst["epochs"]],
        "ratio_met": all(r["ours"]["ratio"] >= GOAL_RATIO for r in rows),
        "drop_points": None if drop_row is None else drop_row["ours"]["drop_points"],
        "drop_met": None if drop_row is None else drop_row["ours"]["drop_points"] <= GOAL_DROP_POINTS,
        "zip_ratio_80": None if zip80 is None else zip80["ours_ratio"],
        "zip_met": None if zip80 is None else zip80["ours_ratio"] <= GOAL_ZIP_RATIO_80,
    }


def write_plot(rows: list[dict[str, Any]], baseline: float, path: Path) -> None:
    """Accuracy vs sparsity, one column per budget, mean ± std over seeds for each side; the bottom row zooms
    on the top of the range, where the recommended spec and the baseline are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["epochs"] for r in rows})
    fig, axes = plt.subplots(
        2, len(budgets), figsize=(5.5 * len(budgets), 7.5), squeeze=False, sharey="row", height_ratios=[3, 2]
    )
    styles = {"tfmot": ("tab:red", "s"), "ours": ("tab:blue", "o"), "ours_layer": ("tab:gray", "^")}
    for column, epochs in enumerate(budgets):
        subset = sorted((r for r in rows if r["epochs"] == epochs), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in subset]
        for ax in axes[:, column]:
            for side, (color, marker) in styles.items():
                ax.errorbar(
                    xs,
                    [r[side]["mean"] for r in subset],
                    yerr=[r[side]["std"] for r in subset],
                    color=color,
                    marker=marker,
                    capsize=3,
                    label=LABELS[side],
                    linestyle="--" if side == "ours_layer" else "-",
                )
            ax.axhline(
                baseline, color="black", linewidth=0.8, linestyle=":", label=f"dense baseline {baseline:.3f}"
            )
            ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
            ax.grid(alpha=0.3)
        axes[0][column].set_title(f"{epochs} fine-tuning epoch{'s' if epochs != 1 else ''}")
        axes[1][column].set_xlabel("sparsity (%)")
        axes[1][column].set_ylim(baseline - 0.06, baseline + 0.01)
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[1][0].set_ylabel("zoom: near the baseline")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(
        "digits CNN: Secateurs (HTTP API) vs tfmot prune_low_magnitude, same weights, data and budget"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reading(result: dict[str, Any]) -> str:
    """What the table says, from the numbers: engine parity under tfmot's allocation, and where the
    recommended spec's gain comes from (per-layer sparsity the global LAMP ranking chose)."""
    rows = result["rows"]
    defaults = [r["ours_layer"]["ratio"] for r in rows]
    top = max(rows, key=lambda r: (r["sparsity"], r["epochs"]))
    chosen = [
        r["layers"]
        for r in result["ours"]["runs"]
        if r["variant"] == "ours"
        and r["split"] == 0
        and (r["sparsity"], r["epochs"]) == (top["sparsity"], top["epochs"])
    ]
    per_layer = (
        ", ".join(
            f"`{name.rpartition('/')[0].rpartition('/')[2] or name}` {mean_std([c[name] for c in chosen])[0]:.0%}"
            for name in chosen[0]
        )
        if chosen
        else "n/a"
    )
    behind = [r for r in rows if r["ours_layer"]["ratio"] < 0.98]
    parity = (
        "within 2% of tfmot in every cell"
        if not behind
        else "more than 2% behind tfmot at "
        + ", ".join(
            f"{r['sparsity']:.0%} / {r['epochs']} epochs ({r['ours_layer']['ratio']:.3f})" for r in behind
        )
    )
    lamp = [100 * (r["ours_lamp"]["mean"] - r["ours_layer"]["mean"]) for r in rows]
    teacher = [100 * (r["ours"]["mean"] - r["ours_lamp"]["mean"]) for r in rows]
    return (
        "Reading it: with tfmot's allocation (every kernel at the target sparsity: the contract defaults row, same "
        "schedule; our loop through the restored inference signature, BatchNorm frozen, where tfmot's `fit` "
        f"trains BatchNorm too), ours is at {min(defaults):.3f}-{max(defaults):.3f} x tfmot: {parity}. The "
        "recommended spec's gain is mostly the allocation: the global LAMP ranking spares the small layers that a "
        f"per-layer target empties (at {top['sparsity']:.0%} / {top['epochs']} epochs it chose {per_layer}), "
        f"{min(lamp):+.2f} to {max(lamp):+.2f} points over the contract defaults; distillation from the dense model "
        f"then adds {min(teacher):+.2f} to {max(teacher):+.2f} points (better in "
        f"{sum(t > 0 for t in teacher)} of {len(teacher)} cells, worse in {sum(t < 0 for t in teacher)}); see the "
        "step-by-step table below."
    )


def _acc(cell: dict[str, Any]) -> str:
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def render(result: dict[str, Any]) -> str:
    base = result["baseline"]
    rows = []
    for r in result["rows"]:
        rows.append(
            [
                f"{r['sparsity']:.0%}",
                str(r["epochs"]),
                _acc(r["tfmot"]),
                _acc(r["ours"]),
                f"**{r['ours']['ratio']:.3f}**",
                f"{-r['ours']['drop_points']:+.2f}",
                _acc(r["ours_layer"]),
                f"{r['ours_layer']['ratio']:.3f}",
            ]
        )
    seeds_rows = []
    for r in result["rows"]:
        seeds_rows.append(
            [
                f"{r['sparsity']:.0%}",
                str(r["epochs"]),
                ", ".join(f"{a:.4f}" for a in r["tfmot"]["per_seed"]),
                ", ".join(f"{a:.4f}" for a in r["ours"]["per_seed"]),
                ", ".join(f"{a:.4f}" for a in r["ours_layer"]["per_seed"]),
            ]
        )
    size_table = [
        [
            s["model"],
            f"{s['ours_zip'] / 1024:.1f} KB ({s['ours_ratio']:.3f})",
            f"{s['tfmot_h5_zip'] / 1024:.1f} KB ({s['tfmot_h5_ratio']:.3f})",
            f"{s['tfmot_saved_model_zip'] / 1024:.1f} KB ({s['tfmot_saved_model_ratio']:.3f})",
        ]
        for s in result["sizes"]
    ]
    goals = result["goals"]
    verdict = [
        f"- ours/tfmot >= {GOAL_RATIO:.2f} in every cell: **{'met' if goals['ratio_met'] else 'NOT met'}** "
        f"(lowest {goals['ratio_min']:.3f} at {goals['ratio_min_cell'][0]:.0%}, {goals['ratio_min_cell'][1]} epochs).",
    ]
    if goals["drop_points"] is not None:
        verdict.append(
            f"- drop at {GOAL_DROP_CELL[0]:.0%} / {GOAL_DROP_CELL[1]} epochs <= {GOAL_DROP_POINTS} point: "
            f"**{'met' if goals['drop_met'] else 'NOT met'}** ({goals['drop_points']:.2f} points, mean of "
            f"{len(result['seeds'])} seeds; one test sample is {100 / base['n_test']:.2f} point)."
        )
    if goals["zip_ratio_80"] is not None:
        verdict.append(
            f"- zip of the 80% artifact <= {GOAL_ZIP_RATIO_80} of dense: "
            f"**{'met' if goals['zip_met'] else 'NOT met'}** ({goals['zip_ratio_80']:.3f})."
        )
    runs = result["ours"]["runs"]
    versions = result["tfmot"]["versions"]
    by_budget = {c["epochs"]: c for c in result["tfmot"]["cells"] if c.get("split", 0) == 0}
    split_table = [
        [
            str(r["split"]),
            f"{r['baseline']:.4f}",
            _acc(r["tfmot"]),
            _acc(r["ours"]),
            f"{r['ours']['ratio']:.3f}",
            f"{-r['ours']['drop_points']:+.2f}",
        ]
        for r in [
            *(x for x in result["rows"] if (x["sparsity"], x["epochs"]) == GOAL_DROP_CELL),
            *result["split_rows"],
        ]
    ]
    reading = _reading(result)
    schedules = "; ".join(
        f"{e} epochs = {c['steps']} steps, end step {c['end_step']}, every {c['frequency']} step(s)"
        for e, c in sorted(by_budget.items())
    )
    return "\n".join(
        [
            "### Accuracy: Secateurs vs tfmot (digits CNN, same weights, data and budget)\n",
            f"Baseline: trained once in tf_keras ({base['epochs']} epochs, seed 0) and loaded into both sides: test "
            f"accuracy {base['accuracy_tf_keras']:.4f} (tf_keras) = {base['accuracy_keras3']:.4f} (Keras 3 twin) = "
            f"{base['accuracy_service']:.4f} (service). Data: `tests.support.model_factory.digits_datasets()`, scikit-learn "
            f"digits / 16, stratified 75/25 split seed 0: {base['n_train']} train / {base['n_test']} test. Budget on "
            f"both sides: batch {BATCH_SIZE}, Adam {LEARNING_RATE:g} constant, our default polynomial schedule "
            "(cubic ramp 0 -> target, reached at 75% of the steps) with the same end step and mask-update "
            f"frequency on both sides: {schedules}. Seeds {result['seeds']}; cells are mean ± sample std. tfmot "
            f"{versions['tensorflow_model_optimization']} (tf_keras {versions['tf_keras']}).\n",
            f"Ours, recommended spec: `{json.dumps(RECOMMENDED)}` (+ `target_sparsity`, `seed`, "
            '`fine_tune.epochs`). Contract defaults: `{"schedule": {"kind": "polynomial"}}` (layer scope, no '
            "distillation: tfmot's per-layer allocation). Ratio = mean ours / mean tfmot; Δ = points vs the "
            "baseline.\n",
            md_table(
                [
                    "sparsity",
                    "epochs",
                    "tfmot",
                    "ours (recommended)",
                    "ours/tfmot",
                    "Δ ours (points)",
                    "ours (contract defaults)",
                    "defaults/tfmot",
                ],
                rows,
            ),
            "Goals (issue 7):\n",
            *verdict,
            "",
            *(
                [
                    f"The goal's cell ({GOAL_DROP_CELL[0]:.0%}, {GOAL_DROP_CELL[1]} epochs) on other stratified splits "
                    "of the same data (`digits_datasets(seed=split)`), each with its own baseline trained the same "
                    "way, same recipe and seeds: how much of the drop belongs to one 450-sample test set.\n",
                    md_table(
                        ["split", "baseline", "tfmot", "ours (recommended)", "ours/tfmot", "Δ ours (points)"],
                        split_table,
                    ),
                ]
                if result["split_rows"]
                else []
            ),
            reading,
            "",
            f"![accuracy vs sparsity](plots/{Path(result['plot']).name})\n",
            "Per seed (test accuracy):\n",
            md_table(
                ["sparsity", "epochs", "tfmot", "ours (recommended)", "ours (contract defaults)"], seeds_rows
            ),
            "What each step is worth (same jobs otherwise; test accuracy, mean ± std over the seeds; in brackets "
            "the change from the column before, in points): the previous default mask-update frequency (every 10 "
            "steps); the contract defaults now (about 100 updates per ramp: every step at 3 epochs, every 4 at 10 "
            "-- why `schedule.frequency` defaults to that); + global LAMP ranking; + distillation (= the "
            "recommended spec).\n",
            md_table(
                [
                    "sparsity",
                    "epochs",
                    "layer, every 10 steps (before)",
                    "layer, default now",
                    "+ global LAMP",
                    "+ distill (recommended)",
                ],
                [
                    [
                        f"{r['sparsity']:.0%}",
                        str(r["epochs"]),
                        _acc(r["ours_layer_f10"]),
                        *(
                            f"{_acc(r[side])} [{100 * (r[side]['mean'] - r[before]['mean']):+.2f}]"
                            for before, side in (
                                ("ours_layer_f10", "ours_layer"),
                                ("ours_layer", "ours_lamp"),
                                ("ours_lamp", "ours"),
                            )
                        ),
                    ]
                    for r in result["rows"]
                ],
            ),
            f"All {len(runs)} Secateurs artifacts downloaded, reloaded and verified (signatures, exact zeros, "
            "overall sparsity ± 0.01; per variable too in layer scope); the service's accuracy equals the one "
            "computed here on every artifact: "
            f"{all(abs(r['accuracy'] - r['local_accuracy']) < 1.5 / base['n_test'] for r in runs)}. "
            f"Wall time: tfmot side {result['tfmot_wall_s']:.0f} s, API side {result['ours']['wall_s']:.0f} s "
            f"({len(runs)} jobs).\n",
            "### Size: zip (deflate) of the pruned models\n",
            f"Seed 0, {max(by_budget)}-epoch budget. Ours: the service's `size_bytes.zip` (deflate level 6 of the SavedModel "
            "directory, the download) of the recommended-spec artifact vs the uploaded dense SavedModel. tfmot: the "
            "stripped model saved by tf_keras without optimizer, as `.h5` (tfmot's tutorial) and as a SavedModel, "
            "zipped the same way, vs the dense tf_keras model saved the same way. In parentheses: / dense.\n",
            md_table(["model", "ours (SavedModel zip)", "tfmot .h5 zip", "tfmot SavedModel zip"], size_table),
        ]
    )


if __name__ == "__main__":
    print(run_tfmot_quality(smoke="--smoke" in sys.argv)["markdown"])
