"""Spec presets: measured recipes that fill in every field the user did not give, resolved once by the API.

Why: the contract defaults (layer scope, one-shot, no fine-tuning) keep a model only at low sparsity; a user who
uploads training data expects it to be used well without reading the spec table, and a user without any still
gets the better one-shot ranking (global LAMP: 0.936 vs 0.340 in layer scope, demo CNN at 80%). So a job's spec
is resolved at creation (``resolve``), the resolved spec is what the job record, the job body and the metrics
show, and the worker runs it as stored (it never resolves again: ``preset`` in a stored spec is only a record).

Rules:
- Which preset: the spec's ``preset`` if given; else ``fast`` without a train dataset; else ``recommended``
  unless the spec names ``schedule`` or ``fine_tune`` (an explicit recipe: taken as given, ``preset`` null) or
  asks for a per-variable ``sensitivity`` sweep (one-shot by definition: ``fast``).
- Explicit wins: every field in ``model_fields_set`` (nested ones too, e.g. only ``fine_tune.epochs``)
  overrides the preset; an explicit ``null`` (``"fine_tune": null``) too. A nested model of another ``kind``
  (``schedule: {"kind": "one_shot"}``) replaces the preset's instead of merging.
- An explicit ``"scope": "layer"`` drops the preset's LAMP normalization (unless ``normalization`` is given too):
  LAMP only changes how layers compare in a global ranking, so it would have no effect but a note.
- Per granularity, ``BY_GRANULARITY`` adjusts a preset where the measurements differ (one-shot channel
  pruning: layer scope).
- ``recommended`` fine-tunes, so asking for it without a train dataset is a 422 naming what to do.
- Calibration data (``calibration_dataset_id``) and no explicit ``criterion``: ``fast`` prunes with
  ``FAST_CALIBRATION_CRITERION`` (unstructured and N:M granularities; not for sensitivity sweeps). Per
  criterion, ``BY_CRITERION`` adjusts a preset to what the criterion supports (calibration criteria prune
  one-shot, so ``recommended`` fine-tunes after a one-shot prune instead of during a polynomial ramp). SparseGPT
  keeps the preset's global LAMP scope: the global magnitude ranking allocates each op's target and SparseGPT
  prunes each op at it (Fashion-MNIST CNN at 95%: -12.6 points vs -61 with every op at 95% in layer scope).

The numbers behind ``recommended`` are in bench/RESULTS.md ("Digits: Secateurs vs tfmot"); those behind both
presets in docs/presets.md ("Measured").
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from app.errors import Unprocessable
from app.schemas.spec import PruneSpec
from app.schemas.vocabulary import CRITERIA, JOB_KINDS

# preset -> values, in the spec's JSON spelling. Every value is one the measurements chose (docs/presets.md).
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "scope": "global",
        "normalization": "lamp",
        "schedule": {"kind": "one_shot"},
        "fine_tune": None,
    },
    "recommended": {
        "scope": "global",
        "normalization": "lamp",
        "schedule": {"kind": "polynomial"},
        "fine_tune": {
            "epochs": 3,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "optimizer": "adam",
            "lr_schedule": "constant",
            "distill": {"alpha": 0.5, "temperature": 2.0},
            # One pass over all the train data per epoch, as measured (streamed datasets: give these to cap).
            "steps_per_epoch": None,
            "max_samples": None,
        },
    },
}
# (preset, granularity) -> values over the preset's: one-shot channel pruning keeps more in layer scope (demo
# CNN, 50% of channels: 0.862 vs 0.709 with global LAMP, and a smaller compact model; docs/presets.md).
BY_GRANULARITY: dict[tuple[str, str], dict[str, Any]] = {
    ("fast", "channel"): {"scope": "layer", "normalization": "none"},
}
# (preset, criterion) -> values over the preset's, where the criterion cannot take the preset's own.
BY_CRITERION: dict[tuple[str, str], dict[str, Any]] = {
    ("recommended", "sparsegpt"): {"schedule": {"kind": "one_shot"}},
    ("recommended", "wanda"): {"schedule": {"kind": "one_shot"}},
}
# What ``fast`` prunes with when calibration data is given and no criterion is (issue 21: SparseGPT kept the
# most in one-shot pruning at 2:4 and high unstructured sparsity; bench/RESULTS.md "Calibration").
FAST_CALIBRATION_CRITERION = "sparsegpt"
NEEDS_TRAIN_DATA = frozenset({"recommended"})
# Spec fields that make a recipe explicit: naming one turns the default preset off (with a train dataset).
RECIPE_FIELDS = frozenset({"schedule", "fine_tune"})
# Spec fields of the job kinds that prune one-shot by definition: they get ``fast`` by default.
ONE_SHOT_FIELDS = frozenset(rules.field for rules in JOB_KINDS.values() if rules.one_shot)


def explicit_fields(spec: PruneSpec) -> dict[str, Any]:
    """The values the user gave, JSON-spelled: ``model_fields_set`` of the spec and, recursively, of every
    nested model (``exclude_unset``); an explicit null stays, defaults are left out."""
    return spec.model_dump(mode="json", exclude_unset=True)


def choose(spec: PruneSpec, has_train: bool) -> str | None:
    """The preset that applies to ``spec`` (None: none, the spec as given) -- the default rule above."""
    if spec.preset is not None:
        return spec.preset
    given = spec.model_fields_set
    if not has_train or given & ONE_SHOT_FIELDS:
        return "fast"
    if given & RECIPE_FIELDS:
        return None
    return "recommended"


def _overlay(base: Any, given: Any) -> Any:
    """``given`` over ``base``; dicts merge key by key unless their ``kind`` differs (another model)."""
    if not (isinstance(base, dict) and isinstance(given, dict)) or base.get("kind") != given.get("kind"):
        return given
    merged = dict(base)
    for key, value in given.items():
        merged[key] = _overlay(base[key], value) if key in base else value
    return merged


def _criterion(name: str, spec: PruneSpec, has_calibration: bool) -> str:
    """The criterion the resolved spec prunes with: the explicit one, else ``fast``'s calibration method when
    calibration data is given and the granularity and job kind allow it, else the spec's default."""
    if "criterion" in spec.model_fields_set or name != "fast" or not has_calibration:
        return spec.criterion
    needs = CRITERIA[FAST_CALIBRATION_CRITERION]  # type: ignore[index]
    nm = ":" in spec.granularity
    if (spec.granularity in needs.granularities or nm) and spec.sensitivity is None:
        return FAST_CALIBRATION_CRITERION
    return spec.criterion


