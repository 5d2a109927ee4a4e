"""Which blob store ``SECATEURS_STORAGE_URL`` names, by URL scheme (MLflow's artifact-repository registry is
the model): unset or ``file://`` -> the local store, ``s3://bucket/prefix`` -> the S3 store. A new store is one
row in ``STORES``, not another branch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from app.config import Settings
from app.storage.base import BlobStore, StoreMisconfigured
from app.storage.local import LocalBlobStore
from app.storage.s3 import S3BlobStore


def _local(url: str, settings: Settings) -> BlobStore:
    if not url:
        return LocalBlobStore(settings.data_dir)
    path = urlsplit(url).path
    if not path:
        raise StoreMisconfigured(f"SECATEURS_STORAGE_URL {url!r} names no directory (file:///abs/path)")
    return LocalBlobStore(Path(path))


def _s3(url: str, settings: Settings) -> BlobStore:
    return S3BlobStore(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)


STORES: dict[str, Callable[[str, Settings], BlobStore]] = {"": _local, "file": _local, "s3": _s3}


def open_blob_store(settings: Settings) -> BlobStore:
    """The store ``SECATEURS_STORAGE_URL`` names (module docstring)."""
    url = settings.storage_url or ""
    scheme = urlsplit(url).scheme
    opener = STORES.get(scheme)
    if opener is None:
        raise StoreMisconfigured(
            f"SECATEURS_STORAGE_URL {url!r} has no store for scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in STORES if s)
        )
    return opener(url, settings)
