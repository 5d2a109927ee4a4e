"""Unique, meaningful names for the variables of a restored SavedModel.

Users address variables with regexes (``include``, ``exclude``, ``layer_sparsity``) and read them back in the
metrics' ``layers``, so names must be stable across save/reload and mean something. Keras 2 and Keras 3 (3.15)
give hierarchical ``tf.Variable`` names (``conv2d/kernel``, ``model/dense_1/bias``); a plain ``tf.Module``
gives whatever its author passed (often ``Variable`` for all of them). Rule, applied deterministically:

1. the ``tf.Variable`` name without the ``:0`` suffix;
2. names shared by several variables are replaced by the variable's path in the object graph (attribute names
   from the root, e.g. ``encoder/dense/w``), preferring paths that avoid flat collections (``variables``);
3. anything still clashing (no path, or a path equal to another name) gets ``_1``, ``_2``, ... in order.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from typing import Any

import tensorflow as tf

# Children that list variables flatly (``variables/3``): valid paths, but they say nothing about the layer.
_COLLECTIONS = frozenset(
    {
        "variables",
        "trainable_variables",
        "non_trainable_variables",
        "_all_variables",
        "keras_api",
        "regularization_losses",
        "signatures",
        "optimizer",
    }
)
_SUFFIX = re.compile(r":\d+$")


def base_name(var: tf.Variable) -> str:
    """``v.name`` without the output index."""
    return _SUFFIX.sub("", var.name)


def object_paths(root: Any) -> dict[int, str]:
    """``id(variable)`` -> shortest attribute path from ``root``; paths avoiding collections win."""
    paths: dict[int, str] = {}
    for allow_collections in (False, True):
        seen: set[int] = {id(root)}
        queue: deque[tuple[Any, str]] = deque([(root, "")])
        while queue:
            node, prefix = queue.popleft()
            try:
                children = tf.train.TrackableView(node).children(node)
            except Exception:  # exotic trackables without children: leaves
                continue
            for name in sorted(children):
                child = children[name]
                if not allow_collections and name in _COLLECTIONS:
                    continue
                if id(child) in seen:
                    continue
                seen.add(id(child))
                path = f"{prefix}/{name}" if prefix else name
                if isinstance(child, tf.Variable):
                    paths.setdefault(id(child), path)
                else:
                    queue.append((child, path))
    return paths


def unique_names(variables: list[tf.Variable], root: Any) -> list[str]:
    """One name per variable, in the same order, following the module rule."""
    names = [base_name(v) for v in variables]
    counts = Counter(names)
    if any(c > 1 for c in counts.values()):
        paths = object_paths(root)
        names = [
            paths.get(id(v), name) if counts[name] > 1 else name
            for v, name in zip(variables, names, strict=True)
        ]
    taken: set[str] = set()
    result: list[str] = []
    totals = Counter(names)
    for name in names:
        candidate = name
        if totals[name] > 1 or candidate in taken:
            i = 1
            candidate = f"{name}_{i}"
            while candidate in taken or candidate in totals:
                i += 1
                candidate = f"{name}_{i}"
        taken.add(candidate)
        result.append(candidate)
    return result
