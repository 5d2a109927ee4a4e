"""Spec presets: which one applies, explicit fields over its values, and the resolved spec in the job (API).

Resolution is pure (app.schemas.presets: a PruneSpec and "has a train dataset" in, a PruneSpec out), so most
cases are unit tests; the API tests check that the job record and body carry the resolved spec, that the
worker will read it as stored, and the 422 of ``recommended`` without a train dataset.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.engine import session_scope
from app.db.tables import JobRecord
from app.errors import Unprocessable
from app.schemas.presets import PRESETS, choose, explicit_fields, resolve
from app.schemas.spec import PruneSpec
from tests.app.helpers import app_of, assert_problem, create_job, sent_tasks, upload_dataset, upload_model

RECOMMENDED_FINE_TUNE = PRESETS["recommended"]["fine_tune"]


def spec(**fields: Any) -> PruneSpec:
    return PruneSpec.model_validate({"target_sparsity": 0.8, **fields})


def resolved(has_train: bool = True, **fields: Any) -> dict[str, Any]:
    return resolve(spec(**fields), has_train).model_dump(mode="json")


# --- which preset ----------------------------------------------------------------------------------------------


def test_train_data_and_no_recipe_gets_recommended() -> None:
    out = resolved()
    assert out["preset"] == "recommended"
    assert out["scope"] == "global" and out["normalization"] == "lamp"
    assert out["schedule"]["kind"] == "polynomial"
    assert out["fine_tune"] == RECOMMENDED_FINE_TUNE
    assert out["fine_tune"]["distill"] == {"alpha": 0.5, "temperature": 2.0}


def test_no_train_data_gets_fast() -> None:
    """fast = one-shot with the measured better one-shot ranking (global LAMP), not the contract's layer scope."""
    out = resolved(has_train=False)
    assert out["preset"] == "fast"
    assert out["schedule"] == {"kind": "one_shot"} and out["fine_tune"] is None
    assert out["scope"] == "global" and out["normalization"] == "lamp"
    assert PruneSpec.model_fields["scope"].default == "layer"  # the contract default itself is unchanged


@pytest.mark.parametrize("preset", ["fast", "recommended"])
def test_an_explicit_layer_scope_drops_the_presets_lamp(preset: str) -> None:
    """LAMP only changes a global ranking: with an explicit layer scope it would do nothing but add a note."""
    out = resolved(preset=preset, scope="layer")
    assert out["scope"] == "layer" and out["normalization"] == "none"
    assert resolved(has_train=False, scope="layer")["normalization"] == "none"
    kept = resolved(preset=preset, scope="layer", normalization="lamp")  # explicit wins, as everywhere
    assert kept["normalization"] == "lamp"


@pytest.mark.parametrize(
    "recipe",
    [{"fine_tune": {"epochs": 2}}, {"schedule": {"kind": "one_shot"}}, {"fine_tune": None}],
    ids=["fine_tune", "schedule", "fine_tune-null"],
)
def test_an_explicit_recipe_with_train_data_runs_as_given(recipe: dict[str, Any]) -> None:
    given = spec(**recipe)
    assert choose(given, has_train=True) is None
    assert resolve(given, has_train=True) is given
    assert given.preset is None and given.scope == "layer"


def test_a_named_preset_wins_over_the_default_rule() -> None:
    assert resolved(preset="fast")["preset"] == "fast"
    assert resolved(preset="fast")["fine_tune"] is None
    out = resolved(preset="recommended", fine_tune={"epochs": 5})
    assert out["preset"] == "recommended" and out["scope"] == "global"


def test_a_sensitivity_sweep_is_one_shot_by_default() -> None:
    """``sensitivity`` (its own job kind) prunes one-shot per variable: the default is fast, not a recipe."""
    given = PruneSpec.model_validate({"sensitivity": {"sparsities": [0.5]}})
    assert choose(given, has_train=True) == "fast"


# --- explicit fields override ----------------------------------------------------------------------------------

OVERRIDES: dict[str, tuple[dict[str, Any], str, Any]] = {
    "scope": ({"scope": "layer"}, "scope", "layer"),
    "normalization": ({"normalization": "none"}, "normalization", "none"),
    "criterion": ({"criterion": "taylor"}, "criterion", "taylor"),
    "seed": ({"seed": 7}, "seed", 7),
    "granularity": ({"granularity": "channel"}, "granularity", "channel"),
}


@pytest.mark.parametrize("case", list(OVERRIDES), ids=list(OVERRIDES))
def test_each_explicit_top_level_field_overrides_recommended(case: str) -> None:
    fields, key, value = OVERRIDES[case]
    out = resolved(preset="recommended", **fields)
    assert out[key] == value
    assert out["fine_tune"] == RECOMMENDED_FINE_TUNE  # the rest of the preset still applies
    assert out["schedule"]["kind"] == "polynomial"


