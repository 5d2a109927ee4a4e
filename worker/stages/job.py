"""What the pipeline's stages share: the bound datasets, the job state and the progress window.

Kept apart from the other stages so that the K-fold runner (``stages.crossval``) can build one ``Job`` per
fold with the same loading, pruning and evaluation code as the main run, without import cycles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.models import ModelHandle, SignatureInfo

if TYPE_CHECKING:
    from worker.structure import GroupAnalysis
    from worker.structure.frozen import FrozenSignature

Report = Callable[[str, float], None]

PREDICT_BATCH = 256


@dataclass
class Data:
    """A dataset bound to the signature: inputs by name, labels of the selected output (``y``, or None) and
    labels of every output that has some (``labels``: ``y.<output>``, or ``y`` for the selected output).

    A dataset larger than the worker's in-memory budget (``SECATEURS_DATASET_MEMORY_BYTES``) also carries
    ``stream`` (``worker.stages.feed.Stream``): the arrays are then a bounded sample of its first records
    (what loss inference, gradient statistics, int8 calibration and the compaction probe read), and the stages
    that use the whole set (fine-tuning, evaluation) read the stream batch by batch instead.
    """

    x: dict[str, np.ndarray]
    y: np.ndarray | None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    stream: Any = None  # worker.stages.feed.Stream (typed loosely: feed imports this module)

    @property
    def n(self) -> int:
        """Samples held in memory (for a streamed dataset: the sample's)."""
        return len(next(iter(self.x.values())))

    @property
    def total(self) -> int | None:
        """Samples in the whole dataset (None: a stream that does not know its length)."""
        return self.n if self.stream is None else self.stream.n

    def subset(self, index: np.ndarray) -> Data:
        """The samples at ``index`` (a sorted index array), inputs and labels alike."""
        return Data(
            x={k: v[index] for k, v in self.x.items()},
            y=None if self.y is None else self.y[index],
            labels={k: v[index] for k, v in self.labels.items()},
        )


@dataclass
class Job:
    """What the stages of one run share (the main run, or one cross-validation fold)."""

    spec: PruneSpec
    handle: ModelHandle
    sig: SignatureInfo
    output: str
    train: Data | None
    evaluation: Data | None
    # ``calibration_dataset_id``'s inputs (labels dropped), bound and preprocessed like the others; None: the
    # train dataset's inputs serve (``calibration_inputs``).
    calibration: Data | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    loss: tuple[str, bool] | None = None  # inferred once, see stages.prune.loss_of
    gradient_passes: list[int] = field(default_factory=list)  # samples per gradient-statistics pass
    reconstruction: dict[str, Any] | None = None  # what ``reconstruct`` refit (stages.repair): metrics section
    model_dir: Path | None = None  # where ``handle`` was loaded from: a streamed distillation loads a teacher
    # Channel groups of ``handle`` by signature (``channel_groups``): another handle needs a fresh dict.
    analyses: dict[str, GroupAnalysis] = field(default_factory=dict, repr=False)
    # Frozen signatures by name (``frozen_signature``) when no channel-group analysis froze them already.
    frozen: dict[str, FrozenSignature] = field(default_factory=dict, repr=False)

    def note(self, text: str) -> None:
        """Append a note once (phases that run twice must not repeat themselves)."""
        if text not in self.notes:
            self.notes.append(text)

    def forward(self, x: Mapping[str, tf.Tensor], training: bool) -> tf.Tensor:
        """The selected output: what labels, losses and gradients refer to."""
        return self.handle.call(self.spec.signature, x, training=training)[self.output]

    def calibration_inputs(self) -> dict[str, np.ndarray]:
        """``spec.calibration.samples`` input records (a seeded choice by ``spec.seed``, in their order) from the
        calibration dataset, else from the train dataset (a streamed set: from its in-memory sample): what
        calibration-based criteria and ``reconstruct`` read. Labels are never looked at.

        PipelineError ``dataset_mismatch`` when the job has neither (the API refuses such a job already)."""
        source, role = (
            (self.calibration, "calibration") if self.calibration is not None else (self.train, "train")
        )
        if source is None:
            raise PipelineError(
                "dataset_mismatch",
                "calibration inputs are needed (criterion wanda/sparsegpt or reconstruct): give "
                "calibration_dataset_id or train_dataset_id",
            )
        wanted = self.spec.calibration_settings().samples
        n = source.n
        if n <= wanted:
            index = np.arange(n)
            if n < wanted:
                self.note(
                    f"calibration: all {n} records of the {role} dataset (fewer than calibration.samples)"
                )
        else:
            index = np.sort(np.random.default_rng(self.spec.seed).choice(n, wanted, replace=False))
        if source.stream is not None:
            self.note(
                f"calibration: {len(index)} records chosen from the first {n} records of the streamed {role} set"
            )
        return {k: v[index] for k, v in source.x.items()}

    def calibration_batches(self) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
        """``calibration_inputs`` in batches of ``spec.calibration.batch_size`` (a signature with a fixed batch
        size gets that size, the remainder left out): a factory, since sequential methods make several passes."""
        inputs = self.calibration_inputs()
        n = len(next(iter(inputs.values())))
        fixed = fixed_batch(self.sig)
        size = fixed or self.spec.calibration_settings().batch_size
        if fixed and n < fixed:
            raise PipelineError(
                "dataset_mismatch", f"calibration: the signature takes batches of {fixed}; only {n} records"
            )
        stop = n - n % fixed if fixed else n

        def batches() -> Iterable[dict[str, np.ndarray]]:
            for start in range(0, stop, size):
                yield {k: v[start : start + size] for k, v in inputs.items()}

        return batches

    def channel_groups(self) -> tuple[GroupAnalysis | None, str | None]:
        """``(GroupAnalysis, None)`` from the signature's graph (``worker.structure.find_groups``), or
        ``(None, why not)``: the caller then prunes per variable, masks only, and says so.

        Read once per signature: the groups depend on the graph only (never on the values), and a search
        prunes the job's one handle once per trial (10-15 s of analysis each on a ResNet-50)."""
        try:
            from worker.structure import find_groups
        except ImportError as exc:
            return None, f"channel-group analysis unavailable ({exc})"
        cached = self.analyses.get(self.spec.signature)
        if cached is not None:
            return cached, None
        tick = time.perf_counter()
        try:
            analysis = find_groups(self.handle, self.spec.signature)
            self.analyses[self.spec.signature] = analysis
            return analysis, None
        except Exception as exc:  # e.g. a graph it cannot freeze: per-variable masks are still correct
            return None, f"channel-group analysis failed ({type(exc).__name__}: {str(exc)[:300]})"
        finally:  # part of "prune" (ranking needs the groups) or of "compact"; said apart for the benchmark
            self.timings["channel_groups"] = (
                self.timings.get("channel_groups", 0.0) + time.perf_counter() - tick
            )


    def frozen_signature(self) -> FrozenSignature:
        """The spec's signature frozen (``worker.structure.frozen``): the skeleton calibration methods read the
        ops' inputs from. Frozen once per handle: taken from the channel-group analysis when one ran (it froze
        the signature already; an aliased signature reuses the one it duplicates), else frozen here and kept."""
        name = self.spec.signature
        analysis = self.analyses.get(name)
        if analysis is not None:
            frozen = analysis.frozen.get(analysis.aliases.get(name, name))
            if frozen is not None:
                return frozen
        if name not in self.frozen:
            from worker.structure.frozen import freeze_signature

            self.frozen[name] = freeze_signature(self.handle, name)
        return self.frozen[name]


@dataclass(frozen=True)
class Window:
    """A slice ``[lo, hi]`` of the job's progress: ``window(stage, f)`` reports ``lo + f * (hi - lo)``.

    The main run and every cross-validation fold report through windows of one job-wide ``report``, so the
    progress a client polls only grows while the stage names stay API.md's.
    """

    report: Report
    lo: float = 0.0
    hi: float = 1.0

    def __call__(self, stage: str, fraction: float) -> None:
        self.report(stage, self.lo + (self.hi - self.lo) * min(1.0, max(0.0, fraction)))

    def sub(self, lo: float, hi: float) -> Window:
        """The part ``[lo, hi]`` (fractions of this window) as a window of the same report."""
        span = self.hi - self.lo
        return Window(self.report, self.lo + span * lo, self.lo + span * hi)


def fixed_batch(sig: SignatureInfo) -> int | None:
    """The batch size a signature insists on (a static first dimension), or None."""
    dims = {spec["shape"][0] for spec in sig.inputs.values() if spec["shape"]}
    fixed = [d for d in dims if d is not None]
    return int(fixed[0]) if fixed else None


def predict(job: Job, data: Data) -> dict[str, np.ndarray]:
    """Every output of the signature on ``data``, in inference mode, in batches of ``PREDICT_BATCH``.

    A signature with a fixed batch size scores whole batches only (the remainder is left out; metrics cut
    the labels to the predictions' length).
    """
    fixed = fixed_batch(job.sig)
    batch = fixed or PREDICT_BATCH
    parts: dict[str, list[np.ndarray]] = {}
    chunks: Iterable[dict[str, Any]]
    if data.stream is not None:  # the whole set, batch by batch; its labels are collected on the way
        chunks = data.stream.evaluation_batches(batch)
    else:
        chunks = (
            {k: v[start : start + batch] for k, v in data.x.items()} for start in range(0, data.n, batch)
        )
    for chunk in chunks:
        if fixed and len(next(iter(chunk.values()))) != fixed:
            break
        for name, value in job.handle.call(job.spec.signature, chunk).items():
            parts.setdefault(name, []).append(value.numpy())
    if not parts:
        raise PipelineError(
            "dataset_mismatch", f"the signature needs batches of {fixed}; the dataset is smaller"
        )
    return {name: np.concatenate(values) for name, values in parts.items()}
