"""Channel compaction: what physically removing pruned channels buys, side by side with the dense upload.

Part 1, speed and size (``MODELS``: ResNet-50 and MobileNetV2 from ``keras.applications``, ``weights=None``,
224x224, exported with ``model.export``; random weights are fine for latency). For every model and channel
fraction in ``FRACTIONS`` one job runs in this process through ``worker.pipeline.run_pipeline`` (the worker's
code path, no HTTP): ``{"target_sparsity": f, "granularity": "channel"}`` -- layer scope, magnitude, one-shot,
so every channel group the analysis can prune loses the fraction ``f`` of its channels -- with compaction on
(the default for channel granularity) and no dataset (the equivalence check then runs on seeded random
inputs). Reported per cell: parameters, SavedModel bytes and MACs of the dense upload vs the compact artifact
(from the job's metrics), the time compaction adds to the job (``timings_s.compact``: rewrite, save, load,
check), the equivalence check's max abs difference, and CPU latency at batch 1 and 8. Latency is measured
here, both models loaded in one process and called alternately (one call of each per round, ``RUNS`` timed
rounds after ``WARMUP``), so machine noise hits both alike; the speed-up is dense p50 / compact p50.

Goal (issue 12): ResNet-50 at 50% of channels at least ``GOAL_SPEEDUP`` x faster at batch 1.

Part 2, quality (digits CNN of ``bench/digits_quality.py``, trained, same split): channel pruning +
compaction at ``DIGITS_FRACTIONS`` with the recommended spec (``bench.tfmot_quality.RECOMMENDED``: global LAMP,
polynomial schedule, 3 epochs of fine-tuning with distillation), beside unstructured pruning with the same
spec at the *same parameter count*: its target is the fraction of prunable weights the compact model no
longer holds as nonzero (``1 - nonzero prunable of the compact model / dense prunable``), so both keep the
same number of nonzero weights.
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, export_and_zip, export_keras_application, md_table
from tests.support.model_cache import cached_model

MODELS = ("resnet50", "mobilenetv2")
FRACTIONS = (0.3, 0.5, 0.7)
BATCHES = (1, 8)
RUNS, WARMUP, BUDGET_S = 20, 3, 60.0  # per batch size, both models together
GOAL_MODEL, GOAL_FRACTION, GOAL_BATCH, GOAL_SPEEDUP = "resnet50", 0.5, 1, 2.0
DIGITS_FRACTIONS = (0.5, 0.7)
DIGITS_EPOCHS = 3
SMOKE = {
    "models": ("small_mobilenet",),
    "fractions": (0.5,),
    "runs": 3,
    "digits_fractions": (0.5,),
    "digits_epochs": 1,
    "baseline_epochs": 3,
}
JOB_LATENCY = {"batch_sizes": [1], "runs": 3, "warmup": 1, "budget_s": 5.0}  # the job's own (not the table's)


def _timed_call(fn: Any, key: str, x: Any) -> Callable[[], object]:
    return lambda: [t.numpy() for t in fn(**{key: x}).values()]


def _latency(dense_dir: Path, compact_dir: Path, runs: int) -> dict[str, dict[str, Any]]:
    """``{batch: {"dense": stats, "compact": stats, "speedup"}}``: both loaded here, called alternately."""
    import numpy as np
    import tensorflow as tf

    from worker.stages.latency import budgeted_latency

    dense = tf.saved_model.load(str(dense_dir))
    compact = tf.saved_model.load(str(compact_dir))
    fd, fc = dense.signatures["serving_default"], compact.signatures["serving_default"]
    (key,) = fd.structured_input_signature[1]
    shape = [d or 1 for d in fd.structured_input_signature[1][key].shape[1:]]
    out: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        x = tf.constant(rng.standard_normal([batch, *shape]).astype("float32"))
        stats, done, _ = budgeted_latency(
            {"dense": _timed_call(fd, key, x), "compact": _timed_call(fc, key, x)},
            runs,
            WARMUP,
            BUDGET_S,
            batch,
        )
        out[str(batch)] = {**stats, "speedup": stats["dense"]["p50"] / stats["compact"]["p50"], "runs": done}
    del dense, compact
    gc.collect()
    return out


def _job(model_dir: Path, spec: dict[str, Any], train: Any, test: Any, out: Path) -> dict[str, Any]:
    from app.schemas.spec import PruneSpec
    from worker.pipeline import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    full = {"evaluation": {"latency": JOB_LATENCY}, **spec}
    return run_pipeline(model_dir, PruneSpec.model_validate(full), train, test, out, lambda stage, p: None)


def _speed_cells(
    models: tuple[str, ...], fractions: tuple[float, ...], runs: int, cache: Path, work: Path
) -> list:
    cells: list[dict[str, Any]] = []
    for name in models:
        root, _ = cached_model(export_and_zip, export_keras_application, name, cache_dir=cache)
        dense_dir = root / "saved_model"
        for fraction in fractions:
            out = work / f"{name}_{fraction}"
            tick = time.perf_counter()
            metrics = _job(
                dense_dir,
                {
                    "target_sparsity": fraction,
                    "granularity": "channel",
                    "scope": "layer",
                    "criterion": "magnitude",
                },
                None,
                None,
                out,
            )
            job_s = time.perf_counter() - tick
            structure = metrics.get("structure") or {}
            cell: dict[str, Any] = {
                "model": name,
                "fraction": fraction,
                "compact": bool(structure.get("compact")),
                "notes": structure.get("notes"),
                "max_abs_diff": structure.get("max_abs_diff"),
                "groups": len(structure.get("groups", [])),
                "groups_pruned": sum(
                    1
                    for g in structure.get("groups", [])
                    if g.get("channels_after", 0) < g.get("channels_before", 0)
                ),
                "groups_left_whole": sum(1 for g in structure.get("groups", []) if "reason" in g),
                "params": (metrics["baseline"]["params"]["total"], metrics["pruned"]["params"]["total"]),
                "bytes": (
                    metrics["baseline"]["size_bytes"]["saved_model"],
                    metrics["pruned"]["size_bytes"]["saved_model"],
                ),
                "macs": (
                    (metrics["baseline"].get("macs") or {}).get("dense_macs"),
                    (metrics["pruned"].get("macs") or {}).get("dense_macs"),
                ),
                "compact_s": metrics["timings_s"].get("compact"),
                "compact_split_s": structure.get("seconds"),
                "analysis_s": metrics["timings_s"].get("channel_groups"),
                "job_s": job_s,
                "timings_s": metrics["timings_s"],
            }
            if cell["compact"]:
                cell["latency"] = _latency(dense_dir, out / "saved_model", runs)
            print(f"[compaction] {name} {fraction}: {_cell_line(cell)}", file=sys.stderr, flush=True)
            cells.append(cell)
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
    return cells


def _cell_line(cell: dict[str, Any]) -> str:
    lat = cell.get("latency") or {}
    speed = ", ".join(f"batch {b}: {v['speedup']:.2f}x" for b, v in lat.items())
    return f"compact={cell['compact']} params {cell['params'][0]} -> {cell['params'][1]}; {speed or cell['notes']}"


def _digits_cells(
    fractions: tuple[float, ...], epochs: int, baseline_epochs: int, cache: Path, work: Path
) -> list:
    import numpy as np

    from bench.digits_quality import prepare
    from bench.tfmot_quality import RECOMMENDED

    inputs = prepare(cache, baseline_epochs)
    load = lambda p: dict(np.load(p, allow_pickle=False))  # noqa: E731
    train, test = load(inputs["train"]), load(inputs["test"])
    model = Path(inputs["saved_model"])
    spec = {**RECOMMENDED, "fine_tune": {**RECOMMENDED["fine_tune"], "epochs": epochs}}
    cells = []
    for fraction in fractions:
        channel = _job(
            model,
            {**spec, "target_sparsity": fraction, "granularity": "channel"},
            train,
            test,
            work / f"c{fraction}",
        )
        c_side = channel["pruned"]
        dense_prunable = channel["baseline"]["params"]["prunable"]
        kept = round(c_side["params"]["prunable"] * (1.0 - c_side["sparsity"]))
        target = min(0.99, max(0.01, 1.0 - kept / dense_prunable))
        unstructured = _job(model, {**spec, "target_sparsity": target}, train, test, work / f"u{fraction}")
        lat_c = _latency(
            model, work / f"c{fraction}" / "saved_model", RUNS
        )  # interleaved with the dense model
        lat_u = _latency(model, work / f"u{fraction}" / "saved_model", RUNS)
        u_side = unstructured["pruned"]
        cells.append(
            {
                "fraction": fraction,
                "baseline_accuracy": channel["baseline"]["metrics"]["accuracy"],
                "channel": {
                    "accuracy": c_side["metrics"]["accuracy"],
                    "compact": bool((channel.get("structure") or {}).get("compact")),
                    "params": c_side["params"],
                    "nonzero_prunable": kept,
                    "saved_model_bytes": c_side["size_bytes"]["saved_model"],
                    "macs": (c_side.get("macs") or {}).get("dense_macs"),
                    "latency": lat_c,
                    "compact_s": channel["timings_s"].get("compact"),
                },
                "unstructured": {
                    "target": target,
                    "accuracy": u_side["metrics"]["accuracy"],
                    "params": u_side["params"],
                    "nonzero_prunable": round(u_side["params"]["prunable"] * (1.0 - u_side["sparsity"])),
                    "saved_model_bytes": u_side["size_bytes"]["saved_model"],
                    "macs": (u_side.get("macs") or {}).get("dense_macs"),
                    "latency": lat_u,
                },
                "baseline_params": channel["baseline"]["params"],
            }
        )
        print(
            f"[compaction] digits {fraction}: channel {cells[-1]['channel']['accuracy']:.4f} vs unstructured "
            f"{cells[-1]['unstructured']['accuracy']:.4f} at {target:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return cells


def run_compaction(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    """Both parts; returns the cells, the goal's status and the markdown."""
    cache = cache_dir or OUT_DIR / "cache"
    work = work_dir or OUT_DIR / ("compaction-smoke" if smoke else "compaction")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = SMOKE["models"] if smoke else MODELS
    fractions = SMOKE["fractions"] if smoke else FRACTIONS
    runs = int(SMOKE["runs"]) if smoke else RUNS
    tick = time.perf_counter()
    speed = _speed_cells(models, fractions, runs, cache, work)  # type: ignore[arg-type]
    from bench.digits_quality import BASELINE_EPOCHS

    digits_epochs = int(SMOKE["digits_epochs"]) if smoke else DIGITS_EPOCHS  # type: ignore[call-overload]
    digits = _digits_cells(
        SMOKE["digits_fractions"] if smoke else DIGITS_FRACTIONS,  # type: ignore[arg-type]
        digits_epochs,
        int(SMOKE["baseline_epochs"]) if smoke else BASELINE_EPOCHS,  # type: ignore[call-overload]
        cache,
        work / "digits",
    )
    goal = next(
        (
            c
            for c in speed
            if c["model"] == GOAL_MODEL and c["fraction"] == GOAL_FRACTION and c.get("latency")
        ),
        None,
    )
    speedup = None if goal is None else goal["latency"][str(GOAL_BATCH)]["speedup"]
    result = {
        "smoke": smoke,
        "speed": speed,
        "digits": digits,
        "digits_epochs": digits_epochs,
        "goal": {
            "model": GOAL_MODEL,
            "fraction": GOAL_FRACTION,
            "batch": GOAL_BATCH,
            "wanted": GOAL_SPEEDUP,
            "speedup": speedup,
            "met": speedup is not None and speedup >= GOAL_SPEEDUP,
        },
        "wall_s": time.perf_counter() - tick,
    }
    result["markdown"] = render(result)
    return result


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f} MB"


