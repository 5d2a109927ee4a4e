"""One vocabulary per concept: every worker table holds exactly the names the spec accepts.

A new job kind, export format, criterion, loss, optimizer, normalization, schedule or granularity is one row in
``app/schemas/vocabulary.py`` (or the spec) and one row in the worker's table; this file fails until both
exist, so the API never accepts a name the worker fails on minutes later. What the app decides by name (which
criteria need train data or gradients) is checked against the worker's own flags. No TensorFlow at module
level: the worker tables whose modules load TensorFlow are imported inside the test, and those parameters
are marked ``tf``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any, get_args

import pytest

from app.client.download import artifact_filename
from app.schemas import vocabulary
from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec, Schedule
from worker.pruning.criteria import CRITERIA as WORKER_CRITERIA


def _schedule_kinds() -> set[str]:
    """The discriminator values of the spec's ``schedule`` union (one model per kind)."""
    (union, *_) = get_args(Schedule)
    return {get_args(model.model_fields["kind"].annotation)[0] for model in get_args(union)}


# concept -> (the app's names, the worker module and its table (a dict, or a Literal), module loads TensorFlow)
PAIRS: dict[str, tuple[Iterable[str], str, str, bool]] = {
    "job_kind": (get_args(vocabulary.JobKind), "worker.kinds", "KINDS", True),
    "tflite_format": (get_args(vocabulary.TFLiteFormat), "worker.export.convert", "FORMATS", True),
    "export_file": (vocabulary.EXPORT_FILES, "worker.export.targets", "EXPORTS", True),
    "criterion": (get_args(vocabulary.Criterion), "worker.pruning.criteria", "CRITERIA", False),
    "loss": (get_args(vocabulary.Loss), "worker.pruning.losses", "LOSSES", True),
    "optimizer": (get_args(vocabulary.Optimizer), "worker.pruning.finetune", "OPTIMIZERS", True),
    "lr_schedule": (get_args(vocabulary.LrSchedule), "worker.pruning.finetune", "LrDecay", True),
    "normalization": (
        get_args(vocabulary.Normalization),
        "worker.pruning.normalization",
        "NORMALIZATIONS",
        False,
    ),
    "schedule": (_schedule_kinds(), "worker.pruning.schedules", "SCHEDULES", False),
    "budget_unit": (get_args(vocabulary.BudgetUnit), "worker.pruning.budget", "UNITS", False),
    "granularity": (
        {*vocabulary.NAMED_GRANULARITIES, "nm"},
        "worker.pruning.granularity",
        "GRANULARITIES",
        False,
    ),
}


@pytest.mark.parametrize(
    ("app_names", "module", "table"),
    [
        pytest.param(names, module, table, id=concept, marks=[pytest.mark.tf] if tf else [])
        for concept, (names, module, table, tf) in PAIRS.items()
    ],
)
def test_worker_table_holds_the_spec_names(app_names: Iterable[str], module: str, table: str) -> None:
    worker_table: Any = getattr(importlib.import_module(module), table)
    assert set(get_args(worker_table) or worker_table) == set(app_names)


def test_app_tables_are_keyed_by_their_literal() -> None:
    assert tuple(vocabulary.JOB_KINDS) == get_args(vocabulary.JobKind)
    assert tuple(vocabulary.CRITERIA) == get_args(vocabulary.Criterion)
    for rules in vocabulary.JOB_KINDS.values():
        assert rules.field in PruneSpec.model_fields
        assert rules.section is None or rules.section in MetricsDocument.model_fields


@pytest.mark.tf
def test_export_file_suffixes_match_the_worker_table() -> None:
    """The client names a download ``<job>-<name><suffix>`` from the app's table; the worker writes the file
    under its own: one naming scheme."""
    from worker.export.targets import EXPORTS

    assert {name: target.suffix for name, target in EXPORTS.items()} == vocabulary.EXPORT_FILES
    assert all(target.filename == f"{name}{target.suffix}" for name, target in EXPORTS.items())
    # the client (which imports nothing outside app.client) names downloads the same way
    for name, suffix in vocabulary.EXPORT_FILES.items():
        assert artifact_filename("job_1", name) == f"job_1-{name}{suffix}"


def test_app_criterion_needs_match_the_worker_criteria() -> None:
    """The API refuses a criterion without train data exactly when the worker could not run it."""
    for name, cls in WORKER_CRITERIA.items():
        needs = vocabulary.CRITERIA[name]
        assert (needs.gradients, needs.regularizer) == (cls.needs_gradients, cls.regularizer), name
    assert {
        name for name, cls in WORKER_CRITERIA.items() if cls().needs_train_data
    } == vocabulary.TRAIN_DATA_CRITERIA
    assert set(vocabulary.REGULARIZING_CRITERIA) == {
        name for name, cls in WORKER_CRITERIA.items() if cls.regularizer
    }


def test_app_calibration_criteria_match_the_worker() -> None:
    """The API asks for calibration data (and refuses granularities and scopes) exactly where the worker's
    criterion reads calibration statistics."""
    for name, cls in WORKER_CRITERIA.items():
        assert vocabulary.CRITERIA[name].calibration == cls.calibration, name
    assert set(vocabulary.CALIBRATION_CRITERIA) == {
        name for name, cls in WORKER_CRITERIA.items() if cls().needs_calibration
    }
    assert set(vocabulary.CALIBRATION_CRITERIA) == {"wanda", "sparsegpt"}


def test_augmentation_models_match_the_table() -> None:
    """One pydantic model per kind of ``vocabulary.AUGMENTATIONS``, taking exactly its arguments (and requiring
    ``AUGMENTATION_REQUIRED``), so an unknown kind or argument is a 422 and the worker's table can pin both."""
    from app.schemas.spec import AUGMENTATION_MODELS, Augmentation

    (union, *_) = get_args(Augmentation)
    kinds = {get_args(model.model_fields["kind"].annotation)[0]: model for model in get_args(union)}
    assert tuple(kinds) == get_args(vocabulary.AugmentationKind) == tuple(vocabulary.AUGMENTATIONS)
    assert kinds == AUGMENTATION_MODELS
    for kind, model in kinds.items():
        args = {name: f for name, f in model.model_fields.items() if name != "kind"}
        assert tuple(args) == vocabulary.AUGMENTATIONS[kind], kind
        assert tuple(n for n, f in args.items() if f.is_required()) == vocabulary.AUGMENTATION_REQUIRED[kind]


@pytest.mark.tf
def test_worker_augmentations_hold_the_spec_kinds() -> None:
    """worker.data.augment.AUGMENTATIONS (issue 20, DATA-STREAM) maps the same kinds; skipped until it exists."""
    augment = pytest.importorskip("worker.data.augment")
    assert set(augment.AUGMENTATIONS) == set(vocabulary.AUGMENTATIONS)
    for kind, (_layer, allowed, required) in augment.AUGMENTATIONS.items():
        assert set(allowed) == set(vocabulary.AUGMENTATIONS[kind]), kind
        # The spec may require more than Keras does (random_flip's mode), never less.
        assert set(required) <= set(vocabulary.AUGMENTATION_REQUIRED[kind]), kind


def test_dataset_vocabulary() -> None:
    assert get_args(vocabulary.DatasetFormat) == ("npz", "tfrecord", "parquet", "image_folder")
    assert tuple(vocabulary.DATASET_STATUSES) == get_args(vocabulary.DatasetStatus)
    assert get_args(vocabulary.DatasetStatus) == ("validating", "converting", "ready", "invalid")
