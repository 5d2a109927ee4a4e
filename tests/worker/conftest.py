"""Session-scoped tiny models (built once, a few seconds each) and the digits datasets for worker tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import model_factory as mf

# The four kinds of upload; "keras_file" is the .keras file after conversion to a SavedModel.
MODEL_KINDS = ("keras2", "keras3_export", "tf_module", "keras_file")
# Input name and label-carrying output of each kind's serving_default signature.
INPUT_NAME = {
    "keras2": "image",
    "keras3_export": "image",
    "tf_module": mf.MODULE_INPUT,
    "keras_file": "image",
}
FLAT_INPUT = {"keras2": False, "keras3_export": False, "tf_module": True, "keras_file": False}


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def keras2_dir(models_root: Path) -> Path:
    return mf.build_keras2_saved_model(models_root / "keras2")


@pytest.fixture(scope="session")
def keras3_export_dir(models_root: Path) -> Path:
    return mf.build_keras3_export(models_root / "keras3_export")


@pytest.fixture(scope="session")
def tf_module_dir(models_root: Path) -> Path:
    return mf.build_tf_module(models_root / "tf_module")


@pytest.fixture(scope="session")
def keras_file(models_root: Path) -> Path:
    return mf.build_keras3_file(models_root / "digits.keras")


@pytest.fixture(scope="session")
def keras_file_dir(keras_file: Path, models_root: Path) -> Path:
    from worker.models import keras_to_saved_model

    return keras_to_saved_model(keras_file, models_root / "keras_file")


@pytest.fixture(scope="session")
def lambda_keras_file(models_root: Path) -> Path:
    return mf.build_keras_lambda_file(models_root / "lambda.keras")


@pytest.fixture(scope="session")
def file_reading_dir(models_root: Path) -> Path:
    secret = models_root / "secret.txt"
    secret.write_text("not for models")
    return mf.build_file_reading_module(models_root / "file_reading", secret)


@pytest.fixture(scope="session", params=MODEL_KINDS)
def model_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def model_dir(model_kind: str, request: pytest.FixtureRequest) -> Path:
    """The SavedModel directory of ``model_kind`` (fixtures above are built on first use only)."""
    return Path(request.getfixturevalue(f"{model_kind}_dir"))


@pytest.fixture(scope="session")
def digits_cnn() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return mf.digits_datasets()


@pytest.fixture(scope="session")
def digits_flat() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return mf.digits_datasets(flat=True)


@pytest.fixture(scope="session")
def digits_for(
    digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    digits_flat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(train, test) shaped for each model kind's input."""
    return {kind: digits_flat if FLAT_INPUT[kind] else digits_cnn for kind in MODEL_KINDS}
