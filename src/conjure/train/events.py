"""What a run reports: `events.jsonl` (one JSON object per line, read by tests and the UI) and
TensorBoard scalars/images under `logs/`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


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
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def scalars(self, step: int, **values: float) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)

    def image(self, tag: str, step: int, array_hwc: Any) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, array_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        self._file.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events of a run; a last line cut off by a kill is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
