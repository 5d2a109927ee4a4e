"""LAMP and per-layer normalisation by hand, and global group ranking (scope.select_groups) with sizes."""

from __future__ import annotations

import numpy as np
import pytest

from worker.pruning.normalization import get_normalization, lamp, mean_normalize
from worker.pruning.scope import global_masks, select_groups

T, F = True, False

# A 3-layer toy. LAMP by hand (squares sorted ascending, each divided by the sum of squares >= it):
#   a = [1, 2, 3]        squares 1, 4, 9            -> 1/14, 4/13, 9/9
#   b = [.5, -1, .5, 2]  squares .25, 1, .25, 4     -> ties share the sum over values >= .25: .25/5.5 = 1/22,
#                                                      1/(1+4) = 1/5, 1/22, 4/4
#   c = [10, 30]         squares 100, 900           -> 100/1000, 1
TOY = {
    "a": np.array([1.0, 2.0, 3.0]),
    "b": np.array([0.5, -1.0, 0.5, 2.0]),
    "c": np.array([10.0, 30.0]),
}
TOY_LAMP = {
    "a": [1 / 14, 4 / 13, 1.0],
    "b": [1 / 22, 1 / 5, 1 / 22, 1.0],
    "c": [0.1, 1.0],
}


def test_lamp_scores_on_a_three_layer_toy_by_hand() -> None:
    for name, weights in TOY.items():
        np.testing.assert_allclose(lamp(np.abs(weights)), TOY_LAMP[name], rtol=1e-12)


def test_global_ranking_on_lamp_scores_by_hand() -> None:
    scores = {name: lamp(np.abs(w)) for name, w in TOY.items()}
    # 9 weights at 0.5: round(4.5) = 4 go. Each layer's best (LAMP 1) is protected; the 4 lowest of the
    # rest are b's two 1/22, a's 1/14 and c's 0.1.
    masks = global_masks(scores, 0.5)
    np.testing.assert_array_equal(masks["a"], [F, T, T])
    np.testing.assert_array_equal(masks["b"], [F, T, F, T])
    np.testing.assert_array_equal(masks["c"], [F, T])
    # The same target on raw magnitudes takes b's 0.5, 0.5 and 1 and a's 1 (ties: first name): none of c.
    raw = global_masks({n: np.abs(w) for n, w in TOY.items()}, 0.5)
    np.testing.assert_array_equal(raw["a"], [F, T, T])
    np.testing.assert_array_equal(raw["b"], [F, F, F, T])
    np.testing.assert_array_equal(raw["c"], [T, T])


def test_global_magnitude_collapses_a_small_layer_and_lamp_does_not() -> None:
    rng = np.random.default_rng(0)
    weights = {
        "big1": rng.normal(scale=1.0, size=200),
        "big2": rng.normal(scale=2.0, size=200),
        "small": rng.normal(scale=0.01, size=20),  # e.g. a first layer with small weights
    }
    magnitude = {n: np.abs(w) for n, w in weights.items()}
    plain = global_masks(magnitude, 0.5)
    lamped = global_masks({n: lamp(s) for n, s in magnitude.items()}, 0.5)
    sparsity = {n: 1 - m.mean() for n, m in plain.items()}
    lamp_sparsity = {n: 1 - m.mean() for n, m in lamped.items()}
    assert sparsity["small"] == pytest.approx(19 / 20)  # all but the guard's last weight
    assert lamp_sparsity["small"] < 0.75
    for masks in (plain, lamped):  # the same number of weights goes in both
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * 420)


