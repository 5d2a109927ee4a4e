"""/v1/jobs against the real app: creation checks, the run task, listing, cancel, and the two outputs.

No worker runs here: a worker's part (claim, write outputs, finish) is played through app.db.jobs.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import jobs
from app.db.engine import session_scope
from app.db.tables import JobRecord
from app.schemas.spec import NOT_YET_SUPPORTED
from tests.app.helpers import (
    RUN_JOB,
    SIGNATURES,
    app_of,
    assert_problem,
    create_job,
    dataset_arrays,
    mark_model,
    sent_tasks,
    sha256,
    upload_dataset,
    upload_model,
)

# What a job without a train dataset shows for {"target_sparsity": 0.5}: the contract defaults under the `fast`
# preset (one-shot, global LAMP ranking; app/schemas/presets.py).
DEFAULT_SPEC = {
    "target_sparsity": 0.5,
    "criterion": "magnitude",
    "granularity": "unstructured",
    "scope": "global",
    "normalization": "lamp",
    "schedule": {"kind": "one_shot"},
    "fine_tune": None,
    "loss": None,
    "from_logits": None,
    "include": [],
    "exclude": [],
    "layer_sparsity": {},
    "signature": "serving_default",
    "preprocessing": None,
    "evaluation": None,
    "seed": 0,
    "preset": "fast",
}


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(upload_model(client)["id"])


@pytest.fixture
def ready_model_id(client: TestClient, model_id: str) -> str:
    mark_model(app_of(client), model_id, "ready", signatures=SIGNATURES)
    return model_id


@pytest.fixture
def train_id(client: TestClient) -> str:
    return str(upload_dataset(client)["id"])


def run_tasks(settings: Settings) -> list[list[Any]]:
    return [t.args for t in sent_tasks(settings) if t.task == RUN_JOB]


def job_count(app: FastAPI) -> int:
    with session_scope(app.state.session_factory) as session:
        return session.query(JobRecord).count()


def assert_refused(client: TestClient, settings: Settings, response: Any, status: int) -> dict[str, Any]:
    """A refused job: problem body, no record, no task."""
    body = assert_problem(response, status)
    assert job_count(app_of(client)) == 0
    assert client.get("/v1/jobs").json()["items"] == []
    assert run_tasks(settings) == []
    return body


# --- creation -------------------------------------------------------------------------------------------------


def test_create_job(client: TestClient, settings: Settings, model_id: str) -> None:
    response = client.post("/v1/jobs", json={"model_id": model_id, "spec": {"target_sparsity": 0.5}})

    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["id"].startswith("job_")
    assert body["model_id"] == model_id
    assert body["status"] == "queued"
    assert body["stage"] is None
    assert body["progress"] == 0
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert body["started_at"] is None
    assert body["finished_at"] is None
    assert body["error"] is None
    assert body["train_dataset_id"] is None and body["eval_dataset_id"] is None
    assert DEFAULT_SPEC.items() <= body["spec"].items()

    assert run_tasks(settings) == [[body["id"]]]
    run = next(t for t in sent_tasks(settings) if t.task == RUN_JOB)
    assert run.queue == "secateurs"
    assert client.get(f"/v1/jobs/{body['id']}").json() == body


def test_create_job_on_a_validating_model_is_accepted(client: TestClient, model_id: str) -> None:
    """The worker validates models; a job may be queued before that finishes."""
    assert client.get(f"/v1/models/{model_id}").json()["status"] == "validating"
    assert create_job(client, model_id)["status"] == "queued"


def test_create_fine_tuning_job_fills_nested_defaults(
    client: TestClient, settings: Settings, ready_model_id: str, train_id: str
) -> None:
    evaluation = upload_dataset(client, dataset_arrays(n=4))["id"]
    spec = {"target_sparsity": 0.8, "schedule": {"kind": "polynomial"}, "fine_tune": {"epochs": 3}}
    body = create_job(client, ready_model_id, spec, train_dataset_id=train_id, eval_dataset_id=evaluation)

    assert body["train_dataset_id"] == train_id
    assert body["eval_dataset_id"] == evaluation
    fine_tune_defaults = {"epochs": 3, "batch_size": 32, "learning_rate": 1e-3, "optimizer": "adam"}
    assert fine_tune_defaults.items() <= body["spec"]["fine_tune"].items()
    assert body["spec"]["schedule"] == {
        "kind": "polynomial",
        "initial_sparsity": 0.0,
        "power": 3.0,
        "frequency": None,
        "end_fraction": 0.75,
    }
    assert run_tasks(settings) == [[body["id"]]]


def test_full_supported_spec_round_trips(client: TestClient, model_id: str) -> None:
    spec = {
        "target_sparsity": 0.9,
        "scope": "global",
        "include": ["dense", "conv.*kernel"],
        "exclude": ["bias$"],
        "layer_sparsity": {"dense_1": 0.5},
        "loss": "mse",
        "from_logits": True,
        "signature": "serving_default",
        "seed": 7,
    }
    body = create_job(client, model_id, spec)
    assert {**DEFAULT_SPEC, **spec}.items() <= body["spec"].items()


@pytest.mark.parametrize("field", ["model_id", "train_dataset_id", "eval_dataset_id"])
def test_unknown_ids_are_404(client: TestClient, settings: Settings, model_id: str, field: str) -> None:
    payload: dict[str, Any] = {"model_id": model_id, "spec": {"target_sparsity": 0.5}}
    payload[field] = "nope_00000000000000000000"
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 404)
    assert "nope_00000000000000000000" in body["detail"]


SPEC_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "sparsity-zero": ({"target_sparsity": 0}, "spec.target_sparsity"),
    "sparsity-one": ({"target_sparsity": 1}, "spec.target_sparsity"),
    "sparsity-negative": ({"target_sparsity": -0.2}, "spec.target_sparsity"),
    "sparsity-text": ({"target_sparsity": "half"}, "spec.target_sparsity"),
    "sparsity-missing": ({"criterion": "magnitude"}, "spec"),  # exactly one of target_sparsity/search/...
    "search-and-target": ({"target_sparsity": 0.5, "search": {}}, "spec"),
    "search-negative-drop": ({"search": {"max_drop": -0.01}}, "spec.search.max_drop"),
    "search-min-above-max": ({"search": {"min_sparsity": 0.9, "max_sparsity": 0.5}}, "spec.search"),
    "search-unknown-metric": ({"search": {"metric": "bleu"}}, "spec.search.metric"),
    "sweep-empty": ({"sweep": {"targets": []}}, "spec.sweep.targets"),
    "sweep-repeated": ({"sweep": {"targets": [0.5, 0.5]}}, "spec.sweep.targets"),
    "sensitivity-fine-tune": ({"sensitivity": {}, "fine_tune": {"epochs": 1}}, "spec"),
    "sweep-nm": ({"sweep": {"targets": [0.5]}, "granularity": "2:4"}, "spec"),
    "unknown-spec-field": ({"target_sparsity": 0.5, "sparsity": 0.5}, "spec.sparsity"),
    "typo-nested": ({"target_sparsity": 0.5, "fine_tune": {"epoch": 2}}, "spec.fine_tune.epoch"),
    "bad-include-regex": ({"target_sparsity": 0.5, "include": ["dense_("]}, "spec.include"),
    "bad-exclude-regex": ({"target_sparsity": 0.5, "exclude": ["*kernel"]}, "spec.exclude"),
    "bad-layer-regex": ({"target_sparsity": 0.5, "layer_sparsity": {"[": 0.2}}, "spec.layer_sparsity"),
    "layer-sparsity-one": ({"target_sparsity": 0.5, "layer_sparsity": {"d": 1.0}}, "spec.layer_sparsity.d"),
    "polynomial-without-fine-tune": ({"target_sparsity": 0.5, "schedule": {"kind": "polynomial"}}, "spec"),
    "initial-above-target": (
        {
            "target_sparsity": 0.5,
            "schedule": {"kind": "polynomial", "initial_sparsity": 0.6},
            "fine_tune": {"epochs": 1},
        },
        "spec",
    ),
    "unknown-schedule": ({"target_sparsity": 0.5, "schedule": {"kind": "cubic"}}, "spec.schedule"),
    "unknown-criterion": ({"target_sparsity": 0.5, "criterion": "vibes"}, "spec.criterion"),
    "bad-n-m": ({"target_sparsity": 0.5, "granularity": "4:2"}, "spec.granularity"),
    "unknown-loss": ({"target_sparsity": 0.5, "loss": "hinge"}, "spec.loss"),
    "negative-seed": ({"target_sparsity": 0.5, "seed": -1}, "spec.seed"),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS), ids=list(SPEC_ERRORS))
def test_spec_errors_are_422_with_errors(
    client: TestClient, settings: Settings, model_id: str, case: str
) -> None:
    spec, loc = SPEC_ERRORS[case]
    response = client.post("/v1/jobs", json={"model_id": model_id, "spec": spec})
    body = assert_refused(client, settings, response, 422)
    assert isinstance(body["errors"], list) and body["errors"]
    assert loc in [e["loc"] for e in body["errors"]], body["errors"]
    assert all(e["msg"] for e in body["errors"])
    assert loc in body["detail"]


def test_polynomial_without_fine_tune_says_what_to_add(client: TestClient, model_id: str) -> None:
    spec = {"target_sparsity": 0.5, "schedule": {"kind": "polynomial"}}
    body = assert_problem(client.post("/v1/jobs", json={"model_id": model_id, "spec": spec}), 422)
    assert "fine_tune" in body["detail"]


MODEL = "<the uploaded model id>"


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"model_id": MODEL, "spec": {"target_sparsity": 0.5}, "priority": "high"}, "priority"),
        ({"spec": {"target_sparsity": 0.5}}, "model_id"),
        ({"model_id": MODEL}, "spec"),
        ({"model_id": "", "spec": {"target_sparsity": 0.5}}, "model_id"),
        ({"model_id": MODEL, "spec": "prune it"}, "spec"),
        ({"model_id": MODEL, "spec": {"target_sparsity": 0.5}, "train_dataset_id": 7}, "train_dataset_id"),
    ],
    ids=[
        "unknown-top-level-field",
        "no-model-id",
        "no-spec",
        "empty-model-id",
        "spec-not-object",
        "id-not-str",
    ],
)
def test_request_shape_errors_are_422(
    client: TestClient, settings: Settings, model_id: str, payload: dict[str, Any], loc: str
) -> None:
    payload = {k: model_id if v == MODEL else v for k, v in payload.items()}
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    assert loc in [e["loc"] for e in body["errors"]], body["errors"]


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b""], ids=["not-json", "json-array", "empty"])
def test_body_that_is_not_a_job_is_422(client: TestClient, settings: Settings, content: bytes) -> None:
    response = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert_refused(client, settings, response, 422)


# One example value per entry of NOT_YET_SUPPORTED, as a spec fragment. When a feature lands, its entry leaves
# the table and this test says to move the example into an accepted-spec test (ENGINE_SPECS below).
NOT_YET: dict[str, dict[str, Any]] = {}


def test_not_yet_examples_match_the_table() -> None:
    assert set(NOT_YET) == set(NOT_YET_SUPPORTED)


def test_unimplemented_values_are_422_naming_each_field(
    client: TestClient, settings: Settings, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every spec value is implemented today; the refusal mechanism must still work for the next one."""
    from app.schemas import spec as spec_module

    monkeypatch.setattr(
        spec_module,
        "NOT_YET_SUPPORTED",
        {
            "seed": (lambda s: s.seed == 13, "seed 13 is not implemented in this version"),
            "block_shape": (lambda s: s.block_shape == (2, 8), "block 2x8 is not implemented in this version"),
        },
    )
    spec = {"target_sparsity": 0.5, "seed": 13, "granularity": "block", "block_shape": [2, 8]}
    body = assert_refused(
        client, settings, client.post("/v1/jobs", json={"model_id": model_id, "spec": spec}), 422
    )
    assert sorted(e["loc"] for e in body["errors"]) == ["spec.block_shape", "spec.seed"]
    assert "seed" in body["detail"] and "block" in body["detail"] and "implemented" in body["detail"]
    accepted = client.post(
        "/v1/jobs", json={"model_id": model_id, "spec": {"target_sparsity": 0.5, "seed": 12}}
    )
    assert accepted.status_code == 202, accepted.text


