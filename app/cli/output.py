"""What a command hands back: its result on stdout (one JSON document with --json, else text for people),
notes on stderr, and the exit code (documented in `secateurs --help` and the README)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from app.client import Job

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job (or the model) ended failed / canceled / invalid
EXIT_USAGE = 2  # bad arguments or files, or the server refused the request (4xx problem)
EXIT_UNAVAILABLE = 3  # no connection, 5xx / 429, or a corrupt download
EXIT_TIMEOUT = 4  # --wait ran past --timeout (the job goes on running)
EXIT_INTERRUPTED = 130


class Output:
    """Where results go: one JSON document on stdout with --json, else text for people. Notes and progress
    always go to stderr, so stdout stays parseable and pipeable in both modes."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, default=str), file=self.out)
        else:
            print(text() if callable(text) else text, file=self.out)

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned columns, header in capitals; '-' for missing values."""
    if not rows:
        return "(none)"
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": f"{job.progress * 100:.0f}%",
        "model": job.model_id,
        "created": job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else None,
    }


def job_text(job: Job) -> str:
    lines = [
        f"id:          {job.id}",
        f"status:      {job.status}",
        f"stage:       {job.stage or '-'}",
        f"progress:    {job.progress * 100:.0f}%",
        f"model:       {job.model_id}",
        f"train:       {job.train_dataset_id or '-'}",
        f"eval:        {job.eval_dataset_id or '-'}",
        f"calibration: {job.calibration_dataset_id or '-'}",
        f"created:     {job.created_at or '-'}",
        f"started:     {job.started_at or '-'}",
        f"finished:    {job.finished_at or '-'}",
    ]
    if job.error:
        lines.append(f"error:       [{job.error.code}] {job.error.message}")
    lines.append(f"spec:        {json.dumps(job.spec, sort_keys=True)}")
    return "\n".join(lines)


def metrics_summary(metrics: dict[str, Any]) -> str:
    """One line a person reads after a job: sparsity (parameters when channels were removed: the compact
    model has no zeros left to count), the headline metric before -> after, zip size."""
    baseline = metrics.get("baseline") or {}
    pruned = metrics.get("pruned") or {}
    parts = []
    compacted = bool((metrics.get("structure") or {}).get("compact"))
    totals = ((baseline.get("params") or {}).get("total"), (pruned.get("params") or {}).get("total"))
    if compacted and all(isinstance(t, int) for t in totals):
        parts.append(f"params {totals[0]:,} -> {totals[1]:,} (channels removed)")  # zeros are gone, too
    elif isinstance(pruned.get("sparsity"), int | float):
        parts.append(f"sparsity {pruned['sparsity']:.2f}")
    before, after = baseline.get("metrics") or {}, pruned.get("metrics") or {}
    for name in ("accuracy", "r2", "mse", "mae"):
        if isinstance(before.get(name), int | float) and isinstance(after.get(name), int | float):
            parts.append(f"{name} {before[name]:.3f} -> {after[name]:.3f}")
            break
    zips = (baseline.get("size_bytes") or {}).get("zip"), (pruned.get("size_bytes") or {}).get("zip")
    if all(isinstance(z, int) for z in zips):
        parts.append(f"zip {human_size(zips[0])} -> {human_size(zips[1])}")
    return ", ".join(parts) or "no metrics summary available"


def export_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per export: size, zip size and accuracy (or the converter's reason)."""
    lines = []
    for name, entry in (metrics.get("exports") or {}).items():
        if "error" in entry:
            lines.append(f"{name}: not produced: {entry['error']}")
            continue
        quality = entry.get("metrics") or {}
        accuracy = f", accuracy {quality['accuracy']:.4f}" if "accuracy" in quality else ""
        size, zipped = human_size(entry["size_bytes"]), human_size(entry["zip_bytes"])
        lines.append(f"{name}: {size}, zipped {zipped}{accuracy}")
    return lines
