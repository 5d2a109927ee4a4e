"""Calibration data on POST /v1/jobs (issue 21): ``calibration_dataset_id``, ``spec.calibration``,
``spec.reconstruct``, the 422s that name what to give, and how the presets resolve with calibration data."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db.engine import session_scope
from app.db.tables import DatasetRecord
from app.schemas.presets import resolve
from app.schemas.spec import PruneSpec
from tests.app.helpers import (
    SIGNATURES,
    app_of,
    assert_problem,
    create_job,
    dataset_arrays,
    mark_model,
    upload_dataset,
    upload_model,
)


@pytest.fixture
def model_id(client: TestClient) -> str:
    model = str(upload_model(client)["id"])
    mark_model(app_of(client), model, "ready", signatures=SIGNATURES)
    return model


@pytest.fixture
def calibration_id(client: TestClient) -> str:
    return str(upload_dataset(client, dataset_arrays(n=16, labels=False))["id"])


def _post(client: TestClient, model_id: str, spec: dict[str, Any], **extra: Any) -> Any:
    return client.post("/v1/jobs", json={"model_id": model_id, "spec": spec, **extra})


@pytest.mark.parametrize(
    "spec",
    [
        {"target_sparsity": 0.5, "criterion": "sparsegpt"},
        {"target_sparsity": 0.5, "criterion": "wanda", "granularity": "2:4"},
        {"target_sparsity": 0.5, "granularity": "channel", "reconstruct": True},
    ],
)
def test_calibration_without_data_is_422_naming_both_fields(
    client: TestClient, model_id: str, spec: dict[str, Any]
) -> None:
    body = assert_problem(_post(client, model_id, spec), 422)
    assert [e["loc"] for e in body["errors"]] == ["calibration_dataset_id", "train_dataset_id"]
    assert "calibration_dataset_id" in body["detail"] and "train_dataset_id" in body["detail"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"target_sparsity": 0.5, "reconstruct": True}, "needs granularity 'channel'"),
        ({"target_sparsity": 0.5, "criterion": "wanda", "granularity": "channel"}, "unstructured"),
        ({"target_sparsity": 0.5, "criterion": "sparsegpt", "granularity": "block"}, "not 'block'"),
        (
            {
                "target_sparsity": 0.5,
                "criterion": "wanda",
                "schedule": {"kind": "polynomial"},
                "fine_tune": {"epochs": 1},
            },
            "one-shot",
        ),
        ({"sensitivity": {}, "criterion": "wanda"}, "sensitivity"),
        ({"target_sparsity": 0.5, "calibration": {"samples": 0}}, "greater than or equal to 1"),
        ({"target_sparsity": 0.5, "calibration": {"sample": 64}}, "sample"),
    ],
)
def test_calibration_spec_errors_are_422(
    client: TestClient, model_id: str, calibration_id: str, spec: dict[str, Any], words: str
) -> None:
    body = assert_problem(_post(client, model_id, spec, calibration_dataset_id=calibration_id), 422)
    assert words in body["detail"], body["detail"]


def test_job_body_shows_the_calibration_dataset_and_fast_resolves_to_sparsegpt(
    client: TestClient, model_id: str, calibration_id: str
) -> None:
    spec = {"target_sparsity": 0.5, "granularity": "2:4", "calibration": {"samples": 64}}
    body = create_job(client, model_id, spec, calibration_dataset_id=calibration_id)
    assert body["calibration_dataset_id"] == calibration_id
    assert body["train_dataset_id"] is None
    resolved = body["spec"]
    assert resolved["preset"] == "fast" and resolved["criterion"] == "sparsegpt"
    assert (resolved["scope"], resolved["normalization"]) == ("global", "lamp")  # fast's own (issue 21 bench)
    assert resolved["calibration"] == {"samples": 64, "batch_size": 32}
    assert resolved["reconstruct"] is False
    assert client.get(f"/v1/jobs/{body['id']}").json()["calibration_dataset_id"] == calibration_id
    # a dataset an active job calibrates on cannot be deleted under it
    assert_problem(client.delete(f"/v1/datasets/{calibration_id}"), 409)


def test_explicit_criterion_wins_over_fast_and_train_data_calibrates(
    client: TestClient, model_id: str, calibration_id: str
) -> None:
    body = create_job(
        client,
        model_id,
        {"target_sparsity": 0.5, "criterion": "wanda"},
        calibration_dataset_id=calibration_id,
    )
    assert body["spec"]["criterion"] == "wanda" and body["spec"]["scope"] == "global"
    plain = create_job(client, model_id, {"target_sparsity": 0.5})  # no calibration data: magnitude as before
    assert plain["spec"]["criterion"] == "magnitude" and plain["calibration_dataset_id"] is None
    train = upload_dataset(client)["id"]
    wanda = create_job(
        client, model_id, {"target_sparsity": 0.5, "criterion": "wanda"}, train_dataset_id=train
    )
    assert wanda["spec"]["preset"] == "recommended"
    assert wanda["spec"]["schedule"] == {"kind": "one_shot"} and wanda["spec"]["fine_tune"]["epochs"] == 3


def test_calibration_dataset_ids_are_checked_like_train(client: TestClient, model_id: str) -> None:
    spec = {"target_sparsity": 0.5, "criterion": "sparsegpt"}
    missing = assert_problem(
        _post(client, model_id, spec, calibration_dataset_id="ds_00000000000000000000"), 404
    )
    assert "ds_00000000000000000000" in missing["detail"]
    with session_scope(app_of(client).state.session_factory) as session:
        session.add(DatasetRecord(id="ds_pending_cal", name="d", format="tfrecord", status="validating"))
    pending = assert_problem(_post(client, model_id, spec, calibration_dataset_id="ds_pending_cal"), 409)
    assert [e["loc"] for e in pending["errors"]] == ["calibration_dataset_id"]
    wrong = upload_dataset(client, dataset_arrays(n=8, features=5, labels=False))["id"]
    misfit = assert_problem(_post(client, model_id, spec, calibration_dataset_id=wrong), 422)
    assert [e["loc"] for e in misfit["errors"]] == ["calibration_dataset_id"]


def test_presets_by_criterion() -> None:
    """``fast`` takes sparsegpt only with calibration data, no explicit criterion and a granularity it
    supports; ``recommended`` prunes calibration criteria one-shot and fine-tunes afterwards."""
    spec = PruneSpec.model_validate({"target_sparsity": 0.5})
    assert resolve(spec, has_train=False, has_calibration=True).criterion == "sparsegpt"
    assert resolve(spec, has_train=False).criterion == "magnitude"
    channel = PruneSpec.model_validate({"target_sparsity": 0.5, "granularity": "channel"})
    assert resolve(channel, has_train=False, has_calibration=True).criterion == "magnitude"
    recommended = resolve(
        PruneSpec.model_validate({"target_sparsity": 0.5, "criterion": "sparsegpt"}), has_train=True
    )
    assert (recommended.scope, recommended.schedule.kind, recommended.fine_tune is not None) == (
        "global",
        "one_shot",
        True,
    )
    # sparsegpt in global scope is accepted (each op at the global magnitude ranking's allocation)
    unstructured = resolve(spec, has_train=False, has_calibration=True)
    assert (unstructured.scope, unstructured.normalization) == ("global", "lamp")
