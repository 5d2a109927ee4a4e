"""Why a dataset cannot be read, in words a person can act on (the record's ``error`` {"code", "message"}).

```
PipelineError (worker.errors)
└── DataError           a dataset problem; never raised itself except by code outside these three families
    ├── SourceError      listing or fetching the source (or unpacking an uploaded archive) failed
    ├── RecordError      one record does not parse / one image does not decode: names shard key + record index
    └── DescriptionError the registration's features / inputs / label do not fit the data
```

A ``DataError`` is a ``PipelineError`` so the tasks layer records it like any other user-actionable failure.
Third-party exceptions (obstore, pyarrow, protobuf, TensorFlow) are mapped where they are called
(``raise SourceError(...) from exc``). A store that does not answer is not our data's fault: it stays
:class:`app.errors.StoreUnavailable` (the task retries).

Codes in use:
- SourceError: ``source_empty`` (no objects / no shards), ``too_many_objects`` (above
  SECATEURS_DATASET_MAX_OBJECTS), ``shard_changed`` (ETag or size differs from the manifest's),
  ``shard_missing`` (an object listed in the manifest is gone), ``source_denied`` (outside the allowed
  prefixes, ``..``, a symlink leaving the root, or the store refused our credentials), ``source_invalid``
  (a malformed source URI), ``archive_invalid`` / ``archive_too_large`` (an uploaded .tar/.zip),
  ``archive_unrecognised`` (the archive holds neither shards nor an image folder).
- RecordError: ``bad_record`` (not a TFRecord / not a tf.train.Example), ``bad_image``.
- DescriptionError: ``feature_missing``, ``feature_mismatch`` (dtype or value count), ``column_missing``,
  ``input_invalid`` (inputs / label name nothing, or cannot be guessed), ``unsupported_array``.
"""

from __future__ import annotations

from worker.errors import PipelineError


class DataError(PipelineError):
    """A dataset problem with a stable ``code`` and a ``message`` that says what to change."""


class SourceError(DataError):
    """Raised while listing or fetching a source (``worker.data.sources``) or unpacking an upload
    (``worker.data.convert``): empty, too large, outside the allowed roots, changed or gone since listing."""


class RecordError(DataError):
    """Raised when a record cannot be read: a broken TFRecord frame, bytes that are not a tf.train.Example,
    an image that does not decode. The message names the shard key and the record index (0-based)."""

    def __init__(
        self, code: str, message: str, *, shard: str | None = None, index: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.shard = shard
        self.index = index


class DescriptionError(DataError):
    """Raised when the registration's ``features`` / ``inputs`` / ``label`` do not fit the data (a feature
    missing or of another dtype, a column that does not exist), or cannot be inferred. Names the feature."""
