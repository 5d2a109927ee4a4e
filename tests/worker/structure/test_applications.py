"""keras.applications ResNet50 and MobileNetV2 (random weights, 64x64): every bottleneck / inverted-residual
group found and compacted exactly. The benchmark measures their speed; this only checks correctness.

Both are marked ``slow`` (ResNet50 about a minute on 2 cores, mostly freezing its graph; MobileNetV2 ~25 s):
``make test`` leaves them out to stay under 10 minutes, ``make test-slow`` runs them. Every ``make test`` still
compacts a MobileNetV2 (alpha 0.35, 32x32) through the API and asserts it matches the masked model
(tests/bench/test_bench_smoke.py, compaction section), and ``make bench ONLY=compaction`` checks both models at
full size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from worker.models import load_model
from worker.structure import compact, find_groups, probe_inputs

pytestmark = [pytest.mark.tf]


@pytest.mark.parametrize(
    ("name", "prunable", "params_before"),
    [
        pytest.param("ResNet50", 37, 23_608_202, marks=pytest.mark.slow),
        pytest.param("MobileNetV2", 25, 2_270_794, marks=pytest.mark.slow),
    ],
)
def test_application_compacts(tmp_path: Path, name: str, prunable: int, params_before: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10)
    model.export(str(tmp_path / "model"), verbose=False)
    del model
    handle = load_model(tmp_path / "model")
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    groups = [g for g in analysis.groups if g.prunable]
    assert len(groups) == prunable
    left = [g for g in analysis.groups if not g.prunable]
    assert all("signature input" in g.reason or "signature output" in g.reason for g in left)
    keep = mask_groups(handle, analysis, fraction=0.5, carriers=True)
    inputs = probe_inputs(analysis.frozen["serving_default"], batch=2, seed=3)
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=inputs)
    assert result.params_before == params_before
    assert result.params_after < 0.3 * params_before  # ~half the channels on both sides of most kernels
    assert all(
        after == before // 2 + before % 2 or after == before for before, after in result.channels.values()
    )
    check_artifact(handle, result)
