"""The names the spec accepts, one table per concept, and what the app needs to know about each name.

Why one module: every place that lists names (the spec's validators, the presets, the CLI's help, the report,
the routes) reads them here, as ``typing.get_args`` of a ``Literal`` or as a table keyed by its values, so a
new job kind, export format or criterion is one row here and one row in the worker's table of the same concept
(``worker.kinds.KINDS``, ``worker.export.convert.FORMATS``, ``worker.export.targets.EXPORTS``,
``worker.pruning``'s ``CRITERIA``, ``LOSSES``, ``OPTIMIZERS``, ``NORMALIZATIONS``, ``SCHEDULES``,
``GRANULARITIES``). ``tests/test_vocabularies.py`` asserts
that each pair holds the same names, and that the properties below match the worker's. No pydantic here: the
CLI imports this module without loading the schema machinery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

Criterion = Literal["magnitude", "gradient", "taylor", "l1", "l2", "random", "wanda", "sparsegpt"]
Loss = Literal[
    "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mse", "mae"
]
Optimizer = Literal["adam", "sgd", "momentum"]
LrSchedule = Literal["constant", "cosine"]
Normalization = Literal["none", "lamp"]
TFLiteFormat = Literal["float32", "float16", "dynamic_range", "int8"]
# Every exported file by artifact name (API.md) -> its file suffix: the download is ``<job>-<name><suffix>``.
# The worker's table is ``worker.export.targets.EXPORTS`` (converter and runtime per name).
ONNX_ARTIFACT = "onnx"
EXPORT_FILES: dict[str, str] = {
    **{f"tflite_{fmt}": ".tflite" for fmt in get_args(TFLiteFormat)},
    ONNX_ARTIFACT: ".onnx",
}
JobKind = Literal["prune", "search", "sweep", "sensitivity"]
# Granularities by name; besides these the spec accepts N:M such as "2:4" (the worker's "nm").
NAMED_GRANULARITIES = ("unstructured", "channel", "block")


@dataclass(frozen=True)
class CriterionNeeds:
    """What a criterion needs before it can score: the worker's ``Criterion`` class variables of that name."""

    gradients: bool = False  # scored from dL/dw over train batches
    regularizer: Literal["l1", "l2"] | None = None  # fine-tunes with this penalty, then prunes by magnitude
    # Reads the inputs each weight's op receives on calibration samples (inputs only, no labels): the
    # worker's ``Criterion.calibration`` ("input_norms": Wanda; "hessian": SparseGPT's sequential OBS updates).
    calibration: Literal["input_norms", "hessian"] | None = None
    # What the calibration method supports (the spec refuses the rest with 422): granularities besides N:M,
    # whether scope "global" can rank it, whether a schedule other than one-shot can re-run it.
    granularities: tuple[str, ...] = NAMED_GRANULARITIES
    global_scope: bool = True

    @property
    def train_data(self) -> bool:
        """Gradients and penalty fine-tuning both need a labelled train dataset."""
        return self.gradients or self.regularizer is not None


CRITERIA: dict[Criterion, CriterionNeeds] = {
    "magnitude": CriterionNeeds(),
    "gradient": CriterionNeeds(gradients=True),
    "taylor": CriterionNeeds(gradients=True),
    "l1": CriterionNeeds(regularizer="l1"),
    "l2": CriterionNeeds(regularizer="l2"),
    "random": CriterionNeeds(),
    "wanda": CriterionNeeds(calibration="input_norms", granularities=("unstructured",)),
    "sparsegpt": CriterionNeeds(calibration="hessian", granularities=("unstructured",)),
}
REGULARIZING_CRITERIA = tuple(name for name, needs in CRITERIA.items() if needs.regularizer is not None)
TRAIN_DATA_CRITERIA = frozenset(name for name, needs in CRITERIA.items() if needs.train_data)
# Criteria scored from calibration inputs (``calibration_dataset_id``, else the train dataset's inputs).
CALIBRATION_CRITERIA = tuple(name for name, needs in CRITERIA.items() if needs.calibration is not None)


@dataclass(frozen=True)
class KindRules:
    """What the app needs to know about a job kind (the worker's orchestration table is ``worker.kinds.KINDS``)."""

    field: str  # the spec field that asks for this kind: a spec gives exactly one of them
    section: str | None  # the metrics document's section with the kind's results; None: a plain prune
    one_shot: bool = False  # prunes one-shot by definition, so the default preset is ``fast`` (presets.py)
    keeps_model: bool = True  # False: the job measures and keeps no artifact


