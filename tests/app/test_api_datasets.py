"""POST/GET/DELETE /v1/datasets against the real app: .npz checked without unpickling, nothing kept on refusal."""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.helpers import (
    assert_problem,
    create_job,
    dataset_arrays,
    files_under,
    multipart,
    npz_bytes,
    sent_tasks,
    sha256,
    upload_dataset,
    upload_model,
    zip_bytes,
)


def assert_nothing_kept(client: TestClient, settings: Settings) -> None:
    assert client.get("/v1/datasets").json() == {"items": [], "next_cursor": None}
    assert files_under(settings.data_dir / "datasets") == []
    assert files_under(settings.data_dir / "tmp") == []


def test_upload_dataset(client: TestClient, settings: Settings) -> None:
    data = npz_bytes(**dataset_arrays(n=12))
    response = client.post("/v1/datasets", files={"file": ("train.npz", data)})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("ds_")
    assert body["n_samples"] == 12
    assert body["arrays"] == {
        "x": {"shape": [12, 64], "dtype": "float32"},
        "y": {"shape": [12], "dtype": "int64"},
    }
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == sha256(data)
    assert body["name"] == "train.npz"
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"

    stored = files_under(settings.data_dir / "datasets")
    assert [p.name for p in stored] == [f"{body['id']}.npz"]
    assert stored[0].read_bytes() == data
    with np.load(stored[0], allow_pickle=False) as loaded:
        assert loaded["x"].shape == (12, 64)
    assert files_under(settings.data_dir / "tmp") == []
    assert sent_tasks(settings) == []  # datasets need no worker


def test_upload_multi_input_dataset(client: TestClient) -> None:
    rng = np.random.default_rng(1)
    body = upload_dataset(
        client,
        {
            "x.image": rng.normal(size=(5, 8, 8, 3)).astype(np.float32),
            "x.meta": rng.normal(size=(5, 4)).astype(np.float64),
            "y": np.arange(5, dtype=np.int32),
        },
    )
    assert body["n_samples"] == 5
    assert body["arrays"] == {
        "x.image": {"shape": [5, 8, 8, 3], "dtype": "float32"},
        "x.meta": {"shape": [5, 4], "dtype": "float64"},
        "y": {"shape": [5], "dtype": "int32"},
    }


def test_upload_dataset_without_labels(client: TestClient) -> None:
    body = upload_dataset(client, dataset_arrays(n=3, labels=False))
    assert list(body["arrays"]) == ["x"]
    assert body["n_samples"] == 3


def test_upload_compressed_npz(client: TestClient) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **dataset_arrays(n=7))  # type: ignore[arg-type]
    response = client.post("/v1/datasets", files={"file": ("c.npz", buf.getvalue())})
    assert response.status_code == 201, response.text
    assert response.json()["n_samples"] == 7


def test_upload_takes_the_name_field(client: TestClient) -> None:
    response = client.post(
        "/v1/datasets", files={"file": ("d.npz", npz_bytes(**dataset_arrays()))}, data={"name": "mnist test"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "mnist test"


def _with_nan() -> dict[str, np.ndarray]:
    arrays = dataset_arrays(n=6)
    arrays["x"][3, 5] = np.nan
    return arrays


def _with_inf() -> dict[str, np.ndarray]:
    arrays = dataset_arrays(n=6)
    arrays["x"][0, 0] = np.inf
    arrays["x"][1, 0] = -np.inf
    return arrays


REFUSED_ARRAYS: dict[str, tuple[dict[str, np.ndarray], str]] = {
    "nan-in-x": (_with_nan(), "NaN/inf"),
    "inf-in-x": (_with_inf(), "2 NaN/inf values"),
    "mismatched-lengths": (
        {"x": np.zeros((6, 4), np.float32), "y": np.zeros(5, np.int64)},
        "same number of samples",
    ),
    "no-x": ({"y": np.zeros(5, np.int64)}, "no 'x' array"),
    "unexpected-name": ({"x": np.zeros((2, 2)), "labels": np.zeros(2)}, "'labels'"),
    "x-and-x-dot": ({"x": np.zeros((2, 2)), "x.a": np.zeros((2, 2))}, "not both"),
    "scalar-x": ({"x": np.float32(1.0)}, "scalar"),
    "no-samples": ({"x": np.zeros((0, 4), np.float32)}, "no samples"),
    "strings": ({"x": np.zeros((2, 2)), "y": np.array(["a", "b"])}, "dtype"),
    "complex": ({"x": np.zeros((2, 2), np.complex64)}, "dtype"),
}


@pytest.mark.parametrize("case", list(REFUSED_ARRAYS), ids=list(REFUSED_ARRAYS))
def test_refused_arrays_are_422(client: TestClient, settings: Settings, case: str) -> None:
    arrays, words = REFUSED_ARRAYS[case]
    response = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**arrays))})
    body = assert_problem(response, 422)
    assert words in body["detail"]
    assert_nothing_kept(client, settings)


