"""Job kinds: one orchestration module each, all built from the pipeline's stages.

``worker.pipeline.run_pipeline`` loads the model once and calls :func:`run_kind`, its only dispatch point. A
kind receives the loaded ``Job``, the job's progress ``Window`` and ``run_prune(window, out_dir)``: today's
one-run pipeline (baseline, [K-fold], prune + fine-tune, evaluate, [compact], save, [export]) on the handle as
it is, per ``job.spec`` (which must then carry a ``target_sparsity``). Kinds (``KINDS``, keyed by the spec's
``JobKind``; tests/test_vocabularies.py keeps both the same):

- ``prune`` (``worker.kinds.prune``): ``run_prune`` once (``target_sparsity``).
- ``search`` (``worker.kinds.search``): trials on the one handle with the dense weights swapped back in from
  memory, then ``run_prune`` at the chosen sparsity.
- ``sweep`` (``worker.kinds.sweep``): ``run_prune`` once per target, dense weights restored in between.
- ``sensitivity`` (``worker.kinds.sensitivity``): one variable at a time, one-shot, then ``run_prune`` with
  the suggested ``layer_sparsity``; the job keeps no artifact (``worker.tasks`` drops it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.kinds.prune import Kind, RunPrune, run_prune_kind
from worker.kinds.search import run_search
from worker.kinds.sensitivity import run_sensitivity
from worker.kinds.sweep import run_sweep
from worker.stages.job import Job, Window

KINDS: dict[str, Kind] = {
    "prune": run_prune_kind,
    "search": run_search,
    "sweep": run_sweep,
    "sensitivity": run_sensitivity,
}


def run_kind(job: Job, window: Window, out_dir: Path, run_prune: RunPrune) -> dict[str, Any]:
    """The metrics document (without timings) of the job kind ``job.spec.kind()``."""
    return KINDS[job.spec.kind()](job, window, out_dir, run_prune)
