"""The web app's runner: it trains the queued jobs (conjure.ui.queue) one at a time, oldest first, each as a
subprocess `python -m conjure train jobs/<id>/config.yaml` (plus `--resume <run_dir>`), so a crashing run never
takes the server down and the trainer knows nothing of the UI.

The runner learns how a run goes only from its files: the run folder's `events.jsonl` (step, loss, the end
and its status), its checkpoints, and the process's exit. A job's run folder is known before it starts
(`output_dir/run_name`, with a run name unique per job), so a server that restarts finds it again:
- a job recorded as running whose process is gone ends as its events say (usually `interrupted`, resumable from
  its last checkpoint); one whose process still runs (same pid, and /proc/<pid>/cmdline names conjure and the
  job's config file) is adopted: followed by polling until it exits;
- queued jobs stay queued.
Only one runner per workspace takes jobs (a lock file); a second server on the same workspace serves the API.

`JobQueue(workspace)`, the job store with its runner, works without a server: `submit()`, `run_once()` (one
pass: follow, finish, launch) and `wait_idle(timeout)` drive it in tests; `start()` runs those passes in a
daemon thread, `shutdown()` stops the running job (SIGTERM: it saves a checkpoint and stops) and records it as
interrupted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conjure.errors import EXIT_INTERRUPTED, ConjureError
from conjure.files import atomic_write_text
from conjure.runs.events import EVENTS_FILE, Event, read_events
from conjure.ui.queue import Job, JobStore, now_iso
from conjure.ui.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class _Follower:
    """A running job's process (ours: `proc`; adopted after a restart: only its pid) and what its events said."""

    job_id: int
    pid: int
    config_path: Path
    events_path: Path
    pos: int
    proc: subprocess.Popen | None = None
    end: dict[str, Any] | None = None
    first_step: tuple[int, float] | None = None  # (step, time) of this launch's first step event

    def exit_code(self) -> int | None:
        """The exit status once the process ended; None while it runs. An adopted process's status is unknown:
        it reads as -1 once /proc no longer shows it."""
        if self.proc is not None:
            return self.proc.poll()
        return None if same_process(self.pid, self.config_path) else -1


