"""The pruner's calibration hooks: statistics per variable, Wanda's per-output comparison in layer scope only,
SparseGPT's keep-mask taken as the pruner's mask, magnitude (and ``method``) where statistics are missing."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from worker.pruning.calibration.sparsegpt import ObsResult  # noqa: E402
from worker.pruning.calibration.wanda import InputNorms  # noqa: E402
from worker.pruning.criteria import get_criterion  # noqa: E402
from worker.pruning.granularity import NM  # noqa: E402
from worker.pruning.pruner import Pruner  # noqa: E402


def _variables(seed: int = 0) -> dict[str, tf.Variable]:
    rng = np.random.default_rng(seed)
    return {
        "a/kernel": tf.Variable(rng.normal(size=(16, 6)).astype("float32")),
        "b/kernel": tf.Variable(rng.normal(size=(8, 4)).astype("float32")),
    }


def _norms(shape: tuple[int, int], seed: int) -> InputNorms:
    rng = np.random.default_rng(seed)
    return InputNorms(rng.uniform(0.1, 10.0, size=(shape[0], 1)).astype("float32"), (0,), 100)


def test_wanda_compares_within_outputs_in_layer_scope_and_pools_in_global() -> None:
    variables = _variables()
    stats = {name: _norms(tuple(v.shape), i) for i, (name, v) in enumerate(variables.items())}
    layer = Pruner(variables, dict.fromkeys(variables, 0.5), "layer", get_criterion("wanda"))
    layer.prune(1.0, calibration=stats)
    for name, mask in layer.masks.items():
        assert (mask.sum(axis=0) == mask.shape[0] // 2).all(), name  # every output keeps half its inputs
    assert layer.methods == dict.fromkeys(variables, "wanda")
    assert {r.name: r.to_dict()["method"] for r in layer.report()} == dict.fromkeys(variables, "wanda")

    pooled = _variables()
    global_ = Pruner(pooled, dict.fromkeys(pooled, 0.5), "global", get_criterion("wanda"))
    global_.prune(1.0, calibration={"a/kernel": stats["a/kernel"]})  # b/kernel: no statistics
    assert global_.methods == {"a/kernel": "wanda", "b/kernel": "magnitude"}
    total = sum(m.size for m in global_.masks.values())
    assert sum(int((~m).sum()) for m in global_.masks.values()) == round(0.5 * total)


def test_sparsegpt_keep_masks_become_the_pruner_masks() -> None:
    variables = _variables(1)
    rng = np.random.default_rng(2)
    results = {}
    for name, var in variables.items():
        keep = NM(2, 4).mask(rng.random(var.shape), "dense", 0.5)
        updated = np.where(keep, var.numpy() * 1.5, 0.0).astype("float32")
        var.assign(updated)  # the stage writes SparseGPT's updated weights before the pruner runs
        results[name] = ObsResult(updated, keep, 0.0, 0.01)
    pruner = Pruner(
        variables, dict.fromkeys(variables, 0.5), "layer", get_criterion("sparsegpt"), granularity=NM(2, 4)
    )
    pruner.prune(1.0, calibration=results)
    for name, var in variables.items():
        np.testing.assert_array_equal(pruner.masks[name], results[name].keep)
        np.testing.assert_array_equal(var.numpy(), results[name].weight)
