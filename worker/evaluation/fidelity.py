"""How faithfully the pruned model reproduces the original's predictions -- no labels needed.

Quality metrics need labels; a user pruning a model often has inputs only. Fidelity compares the two models'
outputs on the same inputs, so a dataset with only ``x`` still tells how much pruning changed the model:

- ``top1_agreement``: fraction of predictions whose class is the same (argmax of a multi-unit output; ``p > 0.5``
  of a single sigmoid unit). Classification only.
- ``mean_abs_output_diff`` / ``max_abs_output_diff``: mean and largest absolute difference of the raw outputs,
  element-wise (logits stay logits, probabilities stay probabilities: the numbers the model serves).
- ``kl_divergence``: mean over predictions of KL(baseline || pruned) between the class distributions (after
  softmax/sigmoid when the outputs are logits), in nats. Classification only.

Agreement and output differences are computed with NumPy as scikit-learn's ``accuracy_score``,
``mean_absolute_error`` and ``max_error`` compute them (their input checks cost more than the numbers on a
5,000-sample evaluation); the KL divergence by ``scipy.stats.entropy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import entropy
from sklearn.utils import assert_all_finite

from worker.evaluation.metrics import (
    Task,
    TaskChoice,
    class_probabilities,
    json_safe,
    looks_like_probabilities,
)

__all__ = ["KL_EPSILON", "fidelity", "fidelity_by_output", "infer_output_task"]

# Probabilities are clipped to at least this before the KL divergence (Keras' epsilon): a float32 softmax can
# underflow to exactly 0, which would make KL infinite for a difference nobody could observe.
KL_EPSILON = 1e-7


def infer_output_task(output: np.ndarray) -> Task:
    """Best guess of the task from outputs alone, for when there are no labels to infer it from.

    Classification when the output is multi-unit (class scores or probabilities) or a single unit whose values
    all lie in [0, 1] (a sigmoid); regression otherwise. A multi-unit regression output would be taken for
    classification -- pass the task explicitly (from the labels or the spec) whenever it is known.
    """
    out = np.asarray(output)
    if out.ndim >= 2 and out.shape[-1] > 1:
        return "classification"
    return "classification" if looks_like_probabilities(out, rows_sum_to_one=False) else "regression"


def _infer_logits(output: np.ndarray) -> bool:
    """Logits unless the output already looks like probabilities (the rule ``infer_from_logits`` applies)."""
    return not looks_like_probabilities(output, rows_sum_to_one=np.asarray(output).ndim >= 2)


def fidelity(
    baseline: np.ndarray,
    pruned: np.ndarray,
    task: TaskChoice = "auto",
    from_logits: bool | None = None,
) -> dict[str, Any]:
    """Agreement of ``pruned`` with ``baseline`` outputs of one model output on the same inputs.

    ``task="auto"`` uses ``infer_output_task`` on the baseline output; ``from_logits=None`` guesses from the
    baseline output (probabilities if in [0, 1] with multi-unit rows summing to 1). Regression outputs get the
    output differences only. Returns ``n_predictions`` too, since the numbers mean little on a handful.
    """
    base = np.asarray(baseline, dtype=np.float64)
    after = np.asarray(pruned, dtype=np.float64)
    if base.shape != after.shape:
        raise ValueError(f"baseline outputs {base.shape} and pruned outputs {after.shape} differ in shape")
    if base.ndim == 0 or base.shape[0] == 0:
        raise ValueError("need at least one prediction to compare")
    chosen: Task = infer_output_task(base) if task == "auto" else task
    assert_all_finite(base)  # scikit-learn's metrics refused NaN/inf outputs with this ValueError: still so
    assert_all_finite(after)
    n = base.shape[0]
    diff = np.abs(base.reshape(n, -1) - after.reshape(n, -1))
    result: dict[str, Any] = {
        "task": chosen,
        "n_predictions": int(n),
        "mean_abs_output_diff": float(np.mean(np.mean(diff, axis=0))),  # per column, then uniform
        "max_abs_output_diff": float(np.max(diff)),
    }
    if chosen == "classification":
        logits = _infer_logits(base) if from_logits is None else from_logits
        p, q = class_probabilities(base, logits), class_probabilities(after, logits)
        if base.ndim >= 2 and base.shape[-1] > 1:
            same = np.argmax(p, axis=1) == np.argmax(q, axis=1)
        else:  # predicted_classes' rule for a single sigmoid unit
            same = (p[:, 1] > 0.5) == (q[:, 1] > 0.5)
        result["top1_agreement"] = float(np.mean(same))
        p, q = np.clip(p, KL_EPSILON, 1.0), np.clip(q, KL_EPSILON, 1.0)
        result["kl_divergence"] = float(np.mean(entropy(p, q, axis=1)))  # entropy() renormalises rows
    return json_safe(result)


def fidelity_by_output(
    baseline: Mapping[str, np.ndarray],
    pruned: Mapping[str, np.ndarray],
    tasks: Mapping[str, TaskChoice] | None = None,
    from_logits: Mapping[str, bool | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{output name: fidelity(...)}`` for every output both models produced.

    ``tasks``/``from_logits`` per output name (e.g. the ``task`` that ``evaluate_outputs`` reported where
    labels existed); missing names fall back to ``"auto"``/``None``.
    """
    tasks = tasks or {}
    from_logits = from_logits or {}
    missing = sorted(set(baseline) ^ set(pruned))
    if missing:
        raise ValueError(f"outputs {missing} are not produced by both models")
    return {
        name: fidelity(baseline[name], pruned[name], tasks.get(name, "auto"), from_logits.get(name))
        for name in sorted(baseline)
    }
