"""Shared checks for the structure tests: mask groups the way the pruner does, compact, compare, reload."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[3]

# A separate process that imports TensorFlow once and reloads artifacts on request, one path per stdin line, one
# JSON line back: each artifact is still loaded by a process that did not build it (nothing of the test's own
# graphs or function library can help), without paying TensorFlow's import per test.
RELOADER = r"""
import json, os, sys
from pathlib import Path
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
sys.path.insert(0, sys.argv[1])
from worker.models import load_model
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        obj = tf.saved_model.load(path)
        sigs = {}
        for name, fn in obj.signatures.items():
            _, kw = fn.structured_input_signature
            sigs[name] = {
                "inputs": {k: [s.dtype.name, s.shape.as_list()] for k, s in kw.items()},
                "outputs": sorted(fn.structured_outputs),
            }
        shapes = {nv.name: nv.shape for nv in load_model(Path(path)).variables()}
        answer = {"signatures": sigs, "shapes": shapes}
    except Exception as exc:  # reported to the test, which fails with it
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer), flush=True)
"""
_reloader: subprocess.Popen[str] | None = None


def _close_reloader() -> None:
    if _reloader is not None and _reloader.poll() is None:
        _reloader.kill()
        _reloader.wait()


def reload_in_subprocess(path: Path) -> dict[str, Any]:
    """Signatures and variable shapes of the SavedModel at ``path`` as another process loads it."""
    global _reloader
    if _reloader is None or _reloader.poll() is not None:
        _reloader = subprocess.Popen(
            [sys.executable, "-c", RELOADER, str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        atexit.register(_close_reloader)
    assert _reloader.stdin is not None and _reloader.stdout is not None
    _reloader.stdin.write(f"{path}\n")
    _reloader.stdin.flush()
    line = _reloader.stdout.readline()
    assert line, f"the reloader process died ({_reloader.poll()})"
    answer: dict[str, Any] = json.loads(line)
    assert "error" not in answer, answer["error"]
    return answer


def randomize(handle: Any, seed: int = 0) -> None:
    """Non-zero biases, BatchNorm shifts and statistics, so removed channels leave real constants behind."""
    rng = np.random.default_rng(seed)
    for nv in handle.variables():
        value = nv.var.numpy()
        if not np.issubdtype(value.dtype, np.floating):
            continue
        noise = rng.standard_normal(value.shape).astype(value.dtype)
        if "variance" in nv.name:
            nv.var.assign(np.abs(noise) + 0.5)
        elif value.ndim <= 1:
            nv.var.assign(noise * 0.3 + (1.0 if "gamma" in nv.name else 0.0))
        else:
            nv.var.assign(noise * np.sqrt(2.0 / max(1, int(np.prod(value.shape[:-1])))))


def mask_groups(
    handle: Any,
    analysis: Any,
    fraction: float = 0.5,
    carriers: bool = True,
    only: set[str] | None = None,
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Zero ``fraction`` of the channels of every prunable group: producers always, carriers (bias,
    BatchNorm) when ``carriers``. Returns the keep vectors."""
    from worker.structure import group_masks

    rng = np.random.default_rng(seed)
    keep: dict[str, np.ndarray] = {}
    for group in analysis.groups:
        if not group.prunable or (only is not None and group.id not in only):
            continue
        k = np.ones(group.channels, dtype=bool)
        k[rng.choice(group.channels, size=int(group.channels * fraction), replace=False)] = False
        keep[group.id] = k
    variables = {nv.name: nv.var for nv in handle.variables()}
    for name, mask in group_masks(handle, analysis, keep, carriers=carriers).items():
        variables[name].assign(variables[name].numpy() * mask)
    return keep


def check_artifact(handle: Any, result: Any, tol: float = 1e-5) -> dict[str, Any]:
    """Equivalence recorded by compact, then a fresh process: same signatures, the smaller shapes."""
    assert result.max_abs_diff, "compact did not verify"
    for key, diff in result.max_abs_diff.items():
        assert diff <= tol, (key, diff)
    reloaded = reload_in_subprocess(result.out_dir)
    for name, info in handle.signatures.items():
        got = reloaded["signatures"][name]
        assert set(got["inputs"]) == set(info.inputs), name
        for key, spec in info.inputs.items():
            assert got["inputs"][key] == [spec["dtype"], spec["shape"]], (name, key)
        assert got["outputs"] == sorted(info.outputs), name
    assert set(reloaded["signatures"]) == set(handle.signatures)
    shapes = reloaded["shapes"]
    for var, (_, after) in result.shapes.items():
        assert shapes.get(var) == after, (var, shapes.get(var), after)
    return reloaded
