"""Built test models, kept on disk across tests, xdist workers and runs.

Why: the same digits CNN used to be trained in about eight places per run (worker fixtures, e2e, S3, crossval,
bench smoke), each paying TensorFlow's start-up and a few seconds of training. A builder wrapped by
``cached_builder`` runs once per key; later calls copy the stored result into the caller's path (the callers own
and may change their copy).

The key is the builder's module and name, its arguments, a digest of the builder module's source (editing a
builder invalidates it) and the installed TensorFlow/Keras/tf_keras versions (a SavedModel written by one version
is not what another would write). The cache root is ``$SECATEURS_MODEL_CACHE``; unset means no cache (a plain
build), so library users and one-off scripts behave as before. ``tests/conftest.py`` points it at pytest's cache
dir; bench points it at ``bench/out/``.

Concurrent builders of one key (two xdist workers) serialise on an ``flock``; the result is renamed into place,
so a reader never sees half a model.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, ParamSpec

CACHE_ENV = "SECATEURS_MODEL_CACHE"
_VERSIONED = ("tensorflow", "keras", "tf-keras")

P = ParamSpec("P")


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


@functools.cache
def _source_digest(module_name: str) -> str:
    module = sys.modules[module_name]
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:16]


def cache_key(builder: Callable[..., Any], settings: dict[str, Any]) -> str:
    """Stable across processes: JSON of everything that decides the built bytes."""
    described = {
        "builder": f"{builder.__module__}.{builder.__qualname__}",
        "source": _source_digest(builder.__module__),
        "settings": {k: str(v) for k, v in sorted(settings.items())},
        "versions": _versions(),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
    return f"{builder.__name__}-{digest}"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def cached_builder(builder: Callable[P, Path]) -> Callable[P, Path]:
    """Wrap ``builder(out, *args, **kwargs) -> out`` (``out`` a file or directory path) with the disk cache."""

    @functools.wraps(builder)
    def build(*args: P.args, **kwargs: P.kwargs) -> Path:
        root = os.environ.get(CACHE_ENV)
        if not root:
            return builder(*args, **kwargs)
        bound = inspect.signature(builder).bind(*args, **kwargs)
        bound.apply_defaults()  # f(out, 4) and f(out, epochs=4) are one entry
        first, *others = bound.arguments
        out = Path(bound.arguments[first])
        settings = {name: bound.arguments[name] for name in others}
        name = "built" + "".join(out.suffixes)  # Keras insists on a .keras suffix
        key = cache_key(builder, {**settings, "_stored_as": name})
        cache = Path(root)
        cache.mkdir(parents=True, exist_ok=True)
        stored = cache / key / name
        if not stored.exists():
            with (cache / f"{key}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not stored.exists():  # another process may have built it while we waited
                    scratch = cache / f".{key}.{uuid.uuid4().hex}"
                    scratch.mkdir()
                    try:
                        builder(scratch / name, **settings)  # type: ignore[call-arg]
                        shutil.rmtree(cache / key, ignore_errors=True)  # a half-copied leftover
                        os.rename(scratch, cache / key)
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
        _copy(stored, out)
        return out

    return build
