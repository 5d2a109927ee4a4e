"""A copy of every variable of a loaded model in memory, to swap the dense weights back between trials.

Cheaper than a reload (a search or a sweep loads the model once per job) and exact: ``assign`` of the saved
arrays restores kernels, biases and, after training-mode fine-tuning, BatchNorm statistics too.
"""

from __future__ import annotations

import numpy as np

from worker.models import ModelHandle


class DenseCopy:
    """The handle's variables as they are at construction; ``restore()`` writes them back."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.values: dict[str, np.ndarray] = {nv.name: nv.var.numpy().copy() for nv in handle.variables()}

    def restore(self) -> None:
        for nv in self.handle.variables():
            nv.var.assign(self.values[nv.name])