def same_process(pid: int | None, config_path: Path) -> bool:
    """Whether `pid` is a live conjure run of `config_path` (not a zombie, not a reused pid)."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():  # no procfs (macOS): the pid alone has to do
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        args = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    text = [a.decode(errors="replace") for a in args if a]
    return any("conjure" in a for a in text) and str(config_path) in text


class JobQueue(JobStore):
    """The jobs of one workspace and the runner that trains them. Thread-safe: API threads submit and cancel,
    the runner thread launches and follows, all under the store's lock."""

    def __init__(self, workspace: Workspace, *, poll_seconds: float = 0.5):
        super().__init__(workspace)
        self.poll_seconds = poll_seconds
        self._active: dict[int, _Follower] = {}
        self._runner_file: Any = None  # the open lock file while this queue is the workspace's runner
        self._recovered = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cancel(self, job_id: int) -> Job:
        """queued -> cancelled; running -> SIGTERM (the run finishes its step, saves and stops) and cancelled
        once it has exited. A second cancel of a stopping job sends nothing more."""
        with self._lock:
            job = self._row(job_id)
            if job.status == "queued":
                self._update(job_id, status="cancelled", ended=now_iso())
            elif job.status == "running":
                if not job.stopping:
                    self._update(job_id, stopping=1)
                    self._signal(job, signal.SIGTERM)
            else:
                raise ConjureError(f"job {job_id} is {job.status}; only a queued or running job can be cancelled")
        self.changed.set()
        return self._row(job_id)

    def _signal(self, job: Job, sig: int) -> None:
        follower = self._active.get(job.id)
        config_path = follower.config_path if follower else self.config_path(job)
        if follower and follower.proc is not None:
            if follower.proc.poll() is None:
                follower.proc.send_signal(sig)
        elif same_process(job.pid, config_path):
            os.kill(job.pid, sig)

    # --- the runner ----------------------------------------------------------------------------------
    def _take_runner_lock(self) -> bool:
        if self._runner_file is not None:
            return True
        handle = open(self.ws.root / "runner.lock", "a+")  # noqa: SIM115 - held open while this queue runs jobs
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._runner_file = handle
        return True

    def run_once(self) -> bool:
        """One pass of the runner: follow the running job(s), record the ones that ended, start the oldest
        queued job when none runs. Returns whether anything is still running or queued. Does nothing (False)
        when another queue holds this workspace's runner lock."""
        with self._lock:
            if not self._take_runner_lock():
                return False
            if not self._recovered:
                self._recover()
            for follower in list(self._active.values()):
                self._follow(follower)
            if not self._active:
                self._launch_next()
            return bool(self._active) or self.count("queued") > 0

    def wait_idle(self, timeout: float) -> None:
        """Run passes (or, with the runner thread started, wait for it) until no job runs or waits."""
        deadline = time.monotonic() + timeout
        while True:
            if self._thread is not None and self._thread.is_alive():
                busy = self.count("queued", "running") > 0
            else:
                busy = self.run_once()
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running or queued after {timeout} s")
            time.sleep(min(self.poll_seconds, 0.2))

    def start(self) -> None:
        """Run passes every `poll_seconds` in a daemon thread (sooner after a submit or cancel)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="conjure-jobs", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the runner must outlive any one job's surprise
                log.exception("job runner pass failed")
            self.changed.wait(self.poll_seconds)
            self.changed.clear()

    def _stop_thread(self) -> None:
        """End the runner thread (a pass in progress finishes first); nothing new starts after this."""
        self._stop.set()
        self.changed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def close(self) -> None:
        """Stop the runner thread and let go of the workspace, leaving any running job running (as a server
        that stops abruptly does; the next queue adopts it)."""
        self._stop_thread()
        with self._lock:
            self._active.clear()
            if self._runner_file is not None:
                self._runner_file.close()
                self._runner_file = None
        super().close()

    def shutdown(self, timeout: float = 60.0) -> None:
        """The server is stopping: SIGTERM the running job (it finishes its step, saves and stops), wait up to
        `timeout` seconds and record it as interrupted (resumable). A job still running after that stays
        recorded as running; the next server start adopts it or, once it is gone, records how it ended."""
        self._stop_thread()
        with self._lock:
            followers = list(self._active.values())
            for follower in followers:
                self._signal(self._row(follower.job_id), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for follower in followers:
            while follower.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            with self._lock:
                self._follow(follower)
                if follower.job_id in self._active:
                    log.warning("job %s did not stop within %s s; it keeps running", follower.job_id, timeout)
        self.close()

    # --- launching, following, finishing ------------------------------------------------------------
    def _recover(self) -> None:
        """After a (re)start: adopt the running jobs whose process lives on; record how the others ended."""
        self._recovered = True
        for job in self.with_status("running"):
            follower = _Follower(
                job.id, job.pid or 0, self.config_path(job), Path(job.run_dir or ".") / EVENTS_FILE,
                job.events_offset,
            )
            self._active[job.id] = follower
            if same_process(job.pid, follower.config_path):
                log.info("adopting job %s (pid %s), still running", job.id, job.pid)
            self._follow(follower)  # one that is gone ends here, as its events say

    def _launch_next(self) -> None:
        job = self.next_queued()
        if job is None:
            return
        try:
            self._launch(job)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self._update(job.id, status="failed", started=now_iso(), ended=now_iso(),
                         error=f"could not start the run: {exc}")

    def _launch(self, job: Job) -> None:
        job_dir = self.job_dir(job)
        job_dir.mkdir(parents=True, exist_ok=True)
        run_name = job.run_name
        if not job.resume:
            run_name = _free_run_name(Path(job.output_dir), job.run_name)
        config = yaml.safe_load(job.config)
        config["basic"]["run_name"] = run_name
        config_path = self.config_path(job)
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        run_dir = Path(job.output_dir) / run_name
        events = run_dir / EVENTS_FILE
        offset = events.stat().st_size if job.resume and events.is_file() else 0
        cmd = [sys.executable, "-m", "conjure", "train", str(config_path)]
        if job.resume:
            cmd += ["--resume", str(run_dir)]
        if job.processes > 1:  # the launcher's SIGTERM (Cancel) reaches every process (train/launch.py)
            cmd += ["--num-processes", str(job.processes)]
        with open(self.log_path(job), "ab") as log_file:
            note = "resuming" if job.resume else "starting"
            log_file.write(f"--- conjure ui: job {job.id} {note} at {now_iso()}\n".encode())
            log_file.flush()
            proc = subprocess.Popen(  # an argument list, never a shell
                cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.ws.root,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C in the server's terminal must not reach the run
            )
        self._update(job.id, status="running", pid=proc.pid, run_name=run_name, run_dir=str(run_dir),
                     started=now_iso(), ended=None, error=None, stopping=0, events_offset=offset, eta_seconds=None)
        self._active[job.id] = _Follower(job.id, proc.pid, config_path, events, offset, proc=proc)
        log.info("job %s started: pid %s, run folder %s", job.id, proc.pid, run_dir)

    def _follow(self, follower: _Follower) -> None:
        """Read the run's new events into the job record; record the end once the process has exited."""
        rc = follower.exit_code()  # before reading: every event of an exited process is then on disk
        progress = self._read_events(follower)
        if progress:
            self._update(follower.job_id, **progress)
        if rc is None:
            return
        del self._active[follower.job_id]
        job = self._row(follower.job_id)
        status, error = outcome(follower.end, rc, job.stopping, self.log_path(job))
        self._update(job.id, status=status, error=error, ended=now_iso(), pid=None, eta_seconds=None)
        log.info("job %s ended: %s%s", job.id, status, f" ({error})" if error else "")

    def _read_events(self, follower: _Follower) -> dict[str, Any]:
        read = read_events(follower.events_path, follower.pos)
        follower.pos = read.next
        progress: dict[str, Any] = {}
        total: int | None = None
        for event in read.events:
            kind = event.get("event")
            if kind == Event.START:
                progress["max_steps"] = total = event.get("max_train_steps")
                progress["step"] = event.get("start_step", 0)
            elif kind == Event.STEP:
                step, at = int(event["step"]), float(event.get("time", 0.0))
                progress["step"], progress["loss"] = step, event.get("loss")
                follower.first_step = follower.first_step or (step, at)
                first, t0 = follower.first_step
                total = total or self._row(follower.job_id).max_steps
                if step > first and total:
                    progress["eta_seconds"] = round((total - step) * (at - t0) / (step - first), 1)
            elif kind == Event.END:
                follower.end = event
        return progress


