"""Hostile and unlucky resumes (reliability review 2026-12: D2, D3, D5, D10, D15): a crafted or broken
training state, changed settings, two resumes at once, a checkpoint folder, another working folder, a run
killed during its final validation. Each ends in one clear line or in a finished run, never in code run from
the run folder or in a run folder that no longer resumes."""

import os
import pickle

import pytest
import torch
import yaml

from conjure.cli import main
from conjure.config import parse_config
from conjure.train.checkpoints import STATE_FILE, list_checkpoints
from conjure.train.loop import train

# diffusers and transformers bind their log handler to sys.stderr on first use; bind it now (pytest's
# session-wide capture) rather than inside a test's capsys, whose stream is closed when that test ends.
for _library in ("diffusers", "transformers"):
    __import__(f"{_library}.utils.logging", fromlist=["get_logger"]).get_logger(_library)


def stopped_run(ti_config, at=2, **sections):
    """A TI run stopped at step `at` of 4 (checkpoint at `at`), as a run folder."""
    from conjure.train.loop import TrainControl

    raw = ti_config(basic={"max_train_steps": 4, "save_every_n_steps": 100, "validate_every_n_steps": None},
                    validation={"at_start": False}, **sections)
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == at else None
    result = train(parse_config(raw), control=control)
    assert result.status == "interrupted" and result.step == at
    return result.run_dir


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


def test_a_state_that_runs_code_when_unpickled_is_refused_and_never_runs(ti_config, capsys, tmp_path):
    run_dir = stopped_run(ti_config)
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
def test_a_broken_state_is_one_line_naming_the_file(ti_config, capsys, content):
    run_dir = stopped_run(ti_config)
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
