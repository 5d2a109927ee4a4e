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
            assert key.startswith("SECATEURS_") and key.removeprefix("SECATEURS_").lower() in settings_fields
        assert any(v.endswith(":/data") for v in service["volumes"])
        for dep in service["depends_on"]:
            assert dep in services and "healthcheck" in services[dep]
    env = services["api"]["environment"]
    # The compose environment is a valid production configuration.
    Settings(**{k.removeprefix("SECATEURS_").lower(): v for k, v in env.items()})
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