# Every value of the pruning engine's spec fields (issue 3) is accepted and stored as given.
ENGINE_SPECS: dict[str, dict[str, Any]] = {
    "gradient": {"target_sparsity": 0.5, "criterion": "gradient"},
    "taylor-channel": {"target_sparsity": 0.5, "criterion": "taylor", "granularity": "channel"},
    "random": {"target_sparsity": 0.5, "criterion": "random", "seed": 3},
    "l1-default-strength": {"target_sparsity": 0.5, "criterion": "l1"},
    "l2-strength": {"target_sparsity": 0.5, "criterion": "l2", "regularization": {"strength": 0.01}},
    "2:4": {"target_sparsity": 0.5, "granularity": "2:4"},
    "1:4": {"target_sparsity": 0.75, "granularity": "1:4"},
    "4:8": {"target_sparsity": 0.5, "granularity": "4:8"},
    "1:3": {"target_sparsity": 1 - 1 / 3, "granularity": "1:3"},
    "block-default": {"target_sparsity": 0.5, "granularity": "block"},
    "block-shape": {"target_sparsity": 0.5, "granularity": "block", "block_shape": [2, 8]},
    "global-lamp": {"target_sparsity": 0.9, "scope": "global", "normalization": "lamp"},
    "scale": {"target_sparsity": 0.5, "preprocessing": {"scale": 0.00392}},
    "scale-offset": {"target_sparsity": 0.5, "preprocessing": {"scale": 2.0, "offset": -1.0}},
    "offset": {"target_sparsity": 0.5, "preprocessing": {"offset": -0.5}},
    "min-max": {"target_sparsity": 0.5, "preprocessing": {"min_max": [-1.0, 1.0]}},
}


