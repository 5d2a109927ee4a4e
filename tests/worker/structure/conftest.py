"""Tiny real graphs (built once per session) for the structure tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.structure import builders


@pytest.fixture(scope="session")
def structure_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("structure")


@pytest.fixture(scope="session")
def mlp_dir(structure_root: Path) -> Path:
    return builders.keras3_mlp(structure_root / "mlp")


@pytest.fixture(scope="session")
def resnet_dir(structure_root: Path) -> Path:
    return builders.keras3_resnet(structure_root / "resnet")
