"""Evaluation stage: what one model (baseline or pruned) scores, how far pruning moved it, what it weighs.

Everything here reads predictions and variables and returns plain JSON values; the numbers themselves come
from ``worker.evaluation`` (quality metrics as scikit-learn defines them, fidelity, parameter counts, MACs).

- Quality (``Scores``): every output that has labels is scored by ``evaluate_output``. The output the plain
  ``y`` refers to (``job.output``) gets the spec's ``evaluation.task`` and ``from_logits``; other outputs of a
  multi-output signature are inferred (a classification head and a regression head differ), and reported
  under ``metrics_by_output``. API.md's flat ``metrics`` stay those of ``job.output``.
- Fidelity: both models' outputs on the same inputs (``Reference``: the eval set, else a seeded subset of
  the train set), so an eval set with ``x`` only still says how much pruning changed the model.
- Weights: ``size.param_counts`` over every variable; MACs (``flops.estimate_flops``) over every kernel of
  the model (not only the pruned ones: the totals are the model's compute), with output spatial sizes read
  from the graph (``worker.models.layer_shapes``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from worker.errors import PipelineError
from worker.evaluation.fidelity import fidelity
from worker.evaluation.flops import SPARSE_NOTE, estimate_flops, flops_kind, flops_totals
from worker.evaluation.metrics import TaskChoice, evaluate_output, infer_from_logits
from worker.evaluation.size import param_counts
from worker.models import NamedVariable
from worker.models.layer_shapes import flops_inputs, kernel_uses
from worker.pruning.granularity import infer_kinds
from worker.pruning.pruner import variable_view
from worker.stages.job import Data, Job

__all__ = [
    "FIDELITY_TRAIN_SAMPLES",
    "Reference",
    "Scores",
    "Weights",
    "delta",
    "fidelity_section",
    "reference_data",
    "score",
]

# Without an eval set, fidelity compares the two models on at most this many train samples (seeded choice):
# a sample of the train set tells how far the outputs moved at a fraction of a full prediction pass.
FIDELITY_TRAIN_SAMPLES = 2048


@dataclass(frozen=True)
class Reference:
    """The inputs baseline and pruned are compared on; quality metrics only when it is a labelled eval set."""

    data: Data
    labelled: bool


def reference_data(job: Job) -> Reference | None:
    """The eval set; else up to ``FIDELITY_TRAIN_SAMPLES`` train samples (seeded); else None (with a note)."""
    if job.evaluation is not None:
        return Reference(job.evaluation, bool(job.evaluation.labels))
    if job.train is None:
        job.note("no dataset: fidelity (agreement of pruned with baseline outputs) is not measured")
        return None
    train = job.train
    if train.stream is not None:  # never a whole pass over a large train set: its in-memory sample
        train = replace(train, stream=None)
    if train.n <= FIDELITY_TRAIN_SAMPLES:
        job.note(f"no evaluation dataset: fidelity is measured on the {train.n} train samples")
        return Reference(train, False)
    rng = np.random.default_rng(job.spec.seed)
    index = np.sort(rng.choice(train.n, size=FIDELITY_TRAIN_SAMPLES, replace=False))
    job.note(
        f"no evaluation dataset: fidelity is measured on {FIDELITY_TRAIN_SAMPLES} of the {train.n} train "
        "samples (seeded random choice); train samples say how far outputs moved, not how well they generalise"
    )
    return Reference(train.subset(index), False)


@dataclass
class Scores:
    """Quality of one model: ``flat`` (API.md's ``metrics``, output ``job.output``), per labelled output, and
    the task / from_logits decided per output (fidelity interprets the outputs the same way)."""

    flat: dict[str, Any] | None
    by_output: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, tuple[TaskChoice, bool | None]] = field(default_factory=dict)


def _spec_settings(job: Job, name: str) -> tuple[TaskChoice, bool | None]:
    """The spec's task / from_logits apply to the output plain labels refer to; other outputs infer theirs."""
    if name != job.output:
        return "auto", None
    evaluation = job.spec.evaluation
    return (evaluation.task if evaluation is not None else "auto"), job.spec.from_logits


def score(job: Job, data: Data | None, predictions: Mapping[str, np.ndarray] | None) -> Scores:
    """Metrics of every labelled output of ``data`` (None/empty when there are no labels)."""
    settings = {name: _spec_settings(job, name) for name in job.sig.outputs}
    # A streamed set's labels are those its last prediction pass read (``stages.feed.Stream``).
    labels = None if data is None else data.labels if data.stream is None else data.stream.labels
    if data is None or predictions is None or not labels:
        return Scores(None, {}, settings)
    by_output: dict[str, dict[str, Any]] = {}
    for name, y in sorted(labels.items()):
        task, from_logits = settings[name]
        output = predictions[name]
        try:
            metrics = evaluate_output(y, output, task, from_logits)
            if metrics["task"] == "classification" and from_logits is None:
                from_logits = infer_from_logits(np.asarray(y)[: len(output)], output)
        except ValueError as exc:
            raise PipelineError(
                "dataset_mismatch", f"labels do not fit output {name!r} ({task}): {exc}"
            ) from exc
        by_output[name] = metrics
        settings[name] = (metrics["task"], from_logits)
    return Scores(by_output.get(job.output), by_output, settings)


def fidelity_section(
    job: Job,
    baseline: Mapping[str, np.ndarray],
    pruned: Mapping[str, np.ndarray],
    settings: Mapping[str, tuple[TaskChoice, bool | None]],
) -> dict[str, dict[str, Any]]:
    """``{output: fidelity}`` for every output both models produced; an output fidelity cannot read (e.g.
    strings) is left out with a note."""
    result: dict[str, dict[str, Any]] = {}
    for name in sorted(baseline):
        task, from_logits = settings.get(name, ("auto", None))
        try:
            result[name] = fidelity(baseline[name], pruned[name], task, from_logits)
        except (ValueError, TypeError) as exc:
            job.note(f"fidelity of output {name!r} not computed: {exc}")
    return result


def delta(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, float]:
    """``pruned - baseline`` for every top-level number both have (lists and reports are left out)."""
    if before is None or after is None:
        return {}
    return {
        k: float(after[k]) - float(before[k])
        for k in before
        if isinstance(before[k], int | float)
        and not isinstance(before[k], bool)
        and isinstance(after.get(k), int | float)
    }


class _Values(Mapping[str, np.ndarray]):
    """Variable values by name, read on access as read-only views: no copy of any variable."""

    def __init__(self, variables: Sequence[NamedVariable]) -> None:
        self._vars = {nv.name: nv.var for nv in variables}

    def __getitem__(self, name: str) -> np.ndarray:
        return variable_view(self._vars[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __len__(self) -> int:
        return len(self._vars)


class Weights:
    """Parameter counts, sparsity and MACs of the job's model; built once, measured before and after pruning.

    The kernels counted for MACs and their layer kinds / output spatial sizes do not change with pruning, so
    the graph is walked once (``kernel_uses``) and ``measure`` only recounts nonzero weights.
    """

    def __init__(self, job: Job, prunable: Sequence[NamedVariable]) -> None:
        self.job = job
        self.prunable = [nv.name for nv in prunable]
        every = job.handle.variables()
        counted = set(self.prunable) | {nv.name for nv in job.handle.prunable()}
        self.kernels = [nv for nv in every if nv.name in counted]
        uses, problem = kernel_uses(job.handle, job.spec.signature)
        self.kinds, self.spatial = flops_inputs(uses)
        shapes = {nv.name: nv.shape for nv in self.kernels}
        pruning_kinds = infer_kinds(shapes, {nv.name: nv.shape for nv in every})
        # A recurrent kernel runs once per time step inside a loop the graph walk does not enter (Keras
        # computes the first step outside it): its MACs are those of one step, whatever the graph showed.
        self.recurrent = {n for n, k in pruning_kinds.items() if k == "recurrent"}
        for name, kind in pruning_kinds.items():
            if name not in self.kinds:  # not seen applied in the graph: the pruner's kind, as MACs count it
                self.kinds[name] = flops_kind(kind, len(shapes[name]))
        job.note(SPARSE_NOTE)
        if problem is not None:
            job.note(
                f"layer output sizes could not be read from the graph ({problem}): convolution MACs are "
                "reported per output position only"
            )
        self.rows: list[dict[str, Any]] = []

    def measure(self) -> dict[str, Any]:
        """``{"params", "sparsity", "macs"}`` now; ``rows`` keeps the per-layer MACs of this measurement."""
        counts = param_counts(_Values(self.job.handle.variables()), self.prunable)
        nonzero = counts["nonzero_by_name"]
        layers = [
            {"name": nv.name, "shape": nv.shape, "kind": self.kinds.get(nv.name)} for nv in self.kernels
        ]
        self.rows = estimate_flops(layers, {nv.name: nonzero[nv.name] for nv in self.kernels}, self.spatial)
        for row in self.rows:
            if row["name"] in self.recurrent:
                row["note"] = "recurrent kernel: MACs of one time step (multiply by the sequence length)"
        result: dict[str, Any] = {"params": counts["params"], "sparsity": counts["sparsity"]}
        if self.rows:
            result["macs"] = flops_totals(self.rows)
        return result

    def layer_columns(self) -> dict[str, dict[str, Any]]:
        """Per kernel: positions, dense and effective MACs (of the last ``measure``) and why any is missing."""
        return {
            row["name"]: {
                "macs_kind": row["kind"],
                "positions": row["positions"],
                "dense_macs": row["dense_macs"],
                "effective_macs": row["effective_macs"],
                "macs_note": row["note"],
            }
            for row in self.rows
        }
