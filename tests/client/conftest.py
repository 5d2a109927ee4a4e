"""Servers for the client and CLI tests.

- ``serve_app``: the real FastAPI app (real SQLite, real embedded broker files, no worker consuming) served by
  uvicorn in a thread of the test process. Real HTTP, so streamed uploads, headers and Range behave as in
  production; no worker, so jobs stay ``queued`` until canceled (deterministic states for error mapping,
  cancel, timeouts).
- ``embedded`` (tests/conftest.py): one real ``secateurs serve`` for the session's end-to-end tests.
- ``tiny``: a plain ``tf.Module`` digits MLP (input ``pixels``) zipped, with ``x.pixels``/``y`` datasets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from tests.app.helpers import saved_model_zip
from tests.support import model_factory
from tests.support.procs import free_port


@contextmanager
def running_app(settings: Settings) -> Iterator[str]:
    """``create_app(settings)`` on a free loopback port in a daemon thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", log_config=None
    )  # no dictConfig: it would bind handlers to the stderr pytest swaps out per test
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the in-process API did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


ServeApp = Callable[..., AbstractContextManager[str]]


@pytest.fixture
def serve_app(data_dir: Path) -> ServeApp:
    """``with serve_app(**settings_overrides) as url:`` the real app on ``data_dir`` (min_free_bytes=0)."""

    def serve(**overrides: object) -> AbstractContextManager[str]:
        values: dict[str, object] = {"data_dir": data_dir, "min_free_bytes": 0, **overrides}
        return running_app(Settings(**values))  # type: ignore[arg-type]

    return serve


@pytest.fixture
def api_url(serve_app: ServeApp) -> Iterator[str]:
    """The default in-process app (no keys, embedded broker files, no worker)."""
    with serve_app() as url:
        yield url


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A structurally valid SavedModel zip (no TensorFlow needed; a worker would call it invalid)."""
    path = tmp_path / "fake_model.zip"
    path.write_bytes(saved_model_zip())
    return path


@dataclass(frozen=True)
class Tiny:
    model_zip: Path
    train: Path
    test: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The tf.Module MLP (dict signatures on input ``pixels``) and digits datasets named for that input."""
    root = tmp_path_factory.mktemp("tiny")
    saved = model_factory.build_tf_module(root / "saved_model", steps=60, hidden=16)
    train, test = model_factory.digits_datasets(flat=True)
    name = f"x.{model_factory.MODULE_INPUT}"
    return Tiny(
        model_zip=model_factory.zip_saved_model(saved, root / "tiny.zip"),
        train=model_factory.write_npz(root / "train.npz", {name: train["x"][:400], "y": train["y"][:400]}),
        test=model_factory.write_npz(root / "test.npz", {name: test["x"][:200], "y": test["y"][:200]}),
    )