def _stored_as_given(given: Any, stored: Any) -> bool:
    """Every key the client gave comes back with its value (defaults may fill in the rest)."""
    if isinstance(given, dict):
        return all(_stored_as_given(value, stored[key]) for key, value in given.items())
    return bool(stored == given)


@pytest.mark.parametrize("case", list(ENGINE_SPECS), ids=list(ENGINE_SPECS))
def test_engine_spec_values_are_accepted(client: TestClient, model_id: str, train_id: str, case: str) -> None:
    spec = ENGINE_SPECS[case]
    body = create_job(client, model_id, spec, train_dataset_id=train_id)
    assert _stored_as_given(spec, body["spec"]), body["spec"]
    assert body["spec"]["block_shape"] == spec.get("block_shape")  # null means [4, 4] for block
    assert body["spec"]["regularization"] == spec.get("regularization")


ENGINE_SPEC_ERRORS: dict[str, tuple[dict[str, Any], str, str]] = {
    "2:4-at-0.6": (
        {"target_sparsity": 0.6, "granularity": "2:4"},
        "spec.granularity",
        "target_sparsity to 0.5",
    ),
    "1:4-at-0.5": (
        {"target_sparsity": 0.5, "granularity": "1:4"},
        "spec.granularity",
        "target_sparsity to 0.75",
    ),
    "1:3-rounded": (
        {"target_sparsity": 0.667, "granularity": "1:3"},
        "spec.granularity",
        "target_sparsity to 0.6666666667",
    ),
    "block-shape-without-block": (
        {"target_sparsity": 0.5, "block_shape": [2, 2]},
        "spec.block_shape",
        "granularity 'block'",
    ),
    "block-shape-with-channel": (
        {"target_sparsity": 0.5, "granularity": "channel", "block_shape": [2, 2]},
        "spec.block_shape",
        "'channel'",
    ),
    "block-shape-zero": (
        {"target_sparsity": 0.5, "granularity": "block", "block_shape": [0, 4]},
        "spec.block_shape.0",
        "",
    ),
    "block-shape-three": (
        {"target_sparsity": 0.5, "granularity": "block", "block_shape": [2, 2, 2]},
        "spec.block_shape",
        "",
    ),
    "regularization-with-magnitude": (
        {"target_sparsity": 0.5, "regularization": {"strength": 0.01}},
        "spec.regularization",
        "'magnitude'",
    ),
    "regularization-with-taylor": (
        {"target_sparsity": 0.5, "criterion": "taylor", "regularization": {}},
        "spec.regularization",
        "'taylor'",
    ),
    "regularization-zero": (
        {"target_sparsity": 0.5, "criterion": "l1", "regularization": {"strength": 0}},
        "spec.regularization.strength",
        "",
    ),
    "preprocessing-empty": ({"target_sparsity": 0.5, "preprocessing": {}}, "spec.preprocessing", "min_max"),
    "preprocessing-both": (
        {"target_sparsity": 0.5, "preprocessing": {"scale": 2.0, "min_max": [0, 1]}},
        "spec.preprocessing",
        "not both",
    ),
    "min-max-reversed": (
        {"target_sparsity": 0.5, "preprocessing": {"min_max": [1, 0]}},
        "spec.preprocessing",
        "lo < hi",
    ),
    "min-max-equal": (
        {"target_sparsity": 0.5, "preprocessing": {"min_max": [1, 1]}},
        "spec.preprocessing",
        "lo < hi",
    ),
    "scale-zero": ({"target_sparsity": 0.5, "preprocessing": {"scale": 0}}, "spec.preprocessing", "scale 0"),
    "unknown-normalization": ({"target_sparsity": 0.5, "normalization": "zscore"}, "spec.normalization", ""),
}


