"""conjure.runs.plot: the curves of `conjure runs score` as a PNG in the run folder, the suggested step marked."""

from __future__ import annotations

import json

from PIL import Image

from conjure.cli import main
from conjure.runs.best import StepRow, Suggestion
from conjure.runs.events import Event, EventLog
from conjure.runs.plot import PLOT_FILE, plot, write_plot

MARK = (214, 96, 24)


def rows(fidelity: bool = True) -> list[StepRow]:
    losses = {0: 1.0, 10: 0.6, 20: 0.5, 30: 0.7}
    return [StepRow(step=s, val_loss=v, fidelity=0.5 + s / 100 if fidelity else None,
                    alignment=0.3 if fidelity else None, checkpoint="c" if s else None) for s, v in losses.items()]


def marked_columns(image: Image.Image, y: int) -> list[int]:
    return [x for x in range(image.width) if image.getpixel((x, y)) == MARK]


def test_one_panel_per_measured_figure_with_the_suggested_step_marked(tmp_path):
    both = plot(rows(), Suggestion(20, "rule", "why"))
    loss_only = plot(rows(fidelity=False), Suggestion(20, "rule", "why"))
    assert both.height > loss_only.height  # three panels against one
    unmarked = plot(rows(fidelity=False), Suggestion(None, "rule", "why"))
    # the mark is a vertical line at the step's x: the same columns in the middle of every panel, none without it
    y = loss_only.height // 2
    assert len(marked_columns(loss_only, y)) == 3 and marked_columns(unmarked, y) == []
    step_10 = plot(rows(fidelity=False), Suggestion(10, "rule", "why"))
    assert marked_columns(step_10, y)[0] < marked_columns(loss_only, y)[0]
    path = write_plot(rows(), Suggestion(20, "rule", "why"), tmp_path / PLOT_FILE)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == both.size


def test_a_run_without_figures_still_gets_a_plot():
    assert plot([StepRow(step=10, checkpoint="c")], Suggestion(None, "rule", "nothing")).width > 0


def test_runs_score_writes_the_plot_into_the_run_folder(tmp_path, capsys):
    log = EventLog(tmp_path / "events.jsonl")
    for step, loss in {0: 1.0, 10: 0.5}.items():
        log.emit(Event.VALIDATION_LOSS, step=step, loss=loss, bands={}, images=1)
    log.close()
    assert main(["runs", "score", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["plot"] == str(tmp_path / PLOT_FILE)
    assert f"plot: {tmp_path / PLOT_FILE}" in captured.err and (tmp_path / PLOT_FILE).is_file()
