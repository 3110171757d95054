"""What a run reports: `events.jsonl` (one JSON object per line, named by an `Event`; read by the web app's job
runner and events API, a resumed run and the tests through the one `read_events`) and TensorBoard
scalars/images under `logs/`.

A write that fails (a full disk) raises OSError naming the file or folder, so the one error line can say
where; TensorBoard's writer thread would also print its own traceback, which is kept quiet here because its
exception is raised again by the next write in the run's thread."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


class Event(str, Enum):
    """The `event` of each line of events.jsonl."""

    # enum.StrEnum's behaviour (str() and format() give the value); StrEnum itself is Python 3.11+, conjure 3.10+
    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    START = "start"  # run folder, type, family, max_train_steps, start_step, peak memory so far, ...
    STEP = "step"  # step, loss (null: not finite), lr, skipped_steps (so far), skipped (true on a skipped step)
    CHECKPOINT = "checkpoint"  # step, path, files
    CHECKPOINT_REMOVED = "checkpoint_removed"  # path (pruned by basic.keep_last_n_checkpoints)
    VALIDATION = "validation"  # step, prompts, seeds, images, grid
    VALIDATION_LOSS = "validation_loss"  # step, loss, bands {"<lo>-<hi>": loss}, images (held out: train/heldout.py)
    IMAGE_SCORES = "image_scores"  # step, fidelity, alignment, model (of the validation images: conjure.scoring)
    STOPPED = "stopped"  # step, reason (a stop asked for: signal, web app)
    END = "end"  # status (completed | interrupted | failed), step, skipped_steps, peak memory, error


def memory_peaks(device: Any) -> dict[str, int | None]:
    """The process's peak memory so far, in bytes (start and end events): resident RAM (`ru_maxrss`, KiB on Linux,
    bytes on macOS; None where Python has no `resource` module: Windows), and on a CUDA `device` what torch
    allocated there (`max_memory_allocated`; None elsewhere)."""
    import sys

    import torch

    try:
        import resource
    except ImportError:
        ram = None
    else:
        ram = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = getattr(device, "type", None) == "cuda"
    return {"peak_ram_bytes": ram, "peak_accelerator_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def _named(exc: OSError, path: Path | None) -> OSError:
    if not exc.filename and path is not None:  # a failed write() or flush() does not say which file it was writing
        exc.filename = str(path)
    return exc


def _quiet_tensorboard_writer_threads() -> None:
    """Stop TensorBoard's event-writer threads from printing their exception as a traceback: wrap the current
    `threading.excepthook` (once, unless something replaced it since)."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # a TensorBoard that moved its private writer: its traceback shows, nothing else changes
        return
    hook = threading.excepthook
    if getattr(hook, "conjure_quiet", False):
        return

    def quiet(args: Any) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            hook(args)

    quiet.conjure_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = quiet


class EventLog:
    """Append-only JSON lines; each line is flushed so a killed run keeps every event it wrote."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        ends_mid_line = False
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, 2)
                ends_mid_line = f.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if ends_mid_line:  # a run killed mid-write: the resumed run's first event starts on a line of its own
            self._file.write("\n")
        self._tb: Any = None
        self._tb_dir = tensorboard_dir

    def _tensorboard(self) -> Any:
        """The TensorBoard writer, made at the first scalar or image: importing TensorBoard (protobuf, absl) and
        starting its writer thread cost 0.1-0.3 s, which would otherwise come before a run's first step."""
        if self._tb is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_writer_threads()
            try:
                self._tb = SummaryWriter(str(self._tb_dir))
            except OSError as exc:
                raise _named(exc, self._tb_dir) from None
        return self._tb

    def emit(self, event: Event, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        except OSError as exc:
            raise _named(exc, self.path) from None

    def scalars(self, step: int, **values: float) -> None:
        if (writer := self._tensorboard()) is not None:
            try:
                for name, value in values.items():
                    writer.add_scalar(name, value, step)
            except OSError as exc:
                raise _named(exc, self._tb_dir) from None

    def image(self, tag: str, step: int, array_hwc: Any) -> None:
        if (writer := self._tensorboard()) is not None:
            try:
                writer.add_image(tag, array_hwc, step, dataformats="HWC")
            except OSError as exc:
                raise _named(exc, self._tb_dir) from None

    def close(self) -> None:
        """Close quietly: every event was flushed when emitted (or its failure raised then), and the
        TensorBoard scalars are a copy of them; a failure here would hide the error that ended the run."""
        try:
            if self._tb is not None:
                self._tb.close()
        except OSError:
            pass
        try:
            self._file.close()
        except OSError:
            pass


@dataclass(frozen=True)
class EventsRead:
    events: list[dict[str, Any]]
    next: int
    """The byte offset to read from next: just past the last line read (or `after`, if none was)."""


def read_events(path: Path, after: int = 0, limit: int | None = None) -> EventsRead:
    """The events of the lines that start at byte `after` or later (0, or a `next` from an earlier call), at most
    `limit` lines. One rule for a cut-off line: only complete lines (ending in a newline) are read, so a line being
    written is left for the next call; a complete line that is not JSON (cut off by a killed run, then closed by
    the resumed run's EventLog) counts as a line but gives no event. A missing file has no events."""
    try:
        with open(path, "rb") as handle:
            if after > 0:  # not at a line start (a cursor made up by a client): from the next line that is
                handle.seek(after - 1)
                if handle.read(1) != b"\n":
                    handle.readline()
            start = handle.tell()
            data = handle.read()
    except OSError:
        return EventsRead([], after)
    lines = data.split(b"\n")[:-1]  # the part after the last newline is not a complete line yet
    if limit is not None:
        lines = lines[:limit]
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return EventsRead(events, max(after, start + sum(len(line) + 1 for line in lines)))