JOB_KINDS: dict[JobKind, KindRules] = {
    "prune": KindRules(field="target_sparsity", section=None),
    "search": KindRules(field="search", section="search"),
    "sweep": KindRules(field="sweep", section="sweep"),
    "sensitivity": KindRules(field="sensitivity", section="sensitivity", one_shot=True, keeps_model=False),
}
KIND_FIELDS = tuple(rules.field for rules in JOB_KINDS.values())
# ``budget`` is the other way to ask for a plain prune (channel groups removed until a MACs, parameter or
# latency budget is met, instead of a fraction): a spec gives exactly one of these fields.
TARGET_FIELDS = (*KIND_FIELDS, "budget")
# What a budget can be set in (the spec's ``budget`` keys; the worker's ``worker.pruning.budget.UNITS``); the
# metrics' ``budget.unit`` names ``latency`` as ``latency_speedup``.
BudgetUnit = Literal["macs", "params", "latency"]


def kind_of(is_set: Callable[[str, str], bool]) -> JobKind:
    """The first kind with a section for which ``is_set(field, section)`` holds, else ``prune``.

    A plain prune is what every other kind is built from: a copy of a kind's spec made without validation may
    carry ``target_sparsity`` beside the kind's own field (worker/kinds/search.py), so that field decides.
    """
    return next(
        (
            kind
            for kind, rules in JOB_KINDS.items()
            if rules.section is not None and is_set(rules.field, rules.section)
        ),
        "prune",
    )


# --- datasets (issue 20: datasets at scale) ------------------------------------------------------------------
# What a dataset is stored as / registered as, and where its validation stands. ``npz`` at or below
# SECATEURS_CONVERT_ABOVE_BYTES is ``ready`` at upload (as before); everything else is ``validating`` until the
# worker task ``secateurs.validate_dataset`` built its manifest (``converting`` while it writes shards).
DatasetFormat = Literal["npz", "tfrecord", "parquet", "image_folder"]
DatasetStatus = Literal["validating", "converting", "ready", "invalid"]
# TF's names for TFRecord compression (tf.data.TFRecordDataset's compression_type).
DatasetCompression = Literal["GZIP", "ZLIB"]
# A feature as tf.io.parse_example reads it: FixedLenFeature or VarLenFeature, and its three dtypes.
FeatureKind = Literal["fixed", "var_len"]
FeatureDtype = Literal["float32", "int64", "string"]
ImageDecode = Literal["jpeg", "png", "auto"]
ImageChannels = Literal[1, 3, 4]

# What each dataset status allows a job to do: only ``ready`` data can be trained or evaluated on.
DATASET_STATUSES: dict[DatasetStatus, str] = {
    "validating": "the worker is reading a sample and building the manifest",
    "converting": "the worker is writing TFRecord shards (image folder, large .npz)",
    "ready": "usable by jobs",
    "invalid": "refused; `error` says why",
}

# Training-batch augmentations: kind -> the Keras 3 preprocessing layer's arguments the spec accepts, in
# the layer's order (first ones required, see AUGMENTATION_REQUIRED). The worker's table
# (worker.data.augment.AUGMENTATIONS) holds the same kinds; tests/test_vocabularies.py pins both.
AugmentationKind = Literal[
    "random_flip", "random_crop", "random_rotation", "random_zoom", "random_translation", "random_contrast"
]
AUGMENTATIONS: dict[AugmentationKind, tuple[str, ...]] = {
    "random_flip": ("mode",),
    "random_crop": ("height", "width"),
    "random_rotation": ("factor",),
    "random_zoom": ("height_factor", "width_factor"),
    "random_translation": ("height_factor", "width_factor"),
    "random_contrast": ("factor",),
}
# The arguments without a default (RandomFlip's mode defaults to horizontal_and_vertical in Keras, but the
# spec asks for it: a flip the caller did not choose would silently mirror digits and text).
AUGMENTATION_REQUIRED: dict[AugmentationKind, tuple[str, ...]] = {
    "random_flip": ("mode",),
    "random_crop": ("height", "width"),
    "random_rotation": ("factor",),
    "random_zoom": ("height_factor",),
    "random_translation": ("height_factor", "width_factor"),
    "random_contrast": ("factor",),
}
