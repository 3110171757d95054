"""A run's two small objects for callers, and its signals: commands in (stop), callbacks out (each step),
the result a run returns, and the stop that Ctrl-C, SIGTERM and SIGHUP ask for.

OneTrainer decouples its trainer from its UI the same way (callbacks out, commands in); the CLI, the demo, the
web app's runner and the tests all drive `conjure.train.loop.train` through these.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any


@dataclass
class TrainControl:
    """Commands into a run (stop) and callbacks out of it (after each step). Signals set `stop_reason`."""

    on_step: Callable[[int, float], None] | None = None
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    validations: list[Path] = field(default_factory=list)


def say(message: str) -> None:
    """One line for the person at the terminal, above the progress bar (not through it); in a run of several
    processes the main one's only (the others would repeat it: every process sets up the same run)."""
    from tqdm import tqdm

    from conjure.train.launch import main_process

    if not main_process():
        return

    tqdm.write(message, file=sys.stderr)


@contextmanager
def stop_on_signals(control: TrainControl) -> Iterator[None]:
    """First Ctrl-C / SIGTERM / SIGHUP (the terminal closed): finish the step, save, stop. A second one
    interrupts at once. Only the main thread can take signals; elsewhere (a web app's worker) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]

    def handler(signum: int, frame: FrameType | None) -> None:
        if control.stop_reason:
            raise KeyboardInterrupt
        if signum == getattr(signal, "SIGHUP", None):
            # The terminal closed: writes to it fail (EIO) from now on, and the progress bar's next one would
            # end the run as failed. What went there goes nowhere instead, as under nohup.
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in terminals:
                os.dup2(null, fd)
            os.close(null)
        control.request_stop(signal.Signals(signum).name)
        say("stopping after this step (saving a checkpoint); press Ctrl-C again to abort at once")

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # Windows has no SIGHUP
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
