"""Checks what cannot run here (no Docker engine): the compose file and Dockerfile point at real things; and
the one-way dependency rule: the API process never loads TensorFlow."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_loads_no_tensorflow_or_worker() -> None:
    code = (
        "import sys; import app.main, app.cli, app.embedded; app.main.create_app(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras', 'worker')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_blob_storage_loads_no_web_stack() -> None:
    """Workers import app.storage: the API's request parsing (Starlette, python-multipart) stays out of them."""
    code = (
        "import sys; import app.storage, app.storage.cache; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'fastapi', 'multipart', 'python_multipart')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_app_sources_never_import_tensorflow_or_worker() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(tensorflow|keras|tf_keras|worker)\b", re.M)
    offenders = [str(p) for p in (ROOT / "app").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_compose_services_commands_and_env_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    dockerfile = (ROOT / "Dockerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    settings_fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        service = services[name]
        assert re.search(rf"^FROM .+ AS {service['build']['target']}$", dockerfile, re.M)
        command = service["command"]
        assert command[0] in scripts and command[1] in ("serve", "worker")
        module, func = scripts[command[0]].split(":")
        assert hasattr(importlib.import_module(module), func)
        for key in service["environment"]:
            if key.startswith("AWS_"):  # the S3 client's own credential variables
                assert key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_SESSION_TOKEN")
                continue
            assert key.startswith("SECATEURS_") and key.removeprefix("SECATEURS_").lower() in settings_fields
        assert any(v.split("#")[0].strip().endswith(":/data") for v in service["volumes"])
        for dep in service["depends_on"]:
            assert dep in services and "healthcheck" in services[dep]
    env = services["api"]["environment"]
    # The compose environment is a valid production configuration.
    Settings(**{k.removeprefix("SECATEURS_").lower(): v for k, v in env.items() if k.startswith("SECATEURS_")})
    # No shared disk: api and worker mount no common volume; blobs go through the S3 service.
    named = {n: {v.split(":")[0] for v in services[n]["volumes"]} for n in ("api", "worker")}
    assert named["api"].isdisjoint(named["worker"])
    assert env["SECATEURS_STORAGE_URL"].startswith("s3://")
    store = services["seaweedfs"]
    assert store["command"][0] == "mini" and "healthcheck" in store
    bucket = env["SECATEURS_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert f"-bucket={bucket}" in store["command"]
    port = env["SECATEURS_S3_ENDPOINT_URL"].rsplit(":", 1)[1]
    assert f"-s3.port={port}" in store["command"]
    assert store["environment"]["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    assert importlib.util.find_spec("worker.celery_worker") is not None
    for copied in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied


def test_production_refuses_unsafe_defaults() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="BROKER_URL"):
        Settings(environment="production", database_url="postgresql+psycopg://x/y")
    with pytest.raises(ValidationError, match="PostgreSQL"):
        Settings(environment="production", broker_url="redis://r:6379/0")
    with pytest.raises(ValidationError, match="HARD_TIME_LIMIT"):
        Settings(task_soft_time_limit=100, task_hard_time_limit=50)


def test_the_longest_modules_first_list_names_real_modules_and_make_keeps_its_order() -> None:
    """tests/conftest.py SLOW_FIRST orders xdist's queue; a renamed module would silently drop out of it, and
    without --no-loadscope-reorder xdist re-sorts the queue by test count."""
    from tests.conftest import SLOW_FIRST

    missing = [path for path in SLOW_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"SLOW_FIRST names modules that do not exist: {missing}"
    assert len(set(SLOW_FIRST)) == len(SLOW_FIRST)
    xdist = re.search(r"^XDIST\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert xdist is not None and "--dist loadscope" in xdist.group(1)
    assert "--no-loadscope-reorder" in xdist.group(1)
