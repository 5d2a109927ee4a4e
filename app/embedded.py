"""The embedded default: no broker configured -> the API process supervises one worker child process.

Both share SQLite, kombu's filesystem transport and the data directory. The child is a normal
`celery worker` (same task code as production); the API process itself never imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from app.config import Settings
from app.db import jobs, trials
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import ModelRecord
from app.queue import QUEUES, RUN_JOB, VALIDATE_MODEL, make_celery, send

log = logging.getLogger("secateurs.embedded")


def worker_command(concurrency: int = 1, loglevel: str = "INFO", hostname: str = "secateurs@%h") -> list[str]:
    """`celery worker` on the solo pool: TensorFlow is not fork-safe, so scale with processes, not forks."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_worker",
        "worker",
        "--pool",
        "solo" if concurrency == 1 else "threads",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "-Q",
        ",".join(QUEUES),  # jobs and validations, and trials (app.queue.TRIALS_QUEUE)
        "--hostname",
        hostname,
        "--without-gossip",
        "--without-mingle",
    ]


def settings_env(settings: Settings) -> dict[str, str]:
    """The child reads the same Settings from its environment."""
    env = dict(os.environ)
    env["SECATEURS_DATA_DIR"] = str(settings.data_dir)
    env["SECATEURS_DATABASE_URL"] = settings.db_url
    if settings.broker_url:
        env["SECATEURS_BROKER_URL"] = settings.broker_url
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def recover(settings: Settings) -> tuple[int, int]:
    """Nothing runs before the worker starts, so 'running' records are orphans of the last stop: re-queue or
    fail them, then re-send every queued job and every model still 'validating' (claims make duplicates
    harmless). Returns (jobs re-sent, models re-sent)."""
    engine = make_engine(settings.db_url)
    init_db(engine)
    celery = make_celery(settings)
    try:
        with session_scope(make_session_factory(engine)) as session:
            trials.requeue_running(session)  # their jobs run again below and send them again
            job_ids = jobs.recover_interrupted(session, max_attempts=settings.max_attempts)
            model_ids = [m.id for m in session.query(ModelRecord).filter(ModelRecord.status == "validating")]
        for job_id in job_ids:
            send(celery, RUN_JOB, job_id)
        for model_id in model_ids:
            send(celery, VALIDATE_MODEL, model_id)
    finally:
        engine.dispose()
    return len(job_ids), len(model_ids)


class EmbeddedWorker:
    """Starts a worker child and restarts it whenever it exits: a crash, a kill for memory, the hard time limit
    or the memory recycling after a task (worker/celery_worker.py). Used by `secateurs serve` (embedded) and
    `secateurs worker` (production), so both get the same recovery."""

    def __init__(
        self,
        settings: Settings,
        loglevel: str = "INFO",
        concurrency: int = 1,
        hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.loglevel = loglevel
        self.concurrency = concurrency
        # Unique per supervisor process (its pid), so two workers on one host have distinct names: the
        # trials in a job body say which worker ran them.
        self.hostname = hostname or f"embedded-{os.getpid()}@%h"
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._spawned_at = 0.0
        self.restarts = 0

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="embedded-worker-watch", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        command = worker_command(self.concurrency, loglevel=self.loglevel, hostname=self.hostname)
        self.process = subprocess.Popen(command, env=settings_env(self.settings))
        self._spawned_at = time.monotonic()
        log.info("worker started (pid %s)", self.process.pid)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.wait(0.5):
            if self.process is not None and self.process.poll() is not None and not self._stopping.is_set():
                if time.monotonic() - self._spawned_at > 60 or self.process.returncode == 0:
                    # it ran a while, or it exited cleanly (the memory recycle after a task: a warm shutdown
                    # exits 0): not a crash loop, so short tasks do not push the restart delay up to 60 s
                    backoff = 1.0
                log.warning("worker exited with %s; restarting in %.0f s", self.process.returncode, backoff)
                if self._stopping.wait(backoff):
                    return
                self.restarts += 1
                self._spawn()
                backoff = min(backoff * 2, 60.0)

    def wait(self) -> None:
        """Block until stop() (the `secateurs worker` foreground)."""
        while not self._stopping.wait(1.0):
            pass

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # Celery's warm shutdown; an unfinished job is re-queued by the reaper/start
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
