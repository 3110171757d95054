"""The web app's job queue, kept in SQLite (`<workspace>/conjure.db`): one `Job` record per run the user
queued, its status and what the runner last read from the run (step, loss, ETA), and the state changes the API
asks for (submit, resume). The runner (conjure.ui.runner) launches and follows the runs and records how they
end; both go through `JobStore`, which one lock makes thread-safe (API threads and the runner thread share one
SQLite connection, in WAL mode so that other processes can read while it writes).

A job's files live in `<workspace>/jobs/<id>/`: `config.yaml` as launched and `log.txt`, the run's output.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conjure.errors import ConjureError
from conjure.runs.checkpoints import list_checkpoints
from conjure.ui.workspace import NotFound, Workspace

STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
RESUMABLE = ("cancelled", "interrupted", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    status TEXT NOT NULL,
    type TEXT NOT NULL,
    config TEXT NOT NULL,            -- the validated config as YAML (output_dir absolute, run_name set)
    run_name TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    run_dir TEXT,                    -- set when the job first starts
    created TEXT NOT NULL,
    queued TEXT NOT NULL,            -- FIFO order (a resumed job queues again at the end)
    started TEXT,
    ended TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER,
    loss REAL,
    eta_seconds REAL,
    error TEXT,
    resume INTEGER NOT NULL DEFAULT 0,         -- the next launch continues run_dir
    pid INTEGER,
    stopping INTEGER NOT NULL DEFAULT 0,       -- the user cancelled while it ran: SIGTERM sent
    events_offset INTEGER NOT NULL DEFAULT 0,  -- where this launch's lines begin in events.jsonl (bytes)
    processes INTEGER NOT NULL DEFAULT 1       -- train --num-processes (a job's, not the config's)
)
"""
# Columns added since the first workspaces: (name, definition), added to an older jobs table when it opens.
_ADDED = (("processes", "INTEGER NOT NULL DEFAULT 1"),)


class NoSuchJob(NotFound):
    """No job with that id (the API answers 404)."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def checkpoint_steps(run_dir: Path | str | None) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first ([] without a run folder)."""
    return list_checkpoints(Path(run_dir)) if run_dir else []


@dataclass
class Job:
    id: int
    status: str
    type: str
    run_name: str
    output_dir: str
    run_dir: str | None
    created: str
    queued: str
    started: str | None
    ended: str | None
    step: int
    max_steps: int | None
    loss: float | None
    eta_seconds: float | None
    error: str | None
    resume: bool
    pid: int | None
    stopping: bool
    events_offset: int
    processes: int
    config: str = field(repr=False)

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE and bool(checkpoint_steps(self.run_dir))

    @property
    def dir_name(self) -> str:
        return str(self.id)

    def public(self) -> dict[str, Any]:
        """The Job record of docs/ui.md."""
        return {
            "id": self.id, "status": self.status, "type": self.type, "run_name": self.run_name,
            "run_dir": self.run_dir, "created": self.created, "started": self.started, "ended": self.ended,
            "step": self.step, "max_steps": self.max_steps, "loss": self.loss, "eta_seconds": self.eta_seconds,
            "error": self.error, "resumable": self.resumable, "stopping": self.stopping,
            "processes": self.processes,
        }


class JobStore:
    """The jobs of one workspace: their records, the rules for queueing them, and their files' places.
    `changed` is set whenever a job is queued (the runner wakes on it)."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.changed = threading.Event()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(workspace.db_path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def _row(self, job_id: int) -> Job:
        if not 0 < job_id < 2**63:  # SQLite's integers are 64-bit: a larger id is no job, not an OverflowError
            raise NoSuchJob(f"no job {job_id}")
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NoSuchJob(f"no job {job_id}")
        return _job(row)

    def get(self, job_id: int) -> Job:
        return self._row(job_id)

    def all_jobs(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id DESC").fetchall()
        return [_job(row) for row in rows]

    def _update(self, job_id: int, **values: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def submit(self, config: Any, processes: int = 1) -> Job:
        """Queue a validated config (conjure.config model) whose basic.output_dir is absolute, to train in
        `processes` processes. Its run name defaults to `<type>-<id>`, so the run folder is known before it
        starts."""
        from conjure.config import dump_config

        config = config.model_copy(deep=True)
        stamp = now_iso()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (status, type, config, run_name, output_dir, created, queued, max_steps, processes) "
                "VALUES ('queued', ?, '', '', ?, ?, ?, ?, ?)",
                (config.type, config.basic.output_dir, stamp, stamp, config.basic.max_train_steps, processes),
            )
            job_id = int(cur.lastrowid)
            config.basic.run_name = config.basic.run_name or f"{config.type}-{job_id}"
            self._update(job_id, config=dump_config(config), run_name=config.basic.run_name)
        self.changed.set()
        return self._row(job_id)

    def next_queued(self) -> Job | None:
        """The job that waited longest (a resumed job queues again at the end)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY queued, id LIMIT 1").fetchone()
        return None if row is None else _job(row)

    def with_status(self, status: str) -> list[Job]:
        """The jobs of one status, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (status,)).fetchall()
        return [_job(row) for row in rows]

    def count(self, *statuses: str) -> int:
        """How many jobs have one of `statuses`."""
        marks = ", ".join("?" for _ in statuses)
        with self._lock:
            return int(self._db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0])

    def resume(self, job_id: int) -> Job:
        """Queue a cancelled, interrupted or failed job again, to continue its run folder from its newest
        checkpoint."""
        with self._lock:
            job = self._row(job_id)
            if job.status not in RESUMABLE:
                raise ConjureError(f"job {job_id} is {job.status}; only a cancelled, interrupted or failed job resumes")
            if not checkpoint_steps(job.run_dir):
                raise ConjureError(f"job {job_id} has no checkpoint to continue from; start it again as a new job")
            self._update(job_id, status="queued", queued=now_iso(), ended=None, error=None, eta_seconds=None,
                         resume=1, stopping=0, pid=None)
        self.changed.set()
        return self._row(job_id)

    def job_dir(self, job: Job) -> Path:
        return self.ws.jobs / job.dir_name

    def config_path(self, job: Job) -> Path:
        return self.job_dir(job) / "config.yaml"

    def log_path(self, job: Job) -> Path:
        return self.job_dir(job) / "log.txt"

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["resume"], values["stopping"] = bool(values["resume"]), bool(values["stopping"])
    return Job(**values)
