"""Search, sweep and sensitivity jobs at the API: what each needs is refused at creation with the field
named, the stored spec keeps the kind, and a sensitivity job's /artifact is a 409 saying it keeps no model."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.helpers import app_of, assert_problem, create_job, dataset_arrays, upload_dataset, upload_model
from tests.app.report_documents import prune_document
from tests.app.test_api_jobs import ARTIFACT, succeed

SEARCH = {"search": {"metric": "accuracy", "max_drop": 0.01, "budget_s": 60}}


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(upload_model(client)["id"])


def _post(client: TestClient, model_id: str, spec: dict[str, Any], **extra: Any) -> Any:
    return client.post("/v1/jobs", json={"model_id": model_id, "spec": spec, **extra})


def test_search_needs_a_labelled_eval_dataset(client: TestClient, model_id: str) -> None:
    body = assert_problem(_post(client, model_id, SEARCH), 422)
    assert "eval_dataset_id" in body["detail"] and body["errors"][0]["loc"] == "eval_dataset_id"
    unlabelled = upload_dataset(client, dataset_arrays(labels=False))["id"]
    body = assert_problem(_post(client, model_id, SEARCH, eval_dataset_id=unlabelled), 422)
    assert "no labels" in body["detail"]
    labelled = upload_dataset(client)["id"]
    job = create_job(client, model_id, SEARCH, eval_dataset_id=labelled)
    assert job["spec"]["search"]["max_drop"] == 0.01 and job["spec"]["target_sparsity"] is None


def test_validation_fraction_needs_a_train_dataset_instead(client: TestClient, model_id: str) -> None:
    spec = {"search": {"max_drop": 0.01, "validation_fraction": 0.2}}
    body = assert_problem(_post(client, model_id, spec), 422)
    assert body["errors"][0]["loc"] == "train_dataset_id"
    train = upload_dataset(client)["id"]
    job = create_job(client, model_id, spec, train_dataset_id=train)  # no eval set: choices on the split
    assert job["spec"]["search"]["validation_fraction"] == 0.2


def test_sensitivity_needs_eval_data_and_has_no_artifact(client: TestClient, model_id: str) -> None:
    spec = {"sensitivity": {"sparsities": [0.5, 0.9]}}
    assert_problem(_post(client, model_id, spec), 422)
    evaluation = upload_dataset(client)["id"]
    job = create_job(client, model_id, spec, eval_dataset_id=evaluation)
    assert job["spec"]["sensitivity"]["sparsities"] == [0.5, 0.9]
    succeed(app_of(client), job["id"], ARTIFACT, prune_document(job["id"], model_id))
    body = assert_problem(client.get(f"/v1/jobs/{job['id']}/artifact"), 409)
    assert "keeps no model" in body["detail"]
    assert client.get(f"/v1/jobs/{job['id']}/report").status_code == 200


def test_sweep_is_accepted_without_datasets(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id, {"sweep": {"targets": [0.9, 0.5]}})
    assert job["spec"]["sweep"]["targets"] == [0.5, 0.9]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"budget": {"macs": 0.5}}, 'granularity to "channel"'),
        ({"budget": {"macs": 0.5}, "granularity": "2:4", "target_sparsity": 0.5}, "exactly one of"),
        ({"budget": {"macs": 0.5, "params": 1e6}, "granularity": "channel"}, "exactly one of macs, params"),
        ({"budget": {}, "granularity": "channel"}, "exactly one of macs, params"),
        ({"budget": {"macs": 1.5}, "granularity": "channel"}, "less than 1"),
        ({"budget": {"latency": {"speedup": 0.5}}, "granularity": "channel"}, "greater than 1"),
        ({"budget": {"macs": 0.5}, "granularity": "channel", "layer_sparsity": {"d": 0.5}}, "layer_sparsity"),
        ({"budget": {"params": 1e5}, "granularity": "channel", "compact": False}, "compact: false"),
    ],
    ids=["unstructured", "with-target", "two-units", "no-unit", "macs-over-1", "slowdown", "layer", "no-compact"],
)
def test_budget_spec_is_refused_with_the_reason(client: TestClient, model_id: str, spec: dict, words: str) -> None:
    body = assert_problem(_post(client, model_id, spec), 422)
    assert words in str(body), body


def test_budget_spec_is_accepted_and_stored(client: TestClient, model_id: str) -> None:
    spec = {"budget": {"latency": {"speedup": 2.0}}, "granularity": "channel"}
    job = create_job(client, model_id, spec)
    assert job["spec"]["budget"] == {"macs": None, "params": None, "latency": {"speedup": 2.0, "batch_size": 1}}
    assert job["spec"]["target_sparsity"] is None and job["spec"]["compact"] is True
    job = create_job(client, model_id, {"budget": {"params": 3e7}, "granularity": "channel"})
    assert job["spec"]["budget"]["params"] == 3e7
