"""`conjure runs score RUN_DIR`: the run's evidence per step (`conjure.runs.best.read_rows`) as a table, and the
suggested step with the rule that chose it; `--json` for scripts and the web app. Writes the curves as a plot into
the run folder (conjure.runs.plot)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conjure.errors import ConjureError
from conjure.runs.events import EVENTS_FILE

if TYPE_CHECKING:  # runs.best reads checkpoints (conjure.files imports torch): not at the command line's parse
    from conjure.runs.best import StepRow, Suggestion


def add_runs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    runs = sub.add_parser("runs", help="look at finished or running training runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    p = runs_sub.add_parser("score", help="held-out loss and image scores per step, and the step to take")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the rows and the suggestion as JSON")
    p.set_defaults(func=cmd_score)


def _figure(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(rows: list[StepRow], suggestion: Suggestion) -> str:
    """The table (one line per step; `*` marks the suggested one), then the suggestion and its rule."""
    bands = list(dict.fromkeys(band for row in rows for band in row.bands))
    head = ["step", "val loss", *bands, "fidelity", "alignment", "checkpoint"]
    lines = [[str(r.step) + ("*" if r.step == suggestion.step else ""), _figure(r.val_loss),
              *(_figure(r.bands.get(band)) for band in bands), _figure(r.fidelity, 3), _figure(r.alignment, 3),
              "yes" if r.checkpoint else "-"] for r in rows]
    widths = [max(len(cell) for cell in column) for column in zip(head, *lines)]
    table = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [head, *lines]]
    chosen = "none" if suggestion.step is None else str(suggestion.step)
    return "\n".join([*table, "", f"suggested step: {chosen} ({suggestion.reason})", f"rule: {suggestion.rule}"])


def answer(rows: list[StepRow], suggestion: Suggestion) -> dict[str, Any]:
    """The rows and the suggestion as JSON data: `--json`'s answer and the web app's `/api/jobs/{id}/score`."""
    return {"rows": [asdict(row) for row in rows], "suggestion": suggestion.as_dict()}


def cmd_score(args: argparse.Namespace) -> int:
    from conjure.runs.best import read_rows, suggest
    from conjure.runs.plot import PLOT_FILE, write_plot  # Pillow: not at the command line's parse either

    run_dir = Path(args.run_dir)
    if not (run_dir / EVENTS_FILE).is_file():
        raise ConjureError(f"{run_dir} is not a conjure run folder (no {EVENTS_FILE})")
    rows = read_rows(run_dir)
    suggestion = suggest(rows)
    try:
        plot: str | None = str(write_plot(rows, suggestion, run_dir / PLOT_FILE))
    except OSError as error:  # a read-only copy of a run: the table still says it all
        plot = None
        print(f"note: plot not written ({error.strerror or error}: {run_dir / PLOT_FILE})", file=sys.stderr)
    if args.json:
        json.dump({**answer(rows, suggestion), "plot": plot}, sys.stdout, indent=1)
        print()
    else:
        print(render(rows, suggestion))
    if plot:  # on stderr: stdout stays the table (or the JSON) alone
        print(f"plot: {plot}", file=sys.stderr)
    return 0
