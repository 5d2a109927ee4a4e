"""API job vs the floor: one-shot 80% magnitude pruning of a ResNet-50 SavedModel (random weights, ~100 MB).

FLOOR = what a user would script with bare TensorFlow (bench/common.py's ``FLOOR_SCRIPT``, which
bench/big_model.py runs too), run as a fresh ``python -c`` subprocess: import TensorFlow,
``tf.saved_model.load``, a per-variable numpy magnitude mask at 80% on every trainable floating variable of
rank >= 2 the signatures use (the service's default selection), ``assign``, ``tf.saved_model.save`` with the
original signatures, zip the directory with deflate. Its wall time includes interpreter start and the
TensorFlow import, because a script always pays them; the in-process phases it prints (import, load, prune,
save, zip) give the floor without them too, and both ratios are reported.

API = the documented HTTP flow against ``secateurs serve`` (embedded default: API + one worker child) started
fresh for each repeat. Server start-up is not part of the job: timing begins after ``/readyz`` answers AND after
an untimed warm-up upload of a tiny model has been validated -- the embedded worker imports TensorFlow lazily,
in its first task, so without the warm-up the first upload of every fresh server would carry that import (the
warm-up time is reported separately). Timed: upload the zip -> poll the model until ready -> POST /v1/jobs ->
poll until succeeded (every 0.2 s) -> download the artifact. Creating the input zip on the client is not timed
(it is reported once, when the cached model is built).

Repeats alternate the order (floor first, then API first, ...) so drift on a noisy machine hits both.
Both outputs are verified: unzip, ``tf.saved_model.load``, same signature names, sparsity 0.8 +- 0.01 overall
and per variable.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    OUT_DIR,
    Api,
    BenchError,
    Server,
    checkpoint_sparsity,
    export_and_zip,
    export_keras_application,
    fmt_s,
    md_table,
    mean_std,
    run_floor_script,
    server_time,
    signature_names,
    unzip,
    verify_pruned,
)
from tests.support.model_cache import cached_model

TARGET = 0.8
# Explicit layer scope: the floor prunes each variable to the target on its own (and verify_pruned checks every
# variable), so the job must do the same work -- the `fast` preset a job without train data gets ranks globally.
JOB_SPEC: dict[str, Any] = {
    "target_sparsity": TARGET,
    "criterion": "magnitude",
    "scope": "layer",
    "schedule": {"kind": "one_shot"},
}
PIPELINE_STAGES = ("load", "baseline", "prune", "fine_tune", "evaluate", "save")

# -- inputs (cached) -----------------------------------------------------------------------------------------


def _model(cache_dir: Path, name: str, export: Callable[..., None], *args: object) -> dict[str, Any]:
    """The cached SavedModel and its upload zip (bench.common.export_and_zip), with their paths."""
    root, meta = cached_model(export_and_zip, export, *args, cache_dir=cache_dir)
    return {**meta, "name": name, "saved_model": root / "saved_model", "zip": root / "model.zip"}


def _export_small_cnn(out_dir: Path) -> None:
    """The smoke stand-in: a small Keras 3 CNN (same export path as ResNet-50, ~50k parameters)."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3), name="image"),
            layers.Conv2D(16, 3, padding="same", name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", name="conv2"),
            layers.BatchNormalization(name="bn2"),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(64, activation="relu", name="fc1"),
            layers.Dense(10, activation="softmax", name="predictions"),
        ],
        name="small_cnn",
    )
    model.export(str(out_dir), verbose=False)
    keras.backend.clear_session()


