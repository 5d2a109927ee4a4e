"""The S3 store: an S3-compatible bucket (AWS, SeaweedFS, MinIO, R2, ...) on obstore: streamed multipart
uploads with bounded memory, ranged reads, presigned URLs; it retries connection errors and 5xx answers itself.
Its errors become ours here (``app.storage.base``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from app.errors import StoreUnavailable
from app.storage.base import BlobInfo, StoreMisconfigured

_PART_BYTES = 8 << 20  # multipart part size: memory per upload is about part size x concurrency
_PUT_CONCURRENCY = 4
_READ_BUFFER = 4 << 20  # ranged GETs of this size behind a download's reads


def is_unavailable(exc: BaseException) -> bool:
    """Connection trouble or a 5xx after obstore's own retries (rather than an answer that says no)."""
    text = str(exc)
    return (
        "error sending request" in text
        or ("after " in text and " retries" in text)
        or "connection" in text.lower()
        or "timed out" in text.lower()
        or any(f"status code: {code}" in text for code in ("500", "502", "503", "504"))
    )


class S3BlobStore:
    """An S3-compatible bucket (AWS, SeaweedFS, MinIO, R2, ...) under an optional key prefix, via obstore."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_retries: int = 3,
        retry_timeout_s: float = 15.0,
    ) -> None:
        from obstore.store import S3Store

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreMisconfigured(f"SECATEURS_STORAGE_URL {url!r} is not s3://bucket[/prefix]")
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.endpoint_url = endpoint_url
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.region = region
        kwargs: dict[str, Any] = {"region": region}
        if endpoint_url:
            kwargs["endpoint"] = endpoint_url
        client_options: dict[str, Any] = {"connect_timeout": "5s", "timeout": "120s"}
        if endpoint_url and endpoint_url.startswith("http://"):
            client_options["allow_http"] = True
        self._store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={
                "max_retries": max_retries,
                "retry_timeout": timedelta(seconds=retry_timeout_s),
                "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=5)},
            },
            **kwargs,
        )

    @property
    def client(self) -> Any:
        """The obstore ``S3Store`` (endpoint, region, retries, timeouts as configured): for readers that need calls
        this interface does not offer, such as the dataset sources' ETag-checked GETs (``worker.data.sources``)."""
        return self._store

    def _where(self) -> str:
        return f"{self.url} (SECATEURS_S3_ENDPOINT_URL={self.endpoint_url or 'AWS'})"

    def _map(self, exc: Exception, key: str) -> Exception:
        """obstore's exception as ours (module docstring); FileNotFoundError passes through."""
        if isinstance(exc, FileNotFoundError) and "NoSuchBucket" not in str(exc):
            return exc
        text = str(exc)
        if "NoSuchBucket" in text:
            return StoreMisconfigured(
                f"the bucket {self.bucket!r} of SECATEURS_STORAGE_URL={self.url} does not exist at "
                f"{self.endpoint_url or 'AWS'}; create it or fix SECATEURS_STORAGE_URL"
            )
        if any(
            code in text
            for code in (
                "SignatureDoesNotMatch",
                "InvalidAccessKeyId",
                "AccessDenied",
                "403 Forbidden",
                "401 Unauthorized",
            )
        ):
            return StoreMisconfigured(
                f"the store {self._where()} refused our credentials for {key or 'the bucket'!r}: check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance's role) and the bucket policy"
            )
        if is_unavailable(exc):
            return StoreUnavailable(
                f"the blob store {self._where()} did not answer; nothing was changed, retry shortly",
                retry_after=5,
            )
        return exc

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        try:
            with path.open("rb") as fh:
                obstore.put(
                    self._store,
                    key,
                    fh,
                    chunk_size=_PART_BYTES,
                    max_concurrency=_PUT_CONCURRENCY,
                    use_multipart=path.stat().st_size > _PART_BYTES,
                )
        except Exception as exc:
            raise self._map(exc, key) from exc
        path.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        import obstore

        try:
            meta = obstore.head(self._store, key)
            reader = obstore.open_reader(self._store, key, buffer_size=_READ_BUFFER)
        except Exception as exc:
            raise self._map(exc, key) from exc
        return RemoteFile(reader, key, self, meta["last_modified"].timestamp())  # type: ignore[return-value]

    def head(self, key: str) -> BlobInfo:
        import obstore

        try:
            meta = obstore.head(self._store, key)
        except Exception as exc:
            raise self._map(exc, key) from exc
        return BlobInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    def list(self, prefix: str) -> list[BlobInfo]:
        import obstore

        try:
            out = []
            for chunk in obstore.list(self._store, prefix):
                out.extend(
                    BlobInfo(self._relative(str(m["path"])), int(m["size"]), m["last_modified"].timestamp())
                    for m in chunk
                )
            return out
        except Exception as exc:
            raise self._map(exc, prefix) from exc

    def _relative(self, path: str) -> str:
        """obstore lists paths below the store's prefix already; strip it should a version not."""
        if self.prefix and path.startswith(self.prefix + "/"):
            return path[len(self.prefix) + 1 :]
        return path

    def delete_prefix(self, prefix: str) -> int:
        import obstore

        if not prefix.endswith("/"):  # one key (obstore lists below a prefix's '/' only)
            try:
                self.head(prefix)
                obstore.delete(self._store, prefix)
            except FileNotFoundError:
                return 0
            except Exception as exc:
                raise self._map(exc, prefix) from exc
            return 1
        keys = [b.key for b in self.list(prefix)]
        if not keys:
            return 0
        try:
            for start in range(0, len(keys), 1000):
                obstore.delete(self._store, keys[start : start + 1000])
        except Exception as exc:
            raise self._map(exc, prefix) from exc
        return len(keys)

    def presign_get(self, key: str, expires_s: int, filename: str | None = None) -> str:
        """A SigV4 query-string signature, computed locally (no request). With ``filename`` the URL also signs
        S3's ``response-content-disposition``, so the store names the download as the API would; obstore's
        signer takes no such parameters, so that case goes through boto3's."""
        if filename is None:
            import obstore

            try:
                return str(obstore.sign(self._store, "GET", key, timedelta(seconds=expires_s)))
            except Exception as exc:
                raise self._map(exc, key) from exc
        return str(
            self._boto3().generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": f"{self.prefix}/{key}" if self.prefix else key,
                    "ResponseContentDisposition": f"attachment; filename*=UTF-8''{quote(filename)}",
                },
                ExpiresIn=expires_s,
            )
        )

    def _boto3(self) -> Any:
        """boto3's S3 client, only to presign (credentials from the same AWS_* variables; path-style URLs)."""
        if getattr(self, "_presigner", None) is None:
            import boto3
            from botocore.config import Config

            self._presigner = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
        return self._presigner

    def check(self) -> None:
        import obstore

        try:
            next(iter(obstore.list(self._store, None, chunk_size=1)), None)
        except Exception as exc:
            mapped = self._map(exc, "")
            if mapped is exc:
                raise StoreUnavailable(
                    f"the blob store {self._where()} answered unexpectedly: {str(exc).splitlines()[0][:300]}",
                    retry_after=5,
                ) from exc
            raise mapped from exc


class RemoteFile:
    """obstore's ReadableFile (ranged GETs behind a buffer) with what the download path asks of a file:
    ``name``, ``size_bytes``, seek/read/close; errors mid-read mapped like the store's."""

    def __init__(self, reader: Any, key: str, store: S3BlobStore, mtime: float) -> None:
        self._reader, self.name, self._store, self.mtime = reader, key, store, mtime
        self.size_bytes = int(reader.size)
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes unless the object ends first (Starlette takes a short read for the end)."""
        try:
            if size is None or size < 0:
                return bytes(self._reader.readall())
            parts, wanted = [], size
            while wanted > 0:
                data = bytes(self._reader.read(wanted))
                if not data:
                    break
                parts.append(data)
                wanted -= len(data)
            return b"".join(parts)
        except Exception as exc:
            raise self._store._map(exc, self.name) from exc

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._reader.seek(offset, whence))

    def tell(self) -> int:
        return int(self._reader.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reader.close()

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 20):
            yield chunk
