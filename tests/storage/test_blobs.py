"""The blob store interface, the same checks on the local directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from pathlib import Path

import pytest

from app.errors import StoreUnavailable
from app.storage import Storage
from app.storage.base import BlobStore, StoreMisconfigured, file_stat
from app.storage.cache import BlobCache, CorruptBlob
from app.storage.local import LocalBlobStore
from app.storage.s3 import S3BlobStore
from tests.support.seaweed import Seaweed, free_ports

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def blob_file(path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def test_streamed_put_then_whole_and_ranged_reads(store: BlobStore, tmp_path: Path) -> None:
    path, data = blob_file(tmp_path / "big.bin", 19 * MiB + 123)  # several multipart parts on S3
    store.put_file("models/mdl_a/upload.zip", path)
    assert not path.exists()  # consumed: moved, or deleted once uploaded
    assert store.head("models/mdl_a/upload.zip").size == len(data)
    with store.open("models/mdl_a/upload.zip") as reader:
        assert file_stat(reader).st_size == len(data)
        digest = hashlib.sha256()
        while chunk := reader.read(3 * MiB):
            digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        reader.seek(9 * MiB - 7)  # across a buffer boundary
        assert reader.read(20) == data[9 * MiB - 7 : 9 * MiB + 13]
        reader.seek(len(data) - 5)
        assert reader.read(100) == data[-5:]  # short at the end, never past it


def test_missing_keys_are_file_not_found(store: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.open("jobs/job_none/pruned.zip")
    with pytest.raises(FileNotFoundError):
        store.head("jobs/job_none/pruned.zip")
    assert store.delete_prefix("jobs/job_none/") == 0
    assert store.list("jobs/job_none/") == []


def test_list_and_delete_a_prefix(store: BlobStore, tmp_path: Path) -> None:
    for name in ("pruned.zip", "metrics.json", "artifacts/tflite_int8.tflite"):
        store.put_file(f"jobs/job_1/{name}", blob_file(tmp_path / "f", 10)[0])
    store.put_file("jobs/job_10/pruned.zip", blob_file(tmp_path / "f", 10)[0])
    listed = sorted(b.key for b in store.list("jobs/job_1/"))
    assert listed == [
        "jobs/job_1/artifacts/tflite_int8.tflite",
        "jobs/job_1/metrics.json",
        "jobs/job_1/pruned.zip",
    ]
    assert all(b.modified > 0 for b in store.list("jobs/"))
    assert store.delete_prefix("jobs/job_1/") == 3
    assert store.list("jobs/job_1/") == []
    assert [b.key for b in store.list("jobs/job_10/")] == ["jobs/job_10/pruned.zip"]  # a prefix, not a glob


def test_presigned_url_serves_the_object_and_ranges(s3_store: S3BlobStore, tmp_path: Path) -> None:
    path, data = blob_file(tmp_path / "a.zip", 2 * MiB)
    s3_store.put_file("jobs/job_p/pruned.zip", path)
    url = s3_store.presign_get("jobs/job_p/pruned.zip", 60)
    assert "X-Amz-Signature=" in url and s3_store.bucket in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    ranged = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(ranged, timeout=10) as response:
        assert response.status == 206 and response.read() == data[100:200]
    tampered = url.replace("pruned.zip", "metrics.json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=10)
    assert refused.value.code == 403  # the signature covers the key


def test_presigned_url_names_the_download(s3_store: S3BlobStore, tmp_path: Path) -> None:
    path, data = blob_file(tmp_path / "a.zip", 1000)
    s3_store.put_file("jobs/job_n/pruned.zip", path)
    url = s3_store.presign_get("jobs/job_n/pruned.zip", 60, "job_n-pruned.zip")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
        assert "job_n-pruned.zip" in response.headers["Content-Disposition"]


def test_local_store_has_no_presigned_urls(tmp_path: Path) -> None:
    assert LocalBlobStore(tmp_path).presign_get("jobs/job_x/pruned.zip", 60) is None


def test_keys_cannot_leave_the_local_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="leaves"):
        LocalBlobStore(tmp_path / "root").open("../outside")


def test_wrong_credentials_name_the_settings(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3BlobStore(f"s3://{seaweed.bucket}/x", endpoint_url=seaweed.endpoint)
    with pytest.raises(StoreMisconfigured, match="AWS_SECRET_ACCESS_KEY"):
        store.check()


def test_missing_bucket_names_the_setting(s3_env: dict[str, str]) -> None:
    store = S3BlobStore("s3://no-such-bucket-here/x", endpoint_url=s3_env["SECATEURS_S3_ENDPOINT_URL"])
    with pytest.raises(StoreMisconfigured, match=r"SECATEURS_STORAGE_URL.*does not exist"):
        store.check()


def test_unreachable_store_is_unavailable_not_misconfigured(s3_env: dict[str, str], tmp_path: Path) -> None:
    (port,) = free_ports(1)
    store = S3BlobStore(
        "s3://secateurs/x", endpoint_url=f"http://127.0.0.1:{port}", max_retries=1, retry_timeout_s=1
    )
    with pytest.raises(StoreUnavailable) as down:
        store.check()
    assert down.value.status == 503 and down.value.retry_after
    assert "SECATEURS_S3_ENDPOINT_URL" in down.value.detail
    path, _ = blob_file(tmp_path / "kept.bin", 100)
    with pytest.raises(StoreUnavailable):
        store.put_file("datasets/ds_a.npz", path)
    assert path.exists()  # a failed put keeps the caller's file


class CountingStore:
    """Counts opens of the wrapped store (how often the cache went to the store)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner, self.opens = inner, 0
        self.url = inner.url

    def open(self, key: str):  # type: ignore[no-untyped-def]
        self.opens += 1
        return self.inner.open(key)


