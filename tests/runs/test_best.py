"""conjure.runs.best: the evidence per step read from a run folder, and the suggested step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conjure.cli import main
from conjure.errors import ConjureError
from conjure.runs.best import StepRow, read_rows, suggest
from conjure.runs.checkpoints import STATE_FILE, step_dir_name
from conjure.runs.events import Event, EventLog
from conjure.runs.export import export_step


def _run(tmp_path: Path, losses: dict[int, float], scores: dict[int, tuple[float, float]] | None = None,
         checkpoints: tuple[int, ...] | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = EventLog(tmp_path / "events.jsonl")
    for step, loss in losses.items():
        log.emit(Event.VALIDATION_LOSS, step=step, loss=loss, bands={"0-499": loss * 2, "500-999": loss / 2}, images=2)
        if scores and step in scores:
            fidelity, alignment = scores[step]
            log.emit(Event.IMAGE_SCORES, step=step, fidelity=fidelity, alignment=alignment, model="tiny")
    log.close()
    for step in checkpoints if checkpoints is not None else [s for s in losses if s]:
        folder = tmp_path / "checkpoints" / step_dir_name(step)
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_bytes(b"")
    return tmp_path


def test_read_rows_joins_losses_scores_and_checkpoints(tmp_path):
    run = _run(tmp_path, {0: 1.0, 10: 0.5, 20: 0.6}, scores={10: (0.8, 0.3)}, checkpoints=(10, 20, 30))
    rows = read_rows(run)
    assert [r.step for r in rows] == [0, 10, 20, 30]
    assert rows[0] == StepRow(step=0, val_loss=1.0, bands={"0-499": 2.0, "500-999": 0.5})
    assert (rows[1].fidelity, rows[1].alignment, rows[1].checkpoint) == (
        0.8, 0.3, str(tmp_path / "checkpoints" / "step-000010"))
    assert rows[3].val_loss is None and rows[3].fidelity is None and rows[3].checkpoint is not None


def test_suggests_the_earliest_step_near_the_best_loss(tmp_path):
    # falls then rises: 40 is best, 30 is within 10% of the improvement (1.0 - 0.5) above it
    run = _run(tmp_path, {0: 1.0, 10: 0.8, 20: 0.6, 30: 0.54, 40: 0.5, 50: 0.7, 60: 0.9})
    suggestion = suggest(read_rows(run))
    assert suggestion.step == 30
    assert "step 30: held-out loss 0.5400" in suggestion.reason and "best 0.5000 at step 40" in suggestion.reason
    assert "earliest checkpointed step" in suggestion.rule


def test_scores_rule_out_near_best_steps(tmp_path):
    # 30 and 40 are near the best loss; 30's fidelity has not plateaued yet, so 40
    run = _run(tmp_path, {0: 1.0, 30: 0.52, 40: 0.5}, scores={0: (0.5, 0.3), 30: (0.6, 0.3), 40: (0.7, 0.3)})
    assert suggest(read_rows(run)).step == 40
    # an alignment fallen from the base's rules a step out too
    run = _run(tmp_path / "b", {0: 1.0, 30: 0.52, 40: 0.5}, scores={0: (0.5, 0.3), 30: (0.7, 0.2), 40: (0.7, 0.29)})
    assert suggest(read_rows(run)).step == 40


def test_no_step_improved_on_the_base(tmp_path):
    run = _run(tmp_path, {0: 1.0, 10: 0.995, 20: 1.2})
    suggestion = suggest(read_rows(run))
    assert suggestion.step is None and suggestion.reason.startswith("no step improved on the base")


def test_nothing_to_compare_without_held_out_loss(tmp_path):
    run = _run(tmp_path, {}, checkpoints=(10,))
    suggestion = suggest(read_rows(run))
    assert suggestion.step is None and "validation.holdout" in suggestion.reason


def test_steps_without_a_checkpoint_are_not_suggested(tmp_path):
    run = _run(tmp_path, {0: 1.0, 5: 0.5, 10: 0.6}, checkpoints=(10,))
    assert suggest(read_rows(run)).step == 10
    run = _run(tmp_path / "b", {0: 1.0, 5: 0.5}, checkpoints=(4,))
    suggestion = suggest(read_rows(run))
    assert suggestion.step is None and "validate at the steps that are saved" in suggestion.reason


def test_runs_score_prints_the_table_and_the_suggestion(tmp_path, capsys):
    run = _run(tmp_path, {0: 1.0, 10: 0.5, 20: 0.9})
    assert main(["runs", "score", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "val", "loss", "0-499", "500-999", "fidelity", "alignment", "checkpoint"]
    assert out[2].split() == ["10*", "0.5000", "1.0000", "0.2500", "-", "-", "yes"]
    assert out[-2].startswith("suggested step: 10 (step 10: held-out loss 0.5000")
    assert main(["runs", "score", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["suggestion"]["step"] == 10 and report["rows"][1]["bands"] == {"0-499": 1.0, "500-999": 0.25}


def test_runs_score_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["runs", "score", str(tmp_path)]) == 2
    assert "not a conjure run folder" in capsys.readouterr().err


def test_export_step_best_takes_the_suggested_step(tmp_path):
    run = _run(tmp_path / "run", {0: 1.0, 10: 0.5, 20: 0.9})
    for step in (10, 20):
        (run / "checkpoints" / step_dir_name(step) / "token.safetensors").write_text(str(step))
    (copied,) = export_step(run, "best", tmp_path / "out")
    assert copied.read_text() == "10"
    sabotaged = _run(tmp_path / "sabotaged", {0: 1.0, 10: 1.1})
    with pytest.raises(ConjureError, match="--step best: no step improved on the base"):
        export_step(sabotaged, "best", tmp_path / "out2")