@pytest.mark.parametrize("case", list(ENGINE_SPEC_ERRORS), ids=list(ENGINE_SPEC_ERRORS))
def test_engine_spec_errors_are_422_saying_what_to_change(
    client: TestClient, settings: Settings, model_id: str, train_id: str, case: str
) -> None:
    spec, loc, hint = ENGINE_SPEC_ERRORS[case]
    payload = {"model_id": model_id, "train_dataset_id": train_id, "spec": spec}
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    assert loc in [e["loc"] for e in body["errors"]], body["errors"]
    assert hint in body["detail"]


@pytest.mark.parametrize("criterion", ["gradient", "taylor", "l1", "l2"])
def test_data_driven_criteria_need_a_train_dataset(
    client: TestClient, settings: Settings, model_id: str, criterion: str
) -> None:
    spec = {"target_sparsity": 0.5, "criterion": criterion}
    body = assert_refused(
        client, settings, client.post("/v1/jobs", json={"model_id": model_id, "spec": spec}), 422
    )
    assert [e["loc"] for e in body["errors"]] == ["train_dataset_id"]


def test_evaluation_without_cross_validation_is_accepted(client: TestClient, model_id: str) -> None:
    evaluation = {"task": "classification", "latency": {"batch_sizes": [1, 8], "runs": 5}}
    body = create_job(client, model_id, {"target_sparsity": 0.5, "evaluation": evaluation})
    assert body["spec"]["evaluation"]["task"] == "classification"
    assert body["spec"]["evaluation"]["latency"] == {
        "batch_sizes": [1, 8],
        "runs": 5,
        "warmup": 2,
        "budget_s": 2.0,
    }
    assert body["spec"]["evaluation"]["cross_validation"] is None