def test_nan_in_y_is_allowed(client: TestClient) -> None:
    """Only inputs must be finite; regression targets are the user's business."""
    arrays = dataset_arrays(n=4)
    arrays["y"] = np.array([0.5, np.nan, 1.0, 2.0])
    assert upload_dataset(client, arrays)["arrays"]["y"]["dtype"] == "float64"


def test_pickled_object_array_is_refused_without_unpickling(client: TestClient, settings: Settings) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (_explode, ("unpickled!",))

    arrays = {"x": np.zeros((2, 3), np.float32), "y": np.array([Boom(), Boom()], dtype=object)}
    response = client.post("/v1/datasets", files={"file": ("evil.npz", npz_bytes(**arrays))})
    body = assert_problem(response, 422)
    assert "pickle" in body["detail"]
    assert_nothing_kept(client, settings)


def _explode(message: str) -> None:  # would run only if the server unpickled the array
    raise AssertionError(message)


REFUSED_FILES: dict[str, tuple[bytes, int, str]] = {
    "random-bytes": (bytes(range(256)) * 3, 415, "not a zip"),
    "single-npy": (b"\x93NUMPY" + bytes(120), 415, ".npy"),
    "zip-of-text": (zip_bytes({"notes.txt": b"hello"}), 422, "not a .npy"),
    "truncated-npz": (npz_bytes(**dataset_arrays(n=50))[:-200], 422, "zip"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES), ids=list(REFUSED_FILES))
def test_refused_files(client: TestClient, settings: Settings, case: str) -> None:
    data, status, words = REFUSED_FILES[case]
    body = assert_problem(client.post("/v1/datasets", files={"file": ("d.npz", data)}), status)
    assert words in body["detail"]
    assert_nothing_kept(client, settings)


def test_not_multipart_is_415(client: TestClient, settings: Settings) -> None:
    data = npz_bytes(**dataset_arrays())
    response = client.post("/v1/datasets", content=data, headers={"content-type": "application/octet-stream"})
    assert_problem(response, 415)
    assert_nothing_kept(client, settings)


def test_missing_file_field_is_400(client: TestClient, settings: Settings) -> None:
    content, content_type = multipart([("name", None, b"d")])
    response = client.post("/v1/datasets", content=content, headers={"content-type": content_type})
    body = assert_problem(response, 400)
    assert "'file'" in body["detail"]
    assert_nothing_kept(client, settings)


def test_too_large_is_413(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, max_dataset_bytes=500)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**dataset_arrays(n=50)))})
        assert_problem(response, 413)
        assert_nothing_kept(client, settings)


def test_get_list_and_pagination(client: TestClient) -> None:
    ids = [upload_dataset(client, dataset_arrays(n=i + 1))["id"] for i in range(5)]

    got = client.get(f"/v1/datasets/{ids[2]}")
    assert got.status_code == 200
    assert got.json()["n_samples"] == 3

    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == ids[::-1]

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params: dict[str, str | int] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/datasets", params=params).json()
        seen += [d["id"] for d in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert cursor is None
    assert seen == ids[::-1]


def test_bad_cursor_is_400(client: TestClient) -> None:
    assert_problem(client.get("/v1/datasets", params={"cursor": "%%%"}), 400)


def test_get_unknown_dataset_is_404(client: TestClient) -> None:
    body = assert_problem(client.get("/v1/datasets/ds_00000000000000000000"), 404)
    assert "GET /v1/datasets" in body["detail"]


def test_delete_dataset(client: TestClient, settings: Settings) -> None:
    created = upload_dataset(client)
    response = client.delete(f"/v1/datasets/{created['id']}")
    assert response.status_code == 204
    assert_problem(client.get(f"/v1/datasets/{created['id']}"), 404)
    assert_problem(client.delete(f"/v1/datasets/{created['id']}"), 404)
    assert files_under(settings.data_dir / "datasets") == []


@pytest.mark.parametrize("role", ["train_dataset_id", "eval_dataset_id"])
def test_delete_dataset_used_by_a_queued_job_is_409(client: TestClient, role: str) -> None:
    model = upload_model(client)
    dataset = upload_dataset(client)
    spec: dict[str, object] = {"target_sparsity": 0.5}
    job = create_job(client, model["id"], spec, **{role: dataset["id"]})

    body = assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409)
    assert "cancel" in body["detail"]
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 200

    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