def _export_warmup(out_dir: Path) -> None:
    """A tiny plain tf.Module: the untimed first upload that makes the fresh worker import TensorFlow."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.ones([4, 2]), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.matmul(x, self.w)}

    tiny = Tiny()
    tf.saved_model.save(tiny, str(out_dir), signatures={"serving_default": tiny.serve})


# -- the two contenders --------------------------------------------------------------------------------------


def run_floor(saved_model: Path, work: Path, target: float = TARGET) -> dict[str, Any]:
    """The bare-TensorFlow script (bench.common.FLOOR_SCRIPT) in a fresh subprocess; wall time and its phases."""
    floor = run_floor_script(saved_model, work, target)
    return {
        "wall_s": floor["wall_s"],
        "phases_s": floor["phases_s"],
        "in_process_s": floor["in_process_s"],
        "process_overhead_s": floor["process_overhead_s"],
        "pruned_variables": floor["pruned_variables"],
        "peak_rss_mb": floor["peak_rss_kib"] / 1024.0,
        "zip_bytes": floor["zip"].stat().st_size,
        "output_dir": floor["output_dir"],
    }


def run_api(model_zip: Path, warmup_zip: Path, work: Path, target: float = TARGET) -> dict[str, Any]:
    """Fresh ``secateurs serve``; untimed warm-up; then the timed upload -> job -> download flow."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    artifact = work / "pruned.zip"
    spec = {**JOB_SPEC, "target_sparsity": target}
    with Server(work / "server") as server, Api(server.base_url) as api:
        tick = time.perf_counter()
        api.wait_model(api.upload("/v1/models", warmup_zip, name="warmup")["id"])
        warmup = time.perf_counter() - tick

        t0 = time.time()
        model = api.upload("/v1/models", model_zip, name="bench")
        t_uploaded = time.time()
        api.wait_model(model["id"])
        t_ready = time.time()
        job, submitted = api.submit_job({"model_id": model["id"], "spec": spec})
        run = api.wait_job(job["id"], submitted)
        api.download(job["id"], artifact)
        t_end = time.time()

        metrics = api.get(f"/v1/jobs/{job['id']}/metrics")
        worker_rss = server.worker_peak_rss_mb()
        ready_s = server.ready_s

    body = run.body
    created, started, finished = (server_time(body[k]) for k in ("created_at", "started_at", "finished_at"))
    assert created is not None and started is not None and finished is not None
    timings = metrics["timings_s"]
    running = finished - started
    segments = {
        "upload": t_uploaded - t0,
        "validation until ready": t_ready - t_uploaded,
        "submit + queue wait": started - t_ready,
        "running (started_at -> finished_at)": running,
        "finished -> seen by poll": run.seen_done_at - finished,
        "download": t_end - run.seen_done_at,
    }
    return {
        "total_s": t_end - t0,
        "segments_s": segments,
        "queue_wait_s": started - created,
        "job_timings_s": timings,
        "worker_outside_pipeline_s": running - timings["total"],
        "stages_seen": [(stage, at - t0) for stage, at in run.stages],
        "server_ready_s": ready_s,
        "warmup_s": warmup,
        "worker_peak_rss_mb": worker_rss,
        "artifact_bytes": artifact.stat().st_size,
        "metrics_sparsity": metrics["pruned"]["sparsity"],
        "latency_ms": {
            "baseline": metrics["baseline"]["latency_ms"],
            "pruned": metrics["pruned"]["latency_ms"],
        },
        "metrics_size_bytes": {
            "baseline": metrics["baseline"]["size_bytes"],
            "pruned": metrics["pruned"]["size_bytes"],
        },
        "notes": metrics["notes"],
        "artifact": artifact,
    }


# -- the benchmark -------------------------------------------------------------------------------------------