def test_cross_validation_is_accepted_with_a_train_dataset(
    client: TestClient, settings: Settings, model_id: str, train_id: str
) -> None:
    spec = {"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 5}}}
    refused = assert_refused(
        client, settings, client.post("/v1/jobs", json={"model_id": model_id, "spec": spec}), 422
    )
    assert "train_dataset_id" in [e["loc"] for e in refused["errors"]]
    body = create_job(client, model_id, spec, train_dataset_id=train_id)
    assert body["spec"]["evaluation"]["cross_validation"] == {"folds": 5}


def test_fine_tune_without_train_dataset_is_422(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    body = assert_refused(
        client, settings, client.post("/v1/jobs", json={"model_id": model_id, "spec": spec}), 422
    )
    assert "train_dataset_id" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == ["train_dataset_id"]


def test_train_dataset_without_labels_is_422(client: TestClient, settings: Settings, model_id: str) -> None:
    unlabelled = upload_dataset(client, dataset_arrays(labels=False))["id"]
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    payload = {"model_id": model_id, "train_dataset_id": unlabelled, "spec": spec}
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    assert "'y'" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == ["train_dataset_id"]


def test_invalid_model_is_422(client: TestClient, settings: Settings, model_id: str) -> None:
    reason = "saved_model.pb could not be parsed"
    mark_model(app_of(client), model_id, "invalid", error={"code": "unreadable", "message": reason})
    response = client.post("/v1/jobs", json={"model_id": model_id, "spec": {"target_sparsity": 0.5}})
    body = assert_refused(client, settings, response, 422)
    assert model_id in body["detail"]
    assert reason in body["detail"]


@pytest.mark.parametrize("role", ["train_dataset_id", "eval_dataset_id"])
def test_dataset_that_does_not_fit_the_model_is_422(
    client: TestClient, settings: Settings, ready_model_id: str, role: str
) -> None:
    narrow = upload_dataset(client, dataset_arrays(n=12, features=32))["id"]
    payload = {"model_id": ready_model_id, role: narrow, "spec": {"target_sparsity": 0.5}}
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    assert "[None, 64]" in body["detail"]
    assert "[12, 32]" in body["detail"]
    assert narrow in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [role]


def test_dataset_that_fits_the_model_is_accepted(
    client: TestClient, ready_model_id: str, train_id: str
) -> None:
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    body = create_job(client, ready_model_id, spec, train_dataset_id=train_id, eval_dataset_id=train_id)
    assert body["status"] == "queued"


def test_multi_input_model_needs_named_arrays(client: TestClient, model_id: str) -> None:
    signatures = {
        "serving_default": {
            "inputs": {
                "image": {"shape": [None, 8, 8, 3], "dtype": "float32"},
                "meta": {"shape": [None, 4], "dtype": "float32"},
            },
            "outputs": {"out": {"shape": [None, 1], "dtype": "float32"}},
        }
    }
    mark_model(app_of(client), model_id, "ready", signatures=signatures)
    single = upload_dataset(client, dataset_arrays(n=3, features=4))["id"]
    body = assert_problem(
        client.post(
            "/v1/jobs",
            json={"model_id": model_id, "eval_dataset_id": single, "spec": {"target_sparsity": 0.5}},
        ),
        422,
    )
    assert "x.image" in body["detail"] and "x.meta" in body["detail"]

    rng = np.random.default_rng(0)
    named = upload_dataset(
        client,
        {
            "x.image": rng.normal(size=(3, 8, 8, 3)).astype(np.float32),
            "x.meta": rng.normal(size=(3, 4)).astype(np.float32),
            "y": np.zeros(3, np.float32),
        },
    )["id"]
    create_job(client, model_id, eval_dataset_id=named)


@pytest.mark.parametrize("with_dataset", [False, True], ids=["no-dataset", "with-dataset"])
def test_signature_the_ready_model_lacks_is_422(
    client: TestClient, settings: Settings, ready_model_id: str, train_id: str, with_dataset: bool
) -> None:
    """The worker always calls spec.signature, so a ready model without it is refused at once."""
    payload: dict[str, Any] = {
        "model_id": ready_model_id,
        "spec": {"target_sparsity": 0.5, "signature": "predict"},
    }
    if with_dataset:
        payload["eval_dataset_id"] = train_id
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    assert "'predict'" in body["detail"]
    assert "serving_default" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == ["spec.signature"]


def test_signature_is_not_checked_while_the_model_validates(client: TestClient, model_id: str) -> None:
    assert (
        create_job(client, model_id, {"target_sparsity": 0.5, "signature": "predict"})["status"] == "queued"
    )


@pytest.mark.parametrize(
    ("loss", "labels", "hint"),
    [
        ("mse", "ids", "sparse_categorical_crossentropy"),  # the newcomer's mistake of issue 11
        ("mae", "ids", "sparse_categorical_crossentropy"),
        ("categorical_crossentropy", "ids", "sparse_categorical_crossentropy"),
        ("sparse_categorical_crossentropy", "onehot", "'categorical_crossentropy'"),
        ("binary_crossentropy", "column", "sparse_categorical_crossentropy"),  # (N, 1) would broadcast
    ],
)
def test_explicit_loss_the_labels_cannot_train_is_422_naming_both_shapes(
    client: TestClient, settings: Settings, ready_model_id: str, loss: str, labels: str, hint: str
) -> None:
    """Labels against spec.loss and the ready model's output (probs: (None, 10)), refused before any worker."""
    arrays = dataset_arrays(n=12)
    arrays["y"] = {
        "ids": arrays["y"],
        "onehot": np.eye(10, dtype=np.float32)[arrays["y"]],
        "column": arrays["y"][:, None] % 2,
    }[labels]
    train = upload_dataset(client, arrays)["id"]
    spec = {"target_sparsity": 0.5, "loss": loss, "fine_tune": {"epochs": 1}}
    payload = {"model_id": ready_model_id, "spec": spec, "train_dataset_id": train}
    body = assert_refused(client, settings, client.post("/v1/jobs", json=payload), 422)
    shape = {"ids": "(12,)", "onehot": "(12, 10)", "column": "(12, 1)"}[labels]
    assert f"shape {shape}" in body["detail"] and "shape (None, 10)" in body["detail"]
    assert f"'{loss}'" in body["detail"] and hint in body["detail"]
    assert [e["loc"] for e in body["errors"]] == ["spec.loss"]


@pytest.mark.parametrize(
    ("loss", "labels"),
    [("sparse_categorical_crossentropy", "ids"), ("categorical_crossentropy", "onehot"), (None, "ids")],
)
def test_loss_that_fits_the_labels_is_accepted(
    client: TestClient, ready_model_id: str, loss: str | None, labels: str
) -> None:
    arrays = dataset_arrays(n=12)
    if labels == "onehot":
        arrays["y"] = np.eye(10, dtype=np.float32)[arrays["y"]]
    train = upload_dataset(client, arrays)["id"]
    spec = {"target_sparsity": 0.5, "loss": loss, "fine_tune": {"epochs": 1}}
    assert create_job(client, ready_model_id, spec, train_dataset_id=train)["status"] == "queued"


def test_loss_is_checked_against_the_named_output_of_a_multi_output_model(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    signatures = {
        "serving_default": {
            "inputs": {"features": {"shape": [None, 64], "dtype": "float32"}},
            "outputs": {
                "probs": {"shape": [None, 10], "dtype": "float32"},
                "score": {"shape": [None, 1], "dtype": "float32"},
            },
        }
    }
    mark_model(app_of(client), model_id, "ready", signatures=signatures)
    arrays = dataset_arrays(n=12)
    arrays["y.score"] = arrays.pop("y").astype(np.float32)[:, None]
    train = upload_dataset(client, arrays)["id"]
    spec: dict[str, Any] = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    create_job(client, model_id, {**spec, "loss": "mse"}, train_dataset_id=train)
    payload = {"model_id": model_id, "spec": {**spec, "loss": "sparse_categorical_crossentropy"}}
    body = assert_problem(client.post("/v1/jobs", json={**payload, "train_dataset_id": train}), 422)
    assert "'y.score'" in body["detail"] and "'score'" in body["detail"]


# --- reading and listing ----------------------------------------------------------------------------------


def test_get_unknown_job_is_404(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/jobs/job_00000000000000000000"), 404)
    assert "GET /v1/jobs" in body["detail"]
    assert_problem(client.post("/v1/jobs/job_00000000000000000000/cancel"), 404)
    for suffix in ("metrics", "artifact"):
        assert_problem(client.get(f"/v1/jobs/job_00000000000000000000/{suffix}"), 404)


def test_list_jobs_with_filters_and_cursor(client: TestClient) -> None:
    first_model = upload_model(client)["id"]
    second_model = upload_model(client)["id"]
    a = create_job(client, first_model)["id"]
    b = create_job(client, second_model)["id"]
    c = create_job(client, first_model)["id"]
    d = create_job(client, first_model)["id"]
    assert client.post(f"/v1/jobs/{c}/cancel").status_code == 202

    def ids(**params: Any) -> list[str]:
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["items"]]

    assert ids() == [d, c, b, a]
    assert ids(status="queued") == [d, b, a]
    assert ids(status="canceled") == [c]
    assert ids(status="succeeded") == []
    assert ids(model_id=first_model) == [d, c, a]
    assert ids(model_id=second_model) == [b]
    assert ids(model_id=first_model, status="queued") == [d, a]
    assert ids(model_id="mdl_nobody") == []

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 1, "model_id": first_model}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [d, c, a]
    assert cursor is None


def test_list_jobs_bad_parameters(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/jobs", params={"status": "done"}), 422)
    assert [e["loc"] for e in body["errors"]] == ["query.status"]
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422)
    assert_problem(client.get("/v1/jobs", params={"cursor": "not-a-cursor"}), 400)


# --- cancel -----------------------------------------------------------------------------------------------


def test_cancel_queued_job(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "canceled"
    assert body["error"]["code"] == "canceled"
    assert body["error"]["message"]
    assert body["finished_at"] is not None
    assert body["cancel_requested"] is True
    assert client.get(f"/v1/jobs/{job['id']}").json() == body

    again = assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert "canceled" in again["detail"]

    for output in ("metrics", "artifact"):
        problem = assert_problem(client.get(f"/v1/jobs/{job['id']}/{output}"), 409)
        assert "canceled" in problem["detail"]


def claim(app: FastAPI, job_id: str) -> None:
    with session_scope(app.state.session_factory) as session:
        assert jobs.claim_job(session, job_id, lease_seconds=600, max_attempts=3).claimed


def test_cancel_running_job_only_requests_it(client: TestClient, model_id: str, train_id: str) -> None:
    job = create_job(client, model_id, eval_dataset_id=train_id)
    claim(app_of(client), job["id"])
    # a running job holds its model and datasets too
    assert_problem(client.delete(f"/v1/models/{model_id}"), 409)
    assert_problem(client.delete(f"/v1/datasets/{train_id}"), 409)

    body = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert body["status"] == "running"
    assert body["cancel_requested"] is True
    assert body["error"] is None
    # still running: asking again is harmless
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


# --- outputs --------------------------------------------------------------------------------------------------


def test_outputs_before_success_are_409(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)
    for output in ("metrics", "artifact"):
        body = assert_problem(client.get(f"/v1/jobs/{job['id']}/{output}"), 409)
        assert "queued" in body["detail"]
    claim(app_of(client), job["id"])
    for output in ("metrics", "artifact"):
        body = assert_problem(client.get(f"/v1/jobs/{job['id']}/{output}"), 409)
        assert "running" in body["detail"]


def finish_with_outputs(app: FastAPI, job_id: str, artifact: bytes, metrics: dict[str, Any]) -> Path:
    """What a worker does at the end of a good run: outputs first, then the record."""
    job_dir: Path = app.state.storage.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "pruned.zip").write_bytes(artifact)
    (job_dir / "metrics.json").write_text(json.dumps(metrics))
    with session_scope(app.state.session_factory) as session:
        assert jobs.finish_job(
            session, job_id, "succeeded", artifact_sha256=sha256(artifact), artifact_bytes=len(artifact)
        )
    return job_dir


def succeed(app: FastAPI, job_id: str, artifact: bytes, metrics: dict[str, Any]) -> Path:
    claim(app, job_id)
    return finish_with_outputs(app, job_id, artifact, metrics)


ARTIFACT = b"PK\x03\x04" + bytes(range(256)) * 64


def test_running_then_succeeded_job_serves_metrics_and_artifact(client: TestClient, model_id: str) -> None:
    app = app_of(client)
    job = create_job(client, model_id)
    claim(app, job["id"])
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert running["status"] == "running"
    assert running["stage"] == "loading"
    assert running["started_at"] is not None
    assert running["attempts"] == 1

    metrics = {"job_id": job["id"], "model_id": model_id, "pruned": {"sparsity": 0.5}, "notes": []}
    finish_with_outputs(app, job["id"], ARTIFACT, metrics)

    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert done["progress"] == 1
    assert done["finished_at"] is not None
    assert done["error"] is None

    got = client.get(f"/v1/jobs/{job['id']}/metrics")
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert got.json() == metrics

    artifact = client.get(f"/v1/jobs/{job['id']}/artifact")
    assert artifact.status_code == 200
    assert artifact.headers["content-type"] == "application/zip"
    assert artifact.headers["etag"] == f'"{sha256(ARTIFACT)}"'
    assert artifact.headers["content-length"] == str(len(ARTIFACT))
    assert artifact.content == ARTIFACT
    assert f"{job['id']}-pruned.zip" in artifact.headers["content-disposition"]

    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    # the model is free again
    assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_artifact_conditional_and_range_requests(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)
    succeed(app_of(client), job["id"], ARTIFACT, {"job_id": job["id"]})
    url = f"/v1/jobs/{job['id']}/artifact"
    etag = f'"{sha256(ARTIFACT)}"'

    for header in (etag, f'"other", {etag}', "*"):
        not_modified = client.get(url, headers={"If-None-Match": header})
        assert not_modified.status_code == 304, header
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag

    stale = client.get(url, headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200
    assert stale.content == ARTIFACT

    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == ARTIFACT[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(ARTIFACT)}"
    assert part.headers["content-length"] == "100"
    assert part.headers["etag"] == etag

    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206
    assert tail.content == ARTIFACT[-10:]

    unsatisfiable = client.get(url, headers={"Range": f"bytes={len(ARTIFACT) + 10}-"})
    assert unsatisfiable.status_code == 416


def test_failed_job_reports_its_error(client: TestClient, model_id: str) -> None:
    app = app_of(client)
    job = create_job(client, model_id)
    claim(app, job["id"])
    error = {"code": "out_of_memory", "message": "the model did not fit in memory; use a smaller batch_size"}
    with session_scope(app.state.session_factory) as session:
        assert jobs.finish_job(session, job["id"], "failed", error=error)

    body = client.get(f"/v1/jobs/{job['id']}").json()
    assert body["status"] == "failed"
    assert body["error"] == error
    problem = assert_problem(client.get(f"/v1/jobs/{job['id']}/metrics"), 409)
    assert "failed" in problem["detail"]
    assert client.get("/v1/jobs", params={"status": "failed"}).json()["items"][0]["id"] == job["id"]


@pytest.mark.parametrize("missing", ["metrics.json", "pruned.zip"])
def test_outputs_gone_from_storage_are_404(client: TestClient, model_id: str, missing: str) -> None:
    job = create_job(client, model_id)
    job_dir = succeed(app_of(client), job["id"], ARTIFACT, {"job_id": job["id"]})
    (job_dir / missing).unlink()
    output = "metrics" if missing == "metrics.json" else "artifact"
    body = assert_problem(client.get(f"/v1/jobs/{job['id']}/{output}"), 404)
    assert "gone" in body["detail"]
