"""Hostile and unlucky resumes (reliability review 2026-12: D2, D3, D5, D10, D15): a crafted or broken
training state, changed settings, two resumes at once, a checkpoint folder, another working folder, a run
killed during its final validation. Each ends in one clear line or in a finished run, never in code run from
the run folder or in a run folder that no longer resumes."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conjure.cli import main
from conjure.config import parse_config
from conjure.runs.checkpoints import STATE_FILE, list_checkpoints
from conjure.train.loop import train

# diffusers and transformers bind their log handler to sys.stderr on first use; bind it now (pytest's
# session-wide capture) rather than inside a test's capsys, whose stream is closed when that test ends.
for _library in ("diffusers", "transformers"):
    __import__(f"{_library}.utils.logging", fromlist=["get_logger"]).get_logger(_library)


@pytest.fixture(scope="module")
def template_run(tiny_models, tmp_path_factory):
    """A TI run stopped at step 2 of 4 (its checkpoint at 2), trained once; tests resume copies of it."""
    import numpy as np
    from PIL import Image

    from conjure.train.control import TrainControl

    root = tmp_path_factory.mktemp("template")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    raw = {
        "type": "textual_inversion",
        "basic": {"base_model": str(tiny_models("sd1")), "output_dir": str(root / "runs"), "run_name": "run",
                  "max_train_steps": 4, "save_every_n_steps": 100, "validate_every_n_steps": None, "seed": 3},
        "data": {"source": str(images), "resolution": 64, "batch_size": 2},
        "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
        "validation": {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 2.0, "at_start": False},
        "optimizer": {"learning_rate": 0.05},
    }
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
    result = train(parse_config(raw), control=control)
    assert result.status == "interrupted" and result.step == 2
    return result.run_dir


@pytest.fixture
def stopped_run(template_run, tmp_path):
    """A copy of the template run in this test's own folder (a run folder moved elsewhere resumes there)."""
    return Path(shutil.copytree(template_run, tmp_path / "runs" / "run"))


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and "unexpected" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


class _RunsCode:
    """Unpickling this creates a marker file: what a crafted training_state.pt would do with a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_that_runs_code_when_unpickled_is_refused_and_never_runs(stopped_run, capsys, tmp_path):
    run_dir = stopped_run
    state_file = list_checkpoints(run_dir)[-1][1] / STATE_FILE
    marker = tmp_path / "pwned"
    state = torch.load(state_file, weights_only=True)
    state["method"] = {"payload": _RunsCode(marker)}
    torch.save(state, state_file)
    code, _, err = cli(capsys, "train", "--resume", run_dir)
    one_line_error(code, err, str(state_file), "not loaded")
    assert not marker.exists()
    # the same through plain pickle (not a torch zip file)
    state_file.write_bytes(pickle.dumps({"step": 1, "method": _RunsCode(marker)}))
    code, _, err = cli(capsys, "train", "--resume", run_dir)
    one_line_error(code, err, str(state_file))
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    pytest.param(os.urandom(4096), id="random-bytes"),
    pytest.param(b"", id="zero-bytes"),
    pytest.param(b"\x80\x04\x95", id="truncated-pickle"),
    pytest.param(None, id="missing-keys"),
    pytest.param([1, 2], id="not-a-mapping"),
    pytest.param({"step": 2, "method": "nonsense", "optimizer": {}, "lr_scheduler": {}, "generator": 0},
                 id="wrong-contents"),
])
def test_a_broken_state_is_one_line_naming_the_file(stopped_run, capsys, content):
    run_dir = stopped_run
    state_file = list_checkpoints(run_dir)[-1][1] / STATE_FILE
    if content is None:
        torch.save({"step": 2, "generator": torch.zeros(3)}, state_file)
    elif isinstance(content, bytes):
        state_file.write_bytes(content)
    else:
        torch.save(content, state_file)
    code, _, err = cli(capsys, "train", "--resume", run_dir)
    line = one_line_error(code, err, str(state_file.parent))
    if content is None:
        assert "missing method, optimizer, lr_scheduler" in line


def folder_snapshot(run_dir):
    """Every file of a run folder and its bytes (the lock file aside: it only ever holds a pid)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "train.lock"}