def test_cache_fetches_once_per_host_even_concurrently(s3_store: S3BlobStore, tmp_path: Path) -> None:
    path, data = blob_file(tmp_path / "m.zip", 3 * MiB)
    s3_store.put_file("models/mdl_c/upload.zip", path)
    sha = hashlib.sha256(data).hexdigest()
    counting = CountingStore(s3_store)
    cache = BlobCache(tmp_path / "cache", max_bytes=0)
    results: list[Path] = []

    def fetch() -> None:
        results.append(cache.get(counting, "models/mdl_c/upload.zip", sha, ".zip"))  # type: ignore[arg-type]

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.opens == 1
    assert len(set(results)) == 1 and results[0].read_bytes() == data and results[0].name == f"{sha}.zip"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_cache_refuses_bytes_that_do_not_match_the_digest(s3_store: S3BlobStore, tmp_path: Path) -> None:
    s3_store.put_file("datasets/ds_x.npz", blob_file(tmp_path / "d", 1000)[0])
    cache = BlobCache(tmp_path / "cache", max_bytes=0)
    with pytest.raises(CorruptBlob, match="upload it again"):
        cache.get(s3_store, "datasets/ds_x.npz", "0" * 64, ".npz")
    assert not (tmp_path / "cache" / f"{'0' * 64}.npz").exists()


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    source = LocalBlobStore(tmp_path / "src")
    cache = BlobCache(tmp_path / "cache", max_bytes=2500, grace_s=0)
    digests = []
    for i in range(3):
        data = bytes([i]) * 1000
        digests.append(hashlib.sha256(data).hexdigest())
        (tmp_path / "f").write_bytes(data)
        source.put_file(f"datasets/ds_{i}.npz", tmp_path / "f")
    first = cache.get(source, "datasets/ds_0.npz", digests[0], ".npz")
    second = cache.get(source, "datasets/ds_1.npz", digests[1], ".npz")
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    cache.get(source, "datasets/ds_0.npz", digests[0], ".npz")  # a use: ds_0 is now the most recent
    cache.get(source, "datasets/ds_2.npz", digests[2], ".npz")  # 3000 bytes > 2500: the LRU entry goes
    kept = {p.name for _, _, p in cache.entries()}
    assert kept == {f"{digests[0]}.npz", f"{digests[2]}.npz"}


def test_storage_facade_on_s3_shares_nothing_with_the_data_dir(s3_store: S3BlobStore, tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data", s3_store, BlobCache(tmp_path / "cache", 0))
    assert storage.remote
    storage.job_dir("job_f").mkdir(parents=True)
    out = storage.job_dir("job_f") / "pruned.zip"
    out.write_bytes(b"zip bytes")
    storage.publish(storage.job_key("job_f", "pruned.zip"), out)
    with storage.open_blob("jobs/job_f/pruned.zip") as reader:
        assert reader.read() == b"zip bytes"
    assert storage.stored_ids("jobs/") == {
        "job_f": pytest.approx(s3_store.head("jobs/job_f/pruned.zip").modified)
    }
    storage.remove_job("job_f")
    assert s3_store.list("jobs/job_f/") == []
    assert not out.exists()  # uploaded, then the worker's local copy went