def test_lamp_is_monotone_within_a_layer_and_keeps_pruned_entries_lowest() -> None:
    rng = np.random.default_rng(3)
    scores = np.abs(rng.normal(size=50))
    np.testing.assert_array_equal(np.argsort(lamp(scores), kind="stable"), np.argsort(scores, kind="stable"))
    assert lamp(scores).max() == 1.0
    pruned = np.array([-np.inf, 1.0, 2.0, np.nan])
    np.testing.assert_allclose(lamp(pruned), [-np.inf, 1 / 5, 1.0, -np.inf])  # -inf/NaN do not count
    np.testing.assert_array_equal(lamp(np.zeros(3)), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(lamp(np.array([1.0, np.inf])), [0.0, 1.0])
    assert lamp(np.full((2, 2), -np.inf)).shape == (2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        lamp(np.array([1.0, -1.0]))


def test_none_normalisation_is_raw_for_elements_and_per_layer_mean_for_groups() -> None:
    none = get_normalization("none")
    scores = np.array([1.0, 3.0, -np.inf])
    np.testing.assert_array_equal(none(scores, None), scores)
    np.testing.assert_array_equal(none(scores, np.ones(3, np.int64)), scores)
    np.testing.assert_array_equal(none(scores, np.array([9, 9, 9])), [0.5, 1.5, -np.inf])  # mean of live = 2
    np.testing.assert_array_equal(mean_normalize(np.zeros(2)), [0.0, 0.0])
    np.testing.assert_allclose(get_normalization("lamp")(np.array([1.0, 2.0]), None), [0.2, 1.0])
    with pytest.raises(ValueError, match="lamp"):
        get_normalization("l2norm")


# ---------------------------------------------------------------- group ranking


def test_select_groups_counts_weights_and_protects_each_variables_best_group() -> None:
    # Layer x: 3 channels of 27 weights; layer y: 4 channels of 288 weights (normalised scores).
    scores = {"x": np.array([0.2, 1.0, 1.8]), "y": np.array([0.5, 0.9, 1.1, 1.5])}
    sizes = {"x": np.full(3, 27), "y": np.full(4, 288)}
    total = 3 * 27 + 4 * 288  # 1233
    keep = select_groups(scores, 0.5, sizes)  # wanted 616: x0 (27) + y0 (315) + y1 (603) is nearest
    np.testing.assert_array_equal(keep["x"], [F, T, T])
    np.testing.assert_array_equal(keep["y"], [F, F, T, T])
    assert round(0.5 * total) == 616
    keep = select_groups(scores, 0.95, sizes)  # everything but each layer's best group
    np.testing.assert_array_equal(keep["x"], [F, F, T])
    np.testing.assert_array_equal(keep["y"], [F, F, F, T])
    keep = select_groups(scores, 1.0, sizes)
    assert not keep["x"].any() and not keep["y"].any()
    with pytest.raises(ValueError, match="positive"):
        select_groups(scores, 0.5, {"x": np.zeros(3), "y": np.ones(4)})


def test_select_groups_ties_fewer_and_unit_sizes_match_elements() -> None:
    keep = select_groups({"v": np.array([1.0, 2.0, 3.0, 4.0])}, 0.5, {"v": np.array([4, 4, 4, 4])})
    np.testing.assert_array_equal(keep["v"], [F, F, T, T])
    # wanted 6 of 12 with groups of 4: 4 and 8 are equally near, fewer wins.
    keep = select_groups({"v": np.array([1.0, 2.0, 3.0])}, 0.5, {"v": np.array([4, 4, 4])})
    np.testing.assert_array_equal(keep["v"], [F, T, T])
    rng = np.random.default_rng(2)
    scores = {"p": rng.normal(size=30), "q": rng.normal(size=17)}
    ones = {n: np.ones(s.size, np.int64) for n, s in scores.items()}
    for target in (0.1, 0.5, 0.93):
        unit, sized = select_groups(scores, target), select_groups(scores, target, ones)
        for n in scores:
            np.testing.assert_array_equal(unit[n], sized[n])


@pytest.mark.parametrize("seed", range(40))
def test_fast_unit_path_selects_exactly_what_the_general_path_selects(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-element groups take a threshold shortcut (scope._unit_keep); with it switched off the general
    index-list path must give the same masks: ties, NaN, -inf (pruned before), several variables, protection."""
    from worker.pruning import scope

    rng = np.random.default_rng(seed)
    scores = {}
    for i in range(int(rng.integers(1, 4))):
        size = int(rng.integers(0, 40))
        values = rng.integers(0, 6, size).astype(np.float32)  # few distinct values: many ties
        values[rng.random(size) < 0.1] = np.nan
        values[rng.random(size) < 0.1] = -np.inf
        if seed % 4 == 0:  # +inf scores can tie with protected entries: the shortcut must step aside
            values[rng.random(size) < 0.3] = np.inf
        scores[f"v{i}"] = values
    target = float(rng.choice([0.0, 0.3, 0.5, 0.8, 0.95, 0.999]))
    fast = select_groups(scores, target)
    monkeypatch.setattr(scope, "_unit_keep", lambda *_: None)
    general = select_groups(scores, target)
    assert fast.keys() == general.keys()
    for name in scores:
        np.testing.assert_array_equal(fast[name], general[name])