def run_resnet(
    smoke: bool = False,
    repeats: int | None = None,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the model, run floor and API ``repeats`` times alternating the order, verify both.

    Returns a dict with per-repeat results, a summary and ``markdown``.
    """
    cache_dir = cache_dir or OUT_DIR / "cache"
    work_dir = work_dir or OUT_DIR / ("resnet-smoke" if smoke else "resnet")
    repeats = repeats or (1 if smoke else 2)
    name = "small_cnn" if smoke else "resnet50"
    if smoke:
        model = _model(cache_dir, name, _export_small_cnn)
    else:
        model = _model(cache_dir, name, export_keras_application, name)
    warmup = _model(cache_dir, "warmup_module", _export_warmup)
    expected_signatures = signature_names(model["saved_model"])
    input_checkpoint = checkpoint_sparsity(model["saved_model"])

    results: list[dict[str, Any]] = []
    for i in range(repeats):
        order = ("floor", "api") if i % 2 == 0 else ("api", "floor")
        print(f"[resnet] repeat {i + 1}/{repeats}: {' then '.join(order)}", file=sys.stderr, flush=True)
        rep: dict[str, Any] = {"order": list(order)}
        for which in order:
            where = work_dir / f"repeat{i + 1}" / which
            if which == "floor":
                rep["floor"] = run_floor(model["saved_model"], where)
            else:
                rep["api"] = run_api(model["zip"], warmup["zip"], where)
            print(f"[resnet]   {which}: done", file=sys.stderr, flush=True)
        floor_check = verify_pruned(rep["floor"].pop("output_dir"), expected_signatures, TARGET)
        api_dir = unzip(rep["api"].pop("artifact"), work_dir / f"repeat{i + 1}" / "api" / "unzipped")
        api_check = verify_pruned(api_dir, expected_signatures, TARGET)
        if not floor_check["ok"]:
            raise BenchError(f"the floor's output failed verification: {floor_check}")
        if not api_check["ok"]:
            raise BenchError(f"the API's artifact failed verification: {api_check}")
        rep["verify"] = {"floor": floor_check, "api": api_check}
        rep["ratio_wall"] = rep["api"]["total_s"] / rep["floor"]["wall_s"]
        rep["ratio_in_process"] = rep["api"]["total_s"] / rep["floor"]["in_process_s"]
        results.append(rep)
        if not smoke:  # ~400 MB per repeat; keep the logs
            for sub in ("floor", "api"):
                for path in (work_dir / f"repeat{i + 1}" / sub).iterdir():
                    if path.name != "server":
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                shutil.rmtree(work_dir / f"repeat{i + 1}" / sub / "server" / "data", ignore_errors=True)

    summary = {
        "api_total_s": mean_std([r["api"]["total_s"] for r in results]),
        "floor_wall_s": mean_std([r["floor"]["wall_s"] for r in results]),
        "floor_in_process_s": mean_std([r["floor"]["in_process_s"] for r in results]),
        "ratio_wall": mean_std([r["ratio_wall"] for r in results]),
        "ratio_in_process": mean_std([r["ratio_in_process"] for r in results]),
    }
    result = {
        "model": {k: (str(v) if isinstance(v, Path) else v) for k, v in model.items()},
        "input_checkpoint": input_checkpoint,
        "smoke": smoke,
        "repeats": results,
        "summary": summary,
    }
    result["markdown"] = render(result)
    return result


# -- report --------------------------------------------------------------------------------------------------


def _row(label: str, values: list[float | None], mean: bool = True) -> list[str]:
    cells = [fmt_s(v) for v in values]
    known = [v for v in values if v is not None]
    if mean:
        cells.append(fmt_s(sum(known) / len(known)) if known else "n/a")
    return [label, *cells]


def render(result: dict[str, Any]) -> str:
    reps = result["repeats"]
    model = result["model"]
    heads = ["", *[f"repeat {i + 1} ({' -> '.join(r['order'])})" for i, r in enumerate(reps)], "mean"]
    lines = [
        f"### API job vs the floor: {model['name']}, one-shot magnitude pruning to {TARGET:.0%}\n",
        f"Input: SavedModel {model['saved_model_bytes'] / 1e6:.1f} MB, upload zip {model['zip_bytes'] / 1e6:.1f} MB "
        f"(Keras `model.export`, random weights). Building/exporting it took {model['build_export_s']:.1f} s and "
        f"zipping it on the client {model['client_zip_s']:.1f} s (once, cached; not in the totals below).\n",
        "**Totals (seconds) and ratios** (both sides measured in the same run, order alternated per repeat):\n",
        md_table(
            heads,
            [
                _row("API total: upload -> ready -> job -> download", [r["api"]["total_s"] for r in reps]),
                _row(
                    "floor: subprocess wall time (incl. interpreter + TF import)",
                    [r["floor"]["wall_s"] for r in reps],
                ),
                _row("floor: in-process load+prune+save+zip", [r["floor"]["in_process_s"] for r in reps]),
                _row("**ratio API / floor wall**", [r["ratio_wall"] for r in reps]),
                _row("ratio API / floor in-process", [r["ratio_in_process"] for r in reps]),
            ],
        ),
        "**Where the API's time goes** (contiguous segments on one clock; the job's own `timings_s` from the "
        "metrics JSON split the running segment):\n",
    ]
    api_rows: list[list[str]] = []
    for seg in reps[0]["api"]["segments_s"]:
        api_rows.append(_row(seg, [r["api"]["segments_s"][seg] for r in reps]))
        if seg.startswith("submit"):
            api_rows.append(
                _row(
                    "&nbsp;&nbsp;of which queue wait (created_at -> started_at)",
                    [r["api"]["queue_wait_s"] for r in reps],
                )
            )
        if seg.startswith("running"):
            for stage in PIPELINE_STAGES:
                api_rows.append(
                    _row(
                        f"&nbsp;&nbsp;timings_s.{stage}", [r["api"]["job_timings_s"].get(stage) for r in reps]
                    )
                )
            api_rows.append(
                _row("&nbsp;&nbsp;timings_s.total", [r["api"]["job_timings_s"].get("total") for r in reps])
            )
            api_rows.append(
                _row(
                    "&nbsp;&nbsp;worker outside the pipeline",
                    [r["api"]["worker_outside_pipeline_s"] for r in reps],
                )
            )
    api_rows.append(_row("**total**", [r["api"]["total_s"] for r in reps]))
    lines.append(md_table(heads, api_rows))
    stage_means = {
        stage: sum(r["api"]["job_timings_s"].get(stage, 0.0) for r in reps) / len(reps)
        for stage in PIPELINE_STAGES
    }
    top = max(stage_means, key=lambda k: stage_means[k])
    api_mean = sum(r["api"]["total_s"] for r in reps) / len(reps)
    floor_mean = sum(r["floor"]["wall_s"] for r in reps) / len(reps)
    lines.append(
        f"Largest part: `timings_s.{top}` = {stage_means[top]:.1f} s, {stage_means[top] / api_mean:.0%} of the API "
        f"total. Without it the API would take {api_mean - stage_means[top]:.1f} s "
        f"({(api_mean - stage_means[top]) / floor_mean:.1f}x the floor's wall time).\n"
    )
    lines.append("**The floor's phases** (printed by the script):\n")
    floor_rows = [_row(k, [r["floor"]["phases_s"][k] for r in reps]) for k in reps[0]["floor"]["phases_s"]]
    floor_rows.append(_row("interpreter start/exit, rest", [r["floor"]["process_overhead_s"] for r in reps]))
    floor_rows.append(_row("**wall**", [r["floor"]["wall_s"] for r in reps]))
    lines.append(md_table(heads, floor_rows))
    lines.append("**Other facts:**\n")
    facts = [
        _row("server start until /readyz (not timed)", [r["api"]["server_ready_s"] for r in reps]),
        _row(
            "warm-up: first (tiny) model validated by the fresh worker (not timed)",
            [r["api"]["warmup_s"] for r in reps],
        ),
        _row("peak RSS, worker child (MiB)", [r["api"]["worker_peak_rss_mb"] for r in reps]),
        _row("peak RSS, floor process (MiB)", [r["floor"]["peak_rss_mb"] for r in reps]),
        _row("API artifact zip (MB)", [r["api"]["artifact_bytes"] / 1e6 for r in reps]),
        _row("floor output zip (MB)", [r["floor"]["zip_bytes"] / 1e6 for r in reps]),
        [
            *_row(
                "sparsity of pruned variables, API artifact",
                [r["verify"]["api"]["sparsity"] for r in reps],
                mean=False,
            ),
            "",
        ],
        [
            *_row(
                "sparsity of pruned variables, floor output",
                [r["verify"]["floor"]["sparsity"] for r in reps],
                mean=False,
            ),
            "",
        ],
    ]
    for batch in sorted(reps[0]["api"]["latency_ms"]["baseline"], key=int):
        facts.append(
            [
                f"job's latency measurement, batch {batch}: p50 baseline / pruned (ms)",
                *[
                    f"{r['api']['latency_ms']['baseline'][batch]['p50']:.0f} / "
                    f"{r['api']['latency_ms']['pruned'][batch]['p50']:.0f}"
                    for r in reps
                ],
                "",
            ]
        )
    for who, label in (("api", "API artifact"), ("floor", "floor output")):
        facts.append(
            [
                f"{label}: checkpoint tensors (float, rank >= 2) left dense / all",
                *[
                    f"{r['verify'][who]['checkpoint']['dense_tensors']} / {r['verify'][who]['checkpoint']['tensors']}"
                    f" ({r['verify'][who]['checkpoint']['dense_params']:,} dense weights)"
                    for r in reps
                ],
                "",
            ]
        )
        facts.append(
            _row(
                f"{label}: zero fraction over the whole checkpoint",
                [r["verify"][who]["checkpoint"]["zero_fraction"] for r in reps],
            )
        )
    lines.append(md_table(heads, facts))
    check = reps[0]["verify"]["api"]
    lines.append(
        f"Verified (every repeat, both outputs): unzip + `tf.saved_model.load`, signatures {check['signatures']} "
        f"as the input, {check['prunable_variables']} pruned variables ({check['prunable_params']:,} weights), "
        f"sparsity {TARGET} +- 0.01 overall and per variable.\n"
    )
    ckpt = result["input_checkpoint"]
    lines.append(
        f"The input's variables checkpoint holds {ckpt['tensors']} float tensors of rank >= 2 "
        f"({ckpt['params']:,} weights) while its signatures use {check['prunable_variables']} prunable variables "
        f"({check['prunable_params']:,} weights).\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    cli = parser.parse_args()
    print(run_resnet(smoke=cli.smoke, repeats=cli.repeats)["markdown"])