def write_config(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, field", [
    ("textual_inversion.num_vectors=3", "textual_inversion.num_vectors is 1 in the run, 3 in this config"),
    ("textual_inversion.placeholder_token=<other>", "textual_inversion.placeholder_token is '<zq-thing>'"),
    ("data.batch_size=3", "data.batch_size is 2 in the run, 3 in this config"),
    ("optimizer.weight_decay=0.1", "optimizer.weight_decay"),  # the optimizer state would keep the old one
])
def test_a_change_the_checkpoint_depends_on_is_refused_and_the_run_still_resumes(stopped_run, capsys, change,
                                                                                  field):
    """D5: a refused resume names the setting and both values, and leaves the run folder as it was."""
    run_dir = stopped_run
    before = folder_snapshot(run_dir)
    code, _, err = cli(capsys, "train", "--resume", run_dir, "--set", change)
    one_line_error(code, err, field, "cannot resume")
    assert folder_snapshot(run_dir) == before
    code, out, err = cli(capsys, "train", "--resume", run_dir)
    assert code == 0 and "done: 4 steps" in out, err


def test_another_methods_config_on_a_run_is_refused_before_anything_is_written(stopped_run, capsys, tmp_path):
    run_dir = stopped_run
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    lora = {"type": "lora", "basic": raw["basic"], "data": raw["data"], "lora": {"trigger_word": "zq", "rank": 2},
            "validation": raw["validation"]}
    lora["data"]["caption_prefix"] = "zq"
    before = folder_snapshot(run_dir)
    code, _, err = cli(capsys, "train", write_config(tmp_path / "lora.yaml", lora), "--resume", run_dir)
    one_line_error(code, err, "type is 'textual_inversion' in the run, 'lora' in this config")
    assert folder_snapshot(run_dir) == before


def test_another_base_model_is_refused(stopped_run, capsys, tiny_models):
    run_dir = stopped_run
    code, _, err = cli(capsys, "train", "--resume", run_dir, "--set", f"basic.base_model={tiny_models('sd2')}")
    one_line_error(code, err, "basic.base_model is")


def test_a_changed_learning_rate_takes_effect_and_is_recorded(stopped_run, capsys):
    """D5c: the new rate is what the resumed steps use (events) and what config.yaml says, with the longer run."""
    run_dir = stopped_run
    code, out, err = cli(capsys, "train", "--resume", run_dir, "--set", "optimizer.learning_rate=0.01",
                         "--set", "basic.max_train_steps=6")
    assert code == 0 and "done: 6 steps" in out, err
    assert "optimizer.learning_rate 0.05 -> 0.01" in err and "basic.max_train_steps 4 -> 6" in err
    from conjure.runs.events import read_events

    lrs = [e["lr"] for e in read_events(run_dir / "events.jsonl").events if e["event"] == "step"]
    assert lrs == [0.05, 0.05, 0.01, 0.01, 0.01, 0.01]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optimizer"]["learning_rate"] == 0.01 and saved["basic"]["max_train_steps"] == 6


def test_a_checkpoint_folder_resumes_without_a_config(stopped_run, capsys):
    """D15: `--resume RUN/checkpoints/step-000002` (as the README says) finds the run's config.yaml."""
    run_dir = stopped_run
    code, out, err = cli(capsys, "train", "--resume", run_dir / "checkpoints" / "step-000002")
    assert code == 0 and "done: 4 steps" in out, err
    assert "basic.output_dir" in err  # a copy of the template: the run moved, and says so
    code, _, err = cli(capsys, "train", "--resume", "latest")
    one_line_error(code, err, "--resume latest needs the config file")


