"""A ready-made ``on_progress`` callback for ``Job.wait``: stage + percent on a terminal or a log.

On a TTY it redraws one line with ``\\r`` (a bar that does not scroll the terminal away); anywhere else (CI logs,
files, pipes) it prints a plain line only when the status, stage or whole percent changes, because ``\\r`` and
redraws turn into noise there.
"""

from __future__ import annotations

import sys
from typing import TextIO

from app.client.resources import Job

BAR_WIDTH = 24


class ProgressPrinter:
    """Call with each Job state seen while waiting; call :meth:`close` when the wait ends."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._last: tuple[str, str, int] | None = None
        self._width = 0

    @staticmethod
    def describe(job: Job) -> tuple[str, str, int]:
        """(status, stage, whole percent): what a person needs to see change."""
        return job.status, job.stage or "-", round(job.progress * 100)

    def __call__(self, job: Job) -> None:
        state = self.describe(job)
        if not self.tty:
            if state != self._last:
                status, stage, percent = state
                print(f"{job.id} {status} {stage} {percent}%", file=self.stream, flush=True)
            self._last = state
            return
        status, stage, percent = state
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"{job.id}  {status:<9} {stage:<12} [{bar}] {percent:3d}%"
        pad = max(0, self._width - len(line))  # wipe what a longer previous line left behind
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)
        self._last = state

    def close(self) -> None:
        """End the redrawn line so whatever prints next starts on a fresh one."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
