"""The metrics document (``GET /v1/jobs/{id}/metrics``) as pydantic models, and its published JSON Schema.

Clients integrate against this document, so its shape is written down once here and real outputs are tested
against it. Keys API.md names are required; everything else is optional. Models where the document is
expected to grow (new metrics, new per-layer columns, new sections) allow extra keys, so adding a field never
breaks validation -- renaming or removing a required one does. No TensorFlow here: the API serves this.

Quality ``metrics`` of one side are one of: null (no labelled evaluation data); classification or regression
metrics of the output the labels refer to (API.md's flat keys); or ``{output name: those metrics}`` for a
multi-output model evaluated per output.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "ClassificationMetrics",
    "CrossValidation",
    "ExportFailure",
    "ExportFile",
    "Fidelity",
    "LatencyStats",
    "Layer",
    "Macs",
    "MetricsDocument",
    "Params",
    "PrunedSide",
    "RegressionMetrics",
    "SearchSection",
    "SensitivitySection",
    "Side",
    "SizeBytes",
    "Structure",
    "StructureGroup",
    "SweepSection",
    "Timings",
    "Versions",
    "metrics_json_schema",
]

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
BatchSize = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*$")]


class _Open(BaseModel):
    """Named keys are checked; any other key is kept as is (the document grows by adding fields)."""

    model_config = ConfigDict(extra="allow")


class ClassificationMetrics(_Open):
    """API.md's classification keys (required) and the ones added since (optional)."""

    task: str | None = Field(None, description="'classification' when present")
    accuracy: Probability
    precision_macro: Probability
    recall_macro: Probability
    f1_macro: Probability
    confusion_matrix: list[list[Annotated[int, Field(ge=0)]]] = Field(description="rows: true class")
    loss: float | None = Field(description="log loss; null if undefined")
    top5_accuracy: Probability | None = Field(None, description="only when the model has more than 5 classes")
    precision_weighted: Probability | None = None
    recall_weighted: Probability | None = None
    f1_weighted: Probability | None = None
    classification_report: dict[str, Any] | None = Field(
        None,
        description="scikit-learn's classification_report(output_dict=True), every class the model outputs",
    )


class RegressionMetrics(_Open):
    task: str | None = Field(None, description="'regression' when present")
    mse: float | None
    mae: float | None
    r2: float | None = Field(description="null with fewer than two samples")
    per_target: dict[str, list[float | None] | None] | None = Field(
        None, description="mse/mae/r2 per target column, when an output has several"
    )


QualityMetrics = ClassificationMetrics | RegressionMetrics


class Params(_Open):
    total: Annotated[int, Field(ge=0)]
    prunable: Annotated[int, Field(ge=0)]
    nonzero: Annotated[int, Field(ge=0)]


class SizeBytes(_Open):
    saved_model: Annotated[int, Field(ge=0)]
    zip: Annotated[int, Field(ge=0)] = Field(description="deflate-compressed artifact")


class LatencyStats(_Open):
    """Milliseconds per call at one batch size; samples_per_s = batch size / mean latency."""

    p50: float
    p95: float
    mean: float | None = None
    samples_per_s: float | None = None
    runs: Annotated[int, Field(ge=1)] | None = Field(
        None, description="timed calls made per model (fewer than asked when the time budget cut them)"
    )
    warmup: Annotated[int, Field(ge=0)] | None = Field(None, description="untimed calls made per model first")


class Fidelity(_Open):
    """Agreement of pruned with baseline predictions (no labels needed)."""

    mean_abs_output_diff: float | None
    max_abs_output_diff: float | None = None
    top1_agreement: Probability | None = Field(None, description="classification outputs only")
    kl_divergence: float | None = Field(None, description="mean KL(baseline || pruned), classification only")


class Macs(_Open):
    """Multiply-accumulates per sample summed over the layers whose count is known (worker.evaluation.flops)."""

    dense_macs: Annotated[int, Field(ge=0)]
    effective_macs: Annotated[int, Field(ge=0)] = Field(
        description="nonzero weights only: what a sparse kernel could skip; dense TF kernels do not"
    )
    effective_fraction: Probability | None = None
    uncounted: list[str] = Field(default_factory=list, description="layers whose MACs are unknown")


