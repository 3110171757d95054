"""Checkpoints: complete or absent, never half-written; a full disk keeps the last good one."""

import errno
from pathlib import Path

import pytest
import torch

from conjure.config import parse_config
from conjure.errors import ConjureError
from conjure.runs.checkpoints import STATE_FILE, list_checkpoints, resolve_checkpoint, write_checkpoint
from conjure.runs.events import read_events
from conjure.train.loop import train


def test_incomplete_folders_are_ignored(tmp_path):
    write_checkpoint(tmp_path, 5, {"step": 5}, lambda folder: [])
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # a kill during the write of step 9
    (tmp_path / "checkpoints" / "step-000010").mkdir()  # no training state: not complete
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5]
    assert resolve_checkpoint(tmp_path).name == "step-000005"


def test_nothing_to_resume(tmp_path):
    with pytest.raises(ConjureError, match="nothing to resume"):
        resolve_checkpoint(tmp_path)


def test_full_disk_keeps_the_last_checkpoint(ti_config, monkeypatch):
    raw = ti_config(basic={"validate_every_n_steps": None}, validation={"at_start": False})
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if obj.get("step") == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)  # checkpoints imports torch when it saves
    with pytest.raises(ConjureError, match="could not write checkpoint .*step-000006.*No space left"):
        train(parse_config(raw))
    run_dir = raw["basic"]["output_dir"] + "/run"
    assert [step for step, _ in list_checkpoints(run_dir)] == [3]
    events = read_events(f"{run_dir}/events.jsonl").events
    assert events[-1]["event"] == "end" and events[-1]["status"] == "failed"
    # and the run continues from the good checkpoint once there is room again
    monkeypatch.setattr(torch, "save", real_save)
    assert train(parse_config(raw), resume=run_dir).step == 6


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, where every write is ENOSPC")
def test_a_full_disk_under_the_training_state_is_one_clear_error(tmp_path):
    # Given a path, torch.save reported the failed write as "unexpected RuntimeError: ... unexpected pos".
    def files(folder):
        (folder / STATE_FILE).symlink_to("/dev/full")
        return []

    with pytest.raises(ConjureError, match="step-000001: No space left on device; no checkpoint was written"):
        write_checkpoint(tmp_path, 1, {"step": 1}, files)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_warns_about_changed_settings(ti_config, capsys):
    from conjure.train.control import TrainControl

    raw = ti_config(basic={"validate_every_n_steps": None}, validation={"at_start": False})
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
    stopped = train(parse_config(raw), control=control)
    raw["optimizer"]["learning_rate"] = 0.01
    train(parse_config(raw), resume=str(stopped.run_dir))
    assert "resuming with changed settings: optimizer.learning_rate 0.05 -> 0.01" in capsys.readouterr().err
    events = read_events(stopped.run_dir / "events.jsonl").events
    start = [e for e in events if e["event"] == "start"][-1]
    assert start["changed_settings"] == ["optimizer.learning_rate"]
    # and the resumed steps use it (issue 21 D5: it was recorded but the checkpoint's rate ran on)
    assert [e["lr"] for e in events if e["event"] == "step"] == [0.05, 0.05, 0.01, 0.01, 0.01, 0.01]


def test_events_after_a_line_cut_off_by_a_kill_start_on_their_own_line(tmp_path):
    from conjure.runs.events import EventLog, read_events

    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "start", "time": 1}\n{"event": "step", "ste')  # killed mid-write
    log = EventLog(path)
    log.emit("start", resumed=True)
    log.close()
    assert [e["event"] for e in read_events(path).events] == ["start", "start"]
