"""Built models, kept on disk across tests, xdist workers, benchmark sections and runs: one cache for both.

Why: the same digits CNN used to be trained in about eight places per test run (worker fixtures, e2e, S3,
crossval, bench smoke), and several benchmark sections trained or exported the same models again, each paying
TensorFlow's start-up and seconds of training.

Two ways in, one store:
- ``cached_model(build, *args, cache_dir=...)``: ``build(root, *args) -> meta`` fills a directory once per
  key; returns that directory and ``meta`` (JSON) plus ``cached``. Benchmarks use it.
- ``@cached_builder`` on ``builder(out, ...) -> out`` (``out`` a file or a directory): later calls copy the
  stored result into the caller's ``out`` (the caller owns and may change its copy). The test model builders
  use it; it is on when ``$SECATEURS_MODEL_CACHE`` names a directory (``tests/conftest.py`` points it at
  pytest's cache dir) and a plain build otherwise, so one-off scripts behave as before.

The key is the builder's qualified name, its arguments and the installed TensorFlow/Keras/tf_keras versions (a
SavedModel another version wrote is not what this one would write); ``cached_builder`` adds a digest of the
builder module's source, so editing a builder rebuilds. A build goes to a scratch directory renamed into
place, so a killed run leaves no half-built model; concurrent builders of one key (two xdist workers) wait on
an ``flock`` and the second one reuses the first one's result.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

CACHE_ENV = "SECATEURS_MODEL_CACHE"
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "bench" / "out" / "cache"  # git-ignored
_VERSIONED = ("tensorflow", "keras", "tf-keras")  # what decides the bytes a builder writes

P = ParamSpec("P")


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _describe(value: object) -> str:
    """A builder or argument as it goes into the key (functions by their qualified name)."""
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return repr(value)


@functools.cache
def _source_digest(module_name: str) -> str:
    return hashlib.sha256(inspect.getsource(sys.modules[module_name]).encode()).hexdigest()[:16]


def _entry(
    cache: Path, readable: list[object], described: dict[str, Any], build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """The directory of key ``described`` under ``cache``, built by ``build(scratch)`` if missing."""
    described = {**described, "versions": {name: _dist_version(name) for name in _VERSIONED}}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.=]+", "-", "-".join(str(part).strip("_") for part in readable))[:80]
    root = cache / f"{slug}-{digest}"
    meta_path = root / "meta.json"
    if meta_path.is_file():
        return root, {**json.loads(meta_path.read_text()), "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f".{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if meta_path.is_file():  # another process built it while this one waited
            return root, {**json.loads(meta_path.read_text()), "cached": True}
        shutil.rmtree(root, ignore_errors=True)  # a build of another layout, or an interrupted one
        scratch = cache / f".{root.name}.{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            meta = build(scratch)
            (scratch / "key.json").write_text(json.dumps(described, indent=2))
            (scratch / "meta.json").write_text(json.dumps(meta, indent=2))
            scratch.rename(root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return root, {**meta, "cached": False}


def cached_model(
    build: Callable[..., dict[str, Any]], *args: object, cache_dir: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """``build(root, *args)`` once per key under ``cache_dir`` (default ``$SECATEURS_MODEL_CACHE``, else
    bench/out/cache); returns ``root`` and what ``build`` returned plus ``cached``: whether it was reused."""
    cache = cache_dir or Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    described = {"builder": _describe(build), "args": [_describe(a) for a in args]}
    readable = [getattr(a, "__name__", a) for a in (build, *args)]
    return _entry(cache, readable, described, lambda scratch: build(scratch, *args))


def cached_builder(builder: Callable[P, Path]) -> Callable[P, Path]:
    """Wrap ``builder(out, ...) -> out`` with the cache named by ``$SECATEURS_MODEL_CACHE`` (off when unset)."""

    @functools.wraps(builder)
    def build(*args: P.args, **kwargs: P.kwargs) -> Path:
        root = os.environ.get(CACHE_ENV)
        if not root:
            return builder(*args, **kwargs)
        bound = inspect.signature(builder).bind(*args, **kwargs)
        bound.apply_defaults()  # f(out, 4) and f(out, epochs=4) are one entry
        first, *others = bound.arguments
        out = Path(bound.arguments[first])
        settings = {key: bound.arguments[key] for key in others}
        stored = "built" + "".join(out.suffixes)  # Keras insists on a .keras suffix
        described = {
            "builder": _describe(builder),
            "source": _source_digest(builder.__module__),
            "settings": {key: _describe(value) for key, value in sorted(settings.items())},
            "stored_as": stored,
        }

        def fill(scratch: Path) -> dict[str, Any]:
            builder(scratch / stored, **settings)  # type: ignore[call-arg]
            return {}

        entry, _ = _entry(Path(root), [builder.__name__, *settings.values()], described, fill)
        out.parent.mkdir(parents=True, exist_ok=True)
        if (entry / stored).is_dir():
            shutil.copytree(entry / stored, out, dirs_exist_ok=True)
        else:
            shutil.copy2(entry / stored, out)
        return out

    return build