def test_a_run_started_with_relative_paths_resumes_from_another_folder(ti_config, capsys, tmp_path, monkeypatch,
                                                                          image_folder):
    """D15: the run's config.yaml holds absolute paths, so `--resume RUN` works from anywhere."""
    monkeypatch.chdir(tmp_path)
    raw = ti_config(basic={"max_train_steps": 4, "validate_every_n_steps": None, "output_dir": "runs"},
                    validation={"at_start": False}, data={"source": image_folder.name, "cache_latents": "disk",
                                                          "cache_dir": "cache"})
    config = write_config(tmp_path / "relative.yaml", raw)
    code, _, err = cli(capsys, "train", config, "--set", "basic.max_train_steps=2")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text())
    assert saved["data"]["source"] == str(image_folder) and saved["data"]["cache_dir"] == str(tmp_path / "cache")
    assert saved["basic"]["output_dir"] == str(tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli(capsys, "train", "--resume", tmp_path / "runs" / "run", "--set", "basic.max_train_steps=4")
    assert code == 0 and "done: 4 steps" in out, err
    # the original config from the original folder is the same run: no refused change
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", config, "--resume", "runs/run", "--set", "basic.max_train_steps=5")
    assert code == 0 and "done: 5 steps" in out, err


def test_a_second_resume_of_a_running_run_is_refused(stopped_run):
    """D15: two `--resume` of one run at once: the second (another process) gets one line, the first trains on."""
    from conjure.train.control import TrainControl

    run_dir = stopped_run
    second = []

    def on_step(step, loss):
        if not second:
            second.append(subprocess.run([sys.executable, "-m", "conjure", "train", "--resume", str(run_dir)],
                                         capture_output=True, text=True, timeout=300))

    result = train(parse_config(yaml.safe_load((run_dir / "config.yaml").read_text())), resume=str(run_dir),
                   control=TrainControl(on_step=on_step))
    assert result.step == 4 and result.status == "completed"
    one_line_error(second[0].returncode, second[0].stderr,
                   f"{run_dir} is being trained by another process (pid {os.getpid()})")


def test_a_lock_left_by_a_dead_process_is_taken_over(stopped_run, capsys):
    run_dir = stopped_run
    (run_dir / "train.lock").write_text("999999999\n")  # no such process; flock held by nobody
    code, out, err = cli(capsys, "train", "--resume", run_dir)
    assert code == 0 and "done: 4 steps" in out, err


def test_a_run_killed_during_its_final_validation_is_finished(ti_config, capsys):
    """D15: killed after its last checkpoint, before the final validation's end: --resume renders the final
    validation and writes the end event instead of saying 'already reached step 4 of 4'."""
    from conjure.runs.events import read_events

    raw = ti_config(basic={"max_train_steps": 4, "validate_every_n_steps": None}, validation={"at_start": False})
    result = train(parse_config(raw))
    events_file = run_dir = result.run_dir
    events_file = run_dir / "events.jsonl"
    events = events_file.read_text().splitlines()
    assert '"event": "validation"' in events[-2] and '"event": "end"' in events[-1]
    events_file.write_text("\n".join(events[:-2]) + "\n")  # what the kill left
    for image in (run_dir / "validation" / "step-000004").iterdir():
        image.unlink()
    code, out, err = cli(capsys, "train", "--resume", run_dir)
    assert code == 0 and "done: 4 steps" in out, err
    tail = read_events(events_file).events[-3:]
    assert [e["event"] for e in tail] == ["start", "validation", "end"]
    assert tail[-1]["status"] == "completed" and tail[-1]["step"] == 4
    assert (run_dir / "validation" / "step-000004" / "grid.png").is_file()
    code, _, err = cli(capsys, "train", "--resume", run_dir)
    one_line_error(code, err, "already reached step 4 of 4")


def test_a_checkpoint_written_before_the_rng_was_saved_still_resumes(stopped_run, capsys):
    """States of earlier conjure versions have no 'rng' part: they load (weights-only) and resume."""
    run_dir = stopped_run
    state_file = list_checkpoints(run_dir)[-1][1] / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["rng"]
    torch.save(state, state_file)
    code, out, err = cli(capsys, "train", "--resume", run_dir)
    assert code == 0 and "done: 4 steps" in out, err


def test_only_the_main_process_holds_the_run(stopped_run, monkeypatch):
    """Under DDP every rank resumes the same run folder: the other ranks must not be refused by the main one's
    lock."""
    from accelerate import Accelerator

    from conjure.runs.folder import lock_run

    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    raw = yaml.safe_load((stopped_run / "config.yaml").read_text())
    with lock_run(stopped_run):  # the main process, training
        assert train(parse_config(raw), resume=str(stopped_run)).step == 4