class Side(_Open):
    """One model (baseline or pruned) as measured."""

    metrics: QualityMetrics | dict[str, QualityMetrics] | None
    params: Params
    sparsity: Probability = Field(description="zeros among prunable weights / prunable weights")
    size_bytes: SizeBytes
    latency_ms: dict[BatchSize, LatencyStats] = Field(
        description="keyed by batch size",
        json_schema_extra={"additionalProperties": False},  # as strict as pydantic: only batch-size keys
    )
    metrics_by_output: dict[str, QualityMetrics] | None = Field(
        None, description="every labelled output of a multi-output signature, by output name"
    )
    macs: Macs | None = None


class PrunedSide(Side):
    fidelity: Fidelity | dict[str, Fidelity] | None = Field(
        None, description="agreement with the baseline; per output name for multi-output models"
    )
    fidelity_by_output: dict[str, Fidelity] | None = None


class Layer(_Open):
    """One prunable variable; extra columns (target, kind, dense_macs, effective_macs, ...) are allowed."""

    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    params: Annotated[int, Field(ge=0)]
    sparsity: Probability
    positions: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="where the kernel is applied per sample (output pixels of a convolution); null: unknown",
    )
    dense_macs: Annotated[int, Field(ge=0)] | None = None
    effective_macs: Annotated[int, Field(ge=0)] | None = Field(
        None, description="nonzero weights x positions"
    )


class Timings(_Open):
    """Seconds per stage."""

    load: float
    baseline: float
    prune: float
    fine_tune: float
    evaluate: float
    save: float
    total: float
    cross_validation: float | None = Field(None, description="all folds, when cross-validation ran")
    compact: float | None = Field(None, description="building and checking the compact model, when it ran")
    channel_groups: float | None = Field(
        None, description="reading the channel groups from the graph (inside prune or compact)"
    )
    calibration: float | None = Field(
        None,
        description="calibration criteria: capturing op inputs and computing scores or updates (inside prune)",
    )


class Versions(_Open):
    secateurs: str
    tensorflow: str


class StructureGroup(_Open):
    """One channel group of the signature's graph: channels before/after when pruned, else why left whole."""

    id: str
    members: list[str] = Field(description="variables holding the group's channels (kernels, biases, BN, ...)")
    channels_before: Annotated[int, Field(ge=0)] | None = None
    channels_after: Annotated[int, Field(ge=0)] | None = None
    reason: str | None = Field(None, description="why the group was left whole")


class Structure(_Open):
    """Channel groups and compaction (spec ``compact``): whether the artifact is the compact model."""

    compact: bool = Field(description="true: the artifact's removed channels are physically gone")
    groups: list[StructureGroup]
    max_abs_diff: dict[str, float | None] | None = Field(
        None, description="per output: max |compact - masked| on the job's data (the equivalence check)"
    )
    tolerance: dict[str, float] | None = Field(None, description="per output: the largest difference accepted")
    notes: list[str] | None = Field(None, description="why nothing was compacted, what the rewrite did")


class CrossValidation(_Open):
    """K-fold results: per-fold metrics and mean/std per metric."""

    folds: Annotated[int, Field(ge=2, le=10)]
    per_fold: list[dict[str, Any]] = Field(
        description='one row per fold: "fold", "n_train", "n_test", "baseline" and "pruned" metrics, "fidelity", '
        '"sparsity", "seconds"'
    )
    summary: dict[str, Any] = Field(description='{"baseline": {metric: {"mean", "std"}}, "pruned": ...}')
    stratified: bool | None = None
    note: str | None = Field(None, description="why the folds are not stratified, when they are not")
    task: str | None = Field(None, description="the task the folds were planned for")


class ExportFile(_Open):
    """One converted file (``exports.tflite_int8``, ``exports.onnx``, ...) as its runtime (LiteRT, ONNX Runtime)
    ran it, batch 1, on the same reference data as ``pruned`` (docs/exports.md)."""

    size_bytes: Annotated[int, Field(ge=0)]
    zip_bytes: Annotated[int, Field(ge=0)] = Field(
        description="the file deflated in a zip, like size_bytes.zip"
    )
    metrics: QualityMetrics | None = Field(description="from the runtime's outputs; null without labels")
    fidelity: Fidelity | None = Field(
        description="against the pruned SavedModel's outputs; null without data"
    )
    latency_ms: dict[BatchSize, LatencyStats] = Field(description='{"1": ...}: one runtime call per sample')
    io_types: dict[str, str] | None = Field(None, description="dtype of every input:/output: tensor")
    versions: dict[str, str] | None = Field(
        None, description="the converter's and runtime's package versions (tensorflow, ai-edge-litert; tf2onnx, ...)"
    )
    n_samples: Annotated[int, Field(ge=0)] | None = Field(None, description="samples the runtime scored")
    seconds: float | None = Field(None, description="conversion and evaluation time")


