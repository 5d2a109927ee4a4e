"""Will this prune fit in the worker's memory? Checked before pruning, so a job that cannot fit fails with
what to change instead of the worker being killed mid-prune (and the job ending ``interrupted`` after every
try). Factors are measured (bench/RESULTS.md ``bigmodel``, docs/operations.md "Worker memory") on float32
weights, unstructured granularity, beyond the loaded model itself; lower bounds, so a job that fits is never
refused: layer scope keeps the boolean masks (1/4 of the weights) and one variable's score, copy and mask at a
time (~3.4x that variable); global scope keeps every score for the one ranking (x2 with the ranking's copy);
LAMP's float64 sort, suffix sums and indices made it ~11x the weights on a 776 MB model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.models import NamedVariable

__all__ = ["available_bytes", "check_prune_memory", "prune_bytes"]

_GB = 1e9
_MARGIN = 1.0  # refuse only when the estimate alone exceeds what is available


def prune_bytes(spec: PruneSpec, variables: Sequence[NamedVariable]) -> int | None:
    """Bytes the prune needs beyond the loaded model, or None where there is no measured estimate (structured
    granularities rank small group scores; fine-tuning's own needs are the optimizer's)."""
    if spec.granularity != "unstructured" or spec.fine_tune is not None or not variables:
        return None
    sizes = [nv.size * nv.var.dtype.size for nv in variables]
    masks = sum(nv.size for nv in variables)  # one bool per weight
    if spec.scope == "layer":
        return masks + int(3 * max(sizes))
    if spec.normalization == "lamp":
        return masks + 10 * sum(sizes)
    return masks + 2 * sum(sizes)


def available_bytes() -> int | None:
    """What this process may still allocate: the kernel's MemAvailable, capped by a cgroup v2 limit."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_prune_memory(spec: PruneSpec, variables: Sequence[NamedVariable]) -> None:
    """PipelineError ``insufficient_memory`` naming the cheaper settings when the estimate does not fit."""
    need = prune_bytes(spec, variables)
    free = available_bytes()
    if need is None or free is None or need <= free * _MARGIN:
        return
    weights = sum(nv.size * nv.var.dtype.size for nv in variables)
    layer = prune_bytes(spec.model_copy(update={"scope": "layer"}), variables) or 0
    how = (
        "a global LAMP ranking"
        if spec.scope == "global" and spec.normalization == "lamp"
        else ("a global ranking" if spec.scope == "global" else "layer scope")
    )
    advice = (
        f'"scope": "layer" needs about {layer / _GB:.1f} GB' if spec.scope == "global" else "nothing cheaper"
    )
    raise PipelineError(
        "insufficient_memory",
        f"pruning {weights / _GB:.1f} GB of weights with {how} needs about {need / _GB:.1f} GB more memory "
        f"than the loaded model, and this worker has {free / _GB:.1f} GB available ({advice}); change the "
        "spec or run a worker with more memory (docs: operations, Worker memory)",
    )
