"""What the CLI tells a person about a job's recipe and result: the resolved spec in one line, and a warning
naming what to try when pruning cost more accuracy than ``--warn-drop``.

Why: a job that keeps 34% of a 97% model is a success for the service (it did what the spec said) but rarely
what the person wanted; exiting 0 silently hides that. The warning is advice only (stderr, exit code
unchanged), and its suggestions follow from the spec that ran (``preset``, ``fine_tune``, ``scope``) so they
are the next things worth trying, not a generic list. Pure functions of JSON documents: no client, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_WARN_DROP = 0.05  # absolute points of accuracy (or R^2)
# Headline metrics where higher is better and an absolute drop means the same on every model (0..1 scale).
HIGHER_IS_BETTER = ("accuracy", "r2")


def spec_line(spec: dict[str, Any] | None) -> str:
    """The resolved spec as one compact, sorted JSON line, prefixed with its preset (``none`` if none)."""
    spec = spec or {}
    compact = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return f"spec (preset {spec.get('preset') or 'none'}): {compact}"


def headline_drop(metrics: dict[str, Any]) -> tuple[str, float, float] | None:
    """(metric name, baseline, pruned) of the first higher-is-better metric both sides measured."""
    before = (metrics.get("baseline") or {}).get("metrics") or {}
    after = (metrics.get("pruned") or {}).get("metrics") or {}
    for name in HIGHER_IS_BETTER:
        if isinstance(before.get(name), int | float) and isinstance(after.get(name), int | float):
            return name, float(before[name]), float(after[name])
    return None


def suggestions(job: dict[str, Any]) -> list[str]:
    """What to try next, most promising first, given the spec that ran and whether it had train data."""
    spec = job.get("spec") or {}
    tries: list[str] = []
    fine_tune = spec.get("fine_tune")
    recommended = spec.get("preset") == "recommended"
    if not fine_tune and job.get("train_dataset_id"):
        tries.append("--preset recommended (fine-tuning with distillation, global LAMP ranking)")
        recommended = True
    elif not fine_tune:
        tries.append("--train DATA.npz: with training data the recommended preset fine-tunes the model")
    else:
        epochs = int(fine_tune.get("epochs") or 1)
        tries.append(f'more fine-tuning: "fine_tune": {{"epochs": {max(2 * epochs, epochs + 1)}}} in --spec')
        if not recommended:
            tries.append("--preset recommended (the fields in --spec still override it)")
            recommended = True
    if not recommended and spec.get("scope") != "global":
        tries.append('"scope": "global", "normalization": "lamp" in --spec (spares the small layers)')
    target = spec.get("target_sparsity")
    if isinstance(target, int | float) and target > 0.15:
        tries.append(f"a lower sparsity, e.g. --sparsity {target - 0.1:.2f}")
    return tries


def drop_warning(job: dict[str, Any], metrics: dict[str, Any], threshold: float) -> str | None:
    """A one-paragraph warning when the headline metric fell by more than ``threshold``, else None."""
    headline = headline_drop(metrics)
    if headline is None:
        return None
    name, before, after = headline
    drop = before - after
    if drop <= threshold:
        return None
    return (
        f"warning: {name} dropped by {drop:.3f} ({before:.3f} -> {after:.3f}), more than --warn-drop "
        f"{threshold:g}; try: " + "; or ".join(suggestions(job))
    )