class ExportFailure(_Open):
    """A format the converter (or the runtime) refused: its reason on one line, then what to try."""

    error: str
    seconds: float | None = None


class SearchTrial(_Open):
    """One trial of a search: a one-shot ``probe`` or a ``trial`` with the whole spec."""

    sparsity: Probability
    metric: float | None
    passed: bool
    seconds: float
    phase: str | None = Field(None, description="probe (one-shot) or trial (the whole spec)")


class SearchSection(_Open):
    """``spec.search``'s outcome (docs/search.md): the artifact and the top-level metrics are ``chosen``'s."""

    metric: str
    baseline: float = Field(description="the metric of the unpruned model on the selection data")
    threshold: float = Field(description="a trial passes at or above it (at or below for loss, mse, mae)")
    chosen: dict[str, Any] = Field(description='{"sparsity", "metric"} of the best passing trial')
    budget_exhausted: bool
    trials: list[SearchTrial]


class SweepPoint(_Open):
    """One target of a sweep; ``artifact`` names its file under /v1/jobs/{id}/artifacts/."""

    target: Probability
    sparsity: Probability | None = None
    metric: float | None
    pareto: bool


class SweepSection(_Open):
    metric: str | None = None
    points: list[SweepPoint]


class SensitivityRow(_Open):
    """One variable: the metric when only it is pruned at each level of ``sparsities``."""

    name: str
    metrics: list[float | None]
    drops: list[float | None]
    max_sparsity_within_drop: Probability = Field(description="0 = even the lowest level drops too much")


class SensitivitySection(_Open):
    metric: str
    baseline: float
    sparsities: list[Probability]
    max_drop: float
    variables: list[SensitivityRow] = Field(description="most sensitive first")
    layer_sparsity: dict[str, Probability] = Field(description="a suggested spec.layer_sparsity for max_drop")


class BudgetSection(_Open):
    """``spec.budget`` asked vs what the pruned (compacted) model achieved."""

    asked: float = Field(description="the budget: MACs fraction, parameter count or speed-up")
    achieved: float | None = Field(
        description="pruned/baseline dense MACs, pruned parameters, or the speed-up of the compacted artifact "
        "timed alternately with the upload (medians; ``measured``); null when it could not be measured"
    )
    unit: Literal["macs", "params", "latency_speedup"]
    measured: dict[str, float] | None = Field(
        None,
        description='latency budgets: {"dense_ms", "compact_ms", "speedup", "runs", "warmup"} of that timing',
    )


class MetricsDocument(_Open):
    """``GET /v1/jobs/{id}/metrics``."""

    job_id: str
    model_id: str
    spec: dict[str, Any]
    baseline: Side
    pruned: PrunedSide
    delta: dict[str, float | dict[str, float | None] | None] = Field(
        description="pruned - baseline per numeric metric (per output when metrics are per output)"
    )
    delta_by_output: dict[str, dict[str, float | None]] | None = Field(
        None,
        description="pruned - baseline per numeric metric of every labelled output (multi-output models)",
    )
    layers: list[Layer]
    structure: Structure | None = Field(None, description="channel groups and compaction (spec compact)")
    timings_s: Timings
    notes: list[str]
    versions: Versions
    cross_validation: CrossValidation | None = None
    exports: dict[str, ExportFile | ExportFailure] | None = Field(
        None,
        description="converted files by artifact name (tflite_float32, ..., tflite_int8, onnx), when spec.export",
    )
    search: SearchSection | None = None
    sweep: SweepSection | None = None
    sensitivity: SensitivitySection | None = None
    budget: BudgetSection | None = Field(None, description="spec.budget asked vs achieved")


def metrics_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, as pydantic writes it) of the metrics document, for publishing."""
    return MetricsDocument.model_json_schema()