@pytest.mark.parametrize("case", list(OVERRIDES), ids=list(OVERRIDES))
def test_each_explicit_top_level_field_overrides_fast(case: str) -> None:
    fields, key, value = OVERRIDES[case]
    out = resolved(has_train=False, **fields)
    assert out["preset"] == "fast" and out[key] == value
    assert out["schedule"] == {"kind": "one_shot"} and out["fine_tune"] is None  # the rest still applies
    if key not in ("scope", "granularity"):
        assert out["scope"] == "global"


def test_fast_channel_pruning_ranks_per_layer_unless_told_otherwise() -> None:
    """One-shot channel pruning keeps more in layer scope (BY_GRANULARITY); explicit fields still win."""
    out = resolved(has_train=False, granularity="channel")
    assert out["preset"] == "fast" and out["scope"] == "layer" and out["normalization"] == "none"
    told = resolved(has_train=False, granularity="channel", scope="global")
    assert told["scope"] == "global" and told["normalization"] == "none"
    assert resolved(has_train=False, granularity="channel", scope="global", normalization="lamp")[
        "normalization"
    ] == "lamp"
    assert resolved(has_train=False, granularity="block")["scope"] == "global"


@pytest.mark.parametrize(
    "nested",
    [
        {"epochs": 10},
        {"batch_size": 8},
        {"learning_rate": 0.01},
        {"optimizer": "sgd"},
        {"lr_schedule": "cosine"},
        {"distill": None},
        {"distill": {"alpha": 0.9}},
    ],
    ids=lambda d: next(iter(d)) + ("-null" if None in d.values() else ""),
)
def test_each_explicit_fine_tune_field_overrides_only_itself(nested: dict[str, Any]) -> None:
    out = resolved(preset="recommended", fine_tune=nested)["fine_tune"]
    key = next(iter(nested))
    expected = {**RECOMMENDED_FINE_TUNE, **nested}
    if key == "distill" and nested[key] is not None:  # nested twice: only alpha given
        expected["distill"] = {**RECOMMENDED_FINE_TUNE["distill"], **nested["distill"]}
    assert out == expected


def test_a_schedule_of_the_same_kind_merges_another_kind_replaces() -> None:
    merged = resolved(preset="recommended", schedule={"kind": "polynomial", "power": 2.0})["schedule"]
    assert merged["power"] == 2.0 and merged["kind"] == "polynomial"
    out = resolved(preset="recommended", schedule={"kind": "one_shot"})
    assert out["schedule"] == {"kind": "one_shot"}
    assert out["fine_tune"] == RECOMMENDED_FINE_TUNE  # one-shot, then fine-tuning: a valid recipe


def test_explicit_fields_are_the_given_ones_only() -> None:
    given = explicit_fields(spec(fine_tune={"epochs": 4}, scope="layer"))
    assert {"target_sparsity": 0.8, "fine_tune": {"epochs": 4}, "scope": "layer"}.items() <= given.items()
    # defaults are not "given", nested ones neither (validator-derived fields may appear: they are derived
    # from given values, so they resolve the same)
    assert not {"criterion", "normalization", "schedule", "seed", "preset"} & given.keys()


def test_fast_keeps_explicit_fine_tuning_for_the_train_check() -> None:
    """With no train data, ``fast`` keeps an explicit fine_tune, so the API's train-data 422 still fires."""
    out = resolve(spec(fine_tune={"epochs": 1}), has_train=False)
    assert out.preset == "fast" and out.fine_tune is not None and out.needs_train_dataset()


# --- refusals --------------------------------------------------------------------------------------------------


def test_recommended_without_train_data_is_refused_naming_what_to_do() -> None:
    with pytest.raises(Unprocessable) as caught:
        resolve(spec(preset="recommended"), has_train=False)
    assert "train_dataset_id" in caught.value.detail and "'fast'" in caught.value.detail
    assert {e["loc"] for e in caught.value.extra["errors"]} == {"train_dataset_id", "spec.preset"}


def test_a_preset_that_conflicts_with_an_explicit_field_is_refused_naming_the_preset() -> None:
    """recommended's polynomial schedule needs fine-tuning steps; an explicit ``fine_tune: null`` removes them."""
    with pytest.raises(Unprocessable) as caught:
        resolve(spec(preset="recommended", fine_tune=None), has_train=True)
    assert "preset 'recommended'" in caught.value.detail and "one_shot" in caught.value.detail


def test_fast_with_a_polynomial_schedule_and_no_fine_tune_is_refused_naming_the_preset() -> None:
    """Parsing lets a preset supply fine_tune; the resolved spec is checked again, so fast's null is caught."""
    with pytest.raises(Unprocessable) as caught:
        resolve(spec(preset="fast", schedule={"kind": "polynomial"}), has_train=True)
    assert "preset 'fast'" in caught.value.detail and "fine_tune" in caught.value.detail


