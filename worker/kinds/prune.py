"""The ``prune`` kind -- one run at ``target_sparsity`` -- and the signature every kind shares.

Every kind is built from that one run (``RunPrune``, handed over by ``worker.pipeline``): ``prune`` calls it
once as it is, the others once or more with a spec of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.stages.job import Job, Window

RunPrune = Callable[[Window, Path], dict[str, Any]]
Kind = Callable[[Job, Window, Path, RunPrune], dict[str, Any]]


def run_prune_kind(job: Job, window: Window, out_dir: Path, run_prune: RunPrune) -> dict[str, Any]:
    """``run_prune`` once: ``job.spec`` carries the ``target_sparsity``."""
    return run_prune(window, out_dir)
