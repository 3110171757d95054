"""What every benchmark script shares: the machine line of a results table, the median step time of a run, and
printing a table / appending it to docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch


def machine() -> str:
    """The machine that produced a figure: the GPU, or the CPU with its cores and torch threads."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} core(s), "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")


def median_step_seconds(run_dir: Path, *, warm_up: int) -> float:
    """Median time between a run's step events (from its events.jsonl), after `warm_up` steps (at most half the
    run); NaN when too few steps are left."""
    from conjure.runs.events import read_events

    times = [e["time"] for e in read_events(Path(run_dir) / "events.jsonl").events if e["event"] == "step"]
    warm = min(warm_up, len(times) // 2)
    return statistics.median(np.diff(times[warm:])) if len(times) - warm > 2 else float("nan")


def publish(text: str, write: Path | None) -> None:
    """Print a results section and, with `write`, append it to that markdown file."""
    print("\n" + text)
    if write:
        with Path(write).open("a", encoding="utf-8") as f:
            f.write("\n" + text)