def resolve(spec: PruneSpec, has_train: bool, has_calibration: bool = False) -> PruneSpec:
    """The spec that will run: the chosen preset's values under every explicit field, ``preset`` recorded.

    ``has_calibration``: the job names a ``calibration_dataset_id`` (``fast`` then prunes with
    ``FAST_CALIBRATION_CRITERION`` unless the spec names a criterion).

    Raises Unprocessable (422) for ``recommended`` without a train dataset, and when the preset's values and
    the explicit fields do not form a valid spec together (e.g. ``recommended`` with ``"fine_tune": null``
    keeps the polynomial schedule, which needs fine-tuning steps), naming the preset.
    """
    name = choose(spec, has_train)
    if name is None:
        return spec
    if name in NEEDS_TRAIN_DATA and not has_train:
        msg = (
            f"preset {name!r} fine-tunes on training data: give train_dataset_id, or use preset 'fast' "
            "(one-shot, no fine-tuning)"
        )
        raise Unprocessable(
            msg,
            extra={"errors": [{"loc": "train_dataset_id", "msg": msg}, {"loc": "spec.preset", "msg": msg}]},
        )
    given = explicit_fields(spec)
    criterion = _criterion(name, spec, has_calibration)
    base = {
        **PRESETS[name],
        **BY_GRANULARITY.get((name, spec.granularity), {}),
        **BY_CRITERION.get((name, criterion), {}),
        "criterion": criterion,
    }
    values = _overlay(base, given)
    if values.get("scope") == "layer" and "normalization" not in given:
        values["normalization"] = "none"  # the preset's LAMP goes with its global scope
    values["preset"] = name
    try:
        return PruneSpec.model_validate(values)
    except ValidationError as exc:
        errors = [
            {"loc": ".".join(["spec", *map(str, e["loc"])]), "msg": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
        raise Unprocessable(
            f"preset {name!r} ({PRESETS[name]}) and the fields given do not fit together: "
            + "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
            + "; set the conflicting field explicitly or choose another preset",
            extra={"errors": errors},
        ) from exc
