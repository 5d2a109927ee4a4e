"""Issue 4 over real HTTP on the embedded default: K-fold cross-validation with an evaluation set that has
inputs only (fidelity, no quality metrics), the 422 for cross-validation without a train dataset, and the
document checked against the published JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import Embedded
from tests.support import model_factory
from tests.support.procs import poll

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cv")
    saved = model_factory.build_keras3_export(root / "saved_model")
    train, test = model_factory.digits_datasets()
    return {
        "model.zip": model_factory.zip_saved_model(saved, root / "model.zip"),
        "train.npz": model_factory.write_npz(root / "train.npz", train),
        "inputs.npz": model_factory.write_npz(root / "inputs.npz", {"x": test["x"]}),
    }


def _upload(http: httpx.Client, endpoint: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        response = http.post(endpoint, files={"file": (path.name, fh)})
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_cross_validation_with_an_inputs_only_eval_set(files: dict[str, Path], embedded: Embedded) -> None:
    with httpx.Client(base_url=embedded.url, timeout=60) as http:
        model = _upload(http, "/v1/models", files["model.zip"])
        train = _upload(http, "/v1/datasets", files["train.npz"])
        inputs = _upload(http, "/v1/datasets", files["inputs.npz"])  # x only: accepted
        assert set(inputs["arrays"]) == {"x"}
        spec = {
            "target_sparsity": 0.6,
            "evaluation": {
                "cross_validation": {"folds": 2},
                "latency": {"batch_sizes": [1], "runs": 5, "budget_s": 1.0},
            },
        }
        refused = http.post("/v1/jobs", json={"model_id": model["id"], "spec": spec})
        assert refused.status_code == 422, refused.text
        assert "train_dataset_id" in [e["loc"] for e in refused.json()["errors"]]

        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "eval_dataset_id": inputs["id"],
                "spec": spec,
            },
        )
        assert created.status_code == 202, created.text
        location = created.headers["location"]
        job = poll(lambda: http.get(location).json(), lambda b: b["status"] not in ("queued", "running"), 300)
        assert job["status"] == "succeeded", job
        # the folds and the main run ran as trials (worker.kinds.folds); the main run's zip is the artifact
        assert [t["label"] for t in job["trials"]] == ["fold-1", "fold-2", "main"]
        items = http.get(f"{location}/artifacts").json()["items"]
        assert [item["name"] for item in items] == ["saved_model"]
        metrics = http.get(f"{location}/metrics").json()
        jsonschema.validate(metrics, http.get("/v1/schemas/metrics").json())

    assert metrics["baseline"]["metrics"] is None and metrics["pruned"]["metrics"] is None
    assert metrics["pruned"]["fidelity"]["n_predictions"] == 450  # the inputs-only eval set
    cv = metrics["cross_validation"]
    assert cv["folds"] == 2 and sum(row["n_test"] for row in cv["per_fold"]) == 1347
    assert 0.0 <= cv["summary"]["pruned"]["accuracy"]["mean"] <= 1.0
    assert metrics["baseline"]["latency_ms"]["1"]["runs"] <= 5