def outcome(end: dict[str, Any] | None, rc: int, stopping: bool, log_path: Path) -> tuple[str, str | None]:
    """A launch's final status and error from its end event, exit code (-1: unknown) and whether the user
    cancelled it."""
    said = end.get("status") if end else None
    if said == "completed":
        return "completed", None
    if stopping:
        return "cancelled", None
    if said == "failed":
        return "failed", end.get("error") or last_error_line(log_path) or f"exit code {rc}"
    if said == "interrupted" or rc in (-1, EXIT_INTERRUPTED):
        return "interrupted", None
    if rc < 0 and -rc in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGHUP):
        return "interrupted", f"stopped by {signal.Signals(-rc).name}"
    return "failed", last_error_line(log_path) or f"the run exited with code {rc}"


def last_error_line(log_path: Path) -> str | None:
    """The run's own error line (`error: ...`, as the CLI prints it), else the last line it printed."""
    try:
        lines = read_log_lines(log_path, tail=50)
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    output = [line for line in lines if line.strip() and not line.startswith("--- conjure ui:")]
    return output[-1].strip() if output else None


def read_log_lines(log_path: Path, tail: int, max_bytes: int = 4 << 20) -> list[str]:
    """The last `tail` lines of a run's output, each line as a terminal shows it: a progress bar redraws
    itself with carriage returns, so only the text after the last one is kept."""
    with open(log_path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_bytes))
        data = handle.read().decode("utf-8", errors="replace")
    lines = data.split("\n")
    if size > max_bytes and "\r" not in lines[0]:
        lines = lines[1:]  # cut off at its start (a progress line's last redraw is whole, so it stays)
    if lines and lines[-1] == "":
        lines.pop()
    shown = [line.rstrip("\r").split("\r")[-1] for line in lines]
    return shown[-tail:] if tail > 0 else []


def _free_run_name(output_dir: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... when that run folder exists and is not empty (as a new run of
    `conjure train` would name it; the job must know its run folder before the run starts)."""
    candidate, n = name, 1
    while (output_dir / candidate).is_dir() and any((output_dir / candidate).iterdir()):
        n += 1
        candidate = f"{name}_{n}"
    return candidate