def test_the_stored_spec_parses_back_to_itself_without_resolving_again() -> None:
    """The worker validates the stored (resolved) spec as is: same values, preset kept as a record."""
    out = resolved(fine_tune={"epochs": 2}, preset="recommended")
    assert PruneSpec.model_validate(out).model_dump(mode="json") == out
    with pytest.raises(ValueError, match="fine-tuning steps"):  # no preset fills a stored null any more
        PruneSpec.model_validate({**out, "fine_tune": None})


# --- through the API -------------------------------------------------------------------------------------------


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(upload_model(client)["id"])


@pytest.fixture
def train_id(client: TestClient) -> str:
    return str(upload_dataset(client)["id"])


def stored_spec(client: TestClient, job_id: str) -> dict[str, Any]:
    """What the worker will read: the job record's spec."""
    with session_scope(app_of(client).state.session_factory) as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        return dict(record.spec)


def test_the_job_shows_and_stores_the_resolved_spec(client: TestClient, model_id: str, train_id: str) -> None:
    body = create_job(
        client,
        model_id,
        {"target_sparsity": 0.9, "fine_tune": {"epochs": 5}, "preset": "recommended"},
        train_dataset_id=train_id,
    )
    assert body["spec"]["preset"] == "recommended"
    assert body["spec"]["scope"] == "global" and body["spec"]["normalization"] == "lamp"
    assert body["spec"]["fine_tune"] == {**RECOMMENDED_FINE_TUNE, "epochs": 5}
    assert stored_spec(client, body["id"]) == body["spec"]
    assert client.get(f"/v1/jobs/{body['id']}").json()["spec"] == body["spec"]

    default = create_job(client, model_id, {"target_sparsity": 0.8}, train_dataset_id=train_id)
    assert (
        default["spec"]["preset"] == "recommended" and default["spec"]["fine_tune"] == RECOMMENDED_FINE_TUNE
    )
    assert stored_spec(client, default["id"]) == default["spec"]


def test_a_job_without_train_data_records_fast(client: TestClient, model_id: str) -> None:
    body = create_job(client, model_id, {"target_sparsity": 0.5})
    assert body["spec"]["preset"] == "fast" and body["spec"]["fine_tune"] is None
    assert body["spec"]["schedule"] == {"kind": "one_shot"}
    assert body["spec"]["scope"] == "global" and body["spec"]["normalization"] == "lamp"
    assert stored_spec(client, body["id"]) == body["spec"]
    layer = create_job(client, model_id, {"target_sparsity": 0.5, "scope": "layer"})["spec"]
    assert layer["preset"] == "fast" and layer["scope"] == "layer" and layer["normalization"] == "none"


def test_recommended_without_train_data_is_422(client: TestClient, settings: Settings, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": {"target_sparsity": 0.5, "preset": "recommended"}}
    body = assert_problem(client.post("/v1/jobs", json=payload), 422)
    assert "preset 'recommended' fine-tunes on training data" in body["detail"]
    assert "train_dataset_id" in [e["loc"] for e in body["errors"]]
    assert client.get("/v1/jobs").json()["items"] == []
    assert [t for t in sent_tasks(settings) if t.task == "secateurs.run_job"] == []


def test_an_unknown_preset_is_422(client: TestClient, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": {"target_sparsity": 0.5, "preset": "best"}}
    body = assert_problem(client.post("/v1/jobs", json=payload), 422)
    assert "spec.preset" in str(body["errors"])


@pytest.mark.parametrize("criterion", ["gradient", "taylor", "l1", "l2"])
def test_data_driven_criteria_keep_the_recommended_recipe(
    client: TestClient, model_id: str, train_id: str, criterion: str
) -> None:
    """A criterion is not a recipe: with train data it runs inside the recommended recipe (the penalty of
    l1/l2 during the polynomial ramp), and the criterion itself is kept."""
    body = create_job(
        client, model_id, {"target_sparsity": 0.5, "criterion": criterion}, train_dataset_id=train_id
    )
    assert body["spec"]["criterion"] == criterion and body["spec"]["preset"] == "recommended"


def test_an_idempotent_replay_returns_the_resolved_job(
    client: TestClient, model_id: str, train_id: str
) -> None:
    """The key compares request bodies (not the resolved spec): the same body replays the same job."""
    payload = {"model_id": model_id, "train_dataset_id": train_id, "spec": {"target_sparsity": 0.8}}
    headers = {"Idempotency-Key": "preset-replay"}
    first = client.post("/v1/jobs", json=payload, headers=headers)
    again = client.post("/v1/jobs", json=payload, headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json() == first.json() and again.json()["spec"]["preset"] == "recommended"
    assert len(client.get("/v1/jobs").json()["items"]) == 1