def _g(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e9:.2f} G" if value >= 1e8 else f"{value / 1e6:.1f} M"


def _m(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f} M"


def _split(cell: dict[str, Any]) -> str:
    """Seconds the structure work added to the job: graph analysis + compaction (rewrite + load/check)."""
    if cell["compact_s"] is None:
        return "n/a"
    split = cell.get("compact_split_s") or {}
    analysis = cell.get("analysis_s") or 0.0
    detail = f" = {analysis:.1f} + {split['rewrite']:.1f} + {split['check']:.1f}" if split else ""
    return f"{analysis + cell['compact_s']:.1f}{detail}"


def render(result: dict[str, Any]) -> str:
    rows = []
    for c in result["speed"]:
        lat = c.get("latency") or {}

        def ms(batch: str, side: str, lat: dict[str, Any] = lat) -> str:
            return f"{lat[batch][side]['p50']:.1f}" if batch in lat else "n/a"

        def sp(batch: str, lat: dict[str, Any] = lat) -> str:
            return f"**{lat[batch]['speedup']:.2f}x**" if batch in lat else "n/a"

        diff = c.get("max_abs_diff") or {}
        rows.append(
            [
                c["model"],
                f"{c['fraction']:.0%}",
                f"{_m(c['params'][0])} -> {_m(c['params'][1])}",
                f"{_mb(c['bytes'][0])} -> {_mb(c['bytes'][1])}",
                f"{_g(c['macs'][0])} -> {_g(c['macs'][1])}",
                f"{ms('1', 'dense')} -> {ms('1', 'compact')}",
                sp("1"),
                f"{ms('8', 'dense')} -> {ms('8', 'compact')}",
                sp("8"),
                _split(c),
                f"{max((v for v in diff.values() if v is not None), default=float('nan')):.1e}",
                f"{c['groups_pruned']}/{c['groups']} ({c['groups_left_whole']} whole)",
            ]
        )
    speed = md_table(
        [
            "model",
            "channels removed",
            "params",
            "SavedModel",
            "MACs",
            "b1 p50 ms",
            "b1 speed-up",
            "b8 p50 ms",
            "b8 speed-up",
            "s added (analysis + rewrite + check)",
            "max abs diff",
            "groups pruned",
        ],
        rows,
    )
    not_compact = [c for c in result["speed"] if not c["compact"]]
    goal = result["goal"]
    status = (
        "n/a (not measured)"
        if goal["speedup"] is None
        else f"{goal['speedup']:.2f}x -> **{'met' if goal['met'] else 'missed'}** (goal >= {goal['wanted']:.1f}x)"
    )
    drows = []
    for d in result["digits"]:
        ch, un = d["channel"], d["unstructured"]
        drows.append(
            [
                f"{d['fraction']:.0%} channels",
                f"{d['baseline_accuracy']:.4f}",
                f"{ch['accuracy']:.4f}",
                f"{un['accuracy']:.4f} (target {un['target']:.3f})",
                f"{ch['nonzero_prunable']} / {un['nonzero_prunable']}",
                f"{ch['params']['total']} / {un['params']['total']}",
                f"{ch['saved_model_bytes'] / 1e3:.0f} kB / {un['saved_model_bytes'] / 1e3:.0f} kB",
                f"{ch['latency']['1']['speedup']:.2f}x / {un['latency']['1']['speedup']:.2f}x",
                f"{ch['latency']['8']['speedup']:.2f}x / {un['latency']['8']['speedup']:.2f}x",
            ]
        )
    digits = md_table(
        [
            "cut",
            "dense acc.",
            "channel + compact acc.",
            "unstructured acc.",
            "nonzero prunable (ch / unstr.)",
            "params stored (ch / unstr.)",
            "SavedModel (ch / unstr.)",
            "b1 speed-up vs dense (ch / unstr.)",
            "b8 speed-up vs dense (ch / unstr.)",
        ],
        drows,
    )
    lines = [
        "### Speed and size: dense upload -> compact artifact",
        "",
        "One job per cell through `run_pipeline` (`granularity: channel`, layer scope, magnitude, one-shot, "
        "compaction on, no dataset: equivalence checked on seeded random inputs). Latency: both SavedModels "
        f"loaded in one process, called alternately, p50 of up to {RUNS} rounds after {WARMUP} warm-up. "
        "The machine is shared by several agents: absolute milliseconds are noisy, the side-by-side ratios less so.",
        "",
        speed,
        f"**Goal** ResNet-50 at 50% of channels, batch 1: {status}.",
    ]
    if not_compact:
        lines += [
            "",
            "Cells not compacted: "
            + "; ".join(f"{c['model']} {c['fraction']}: {c['notes']}" for c in not_compact),
        ]
    lines += [
        "",
        "### Digits CNN: channel pruning + compaction vs unstructured at the same parameter count",
        "",
        "Recommended spec (global LAMP, polynomial schedule, fine-tuning with distillation, "
        f"{result['digits_epochs']} epochs); unstructured's target keeps as many nonzero prunable weights as the compact model holds.",
        "",
        digits,
    ]
    return "\n".join(lines) + "\n"
