"""The loop's step bookkeeping: what advances the LR schedule, and steps skipped for a non-finite loss or gradients."""

import math
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer

from conjure.config import parse_config
from conjure.errors import ConjureError
from conjure.runs.checkpoints import load_state
from conjure.runs.events import read_events
from conjure.train.loop import train


def test_schedule_waits_on_steps_the_grad_scaler_skipped(ti_config, monkeypatch):
    """Issue 13 #12: an fp16 step with inf/nan gradients is skipped by the GradScaler; the warmup must not
    advance on it (accelerate's AcceleratedScheduler does not either). fp16 does not run on the CPU, so the
    optimizer reports the skips."""
    skipped_at = {1, 2, 4}
    calls = []
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped",
                        property(lambda self: len(calls) in skipped_at), raising=False)
    real_step = AcceleratedOptimizer.step

    def step(self, *args, **kwargs):
        calls.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    raw = ti_config(basic={"max_train_steps": 6, "validate_every_n_steps": None}, validation={"at_start": False},
                    optimizer={"scheduler": "constant", "warmup_steps": 2, "learning_rate": 0.04})
    result = train(parse_config(raw))
    lrs = [e["lr"] for e in read_events(result.run_dir / "events.jsonl").events if e["event"] == "step"]
    # the schedule advances after steps 3, 5 and 6 only: warmup 0 -> 0.02 -> 0.04
    assert lrs == [0.0, 0.0, 0.02, 0.02, 0.04, 0.04]


def _losses_with(monkeypatch, bad_calls, make=lambda value: value * float("nan")):
    """Patch the denoising loss: on the calls (counted from 1, across runs) in `bad_calls` it becomes `make(value)`."""
    from conjure.train import loss

    real, calls = loss.denoising_loss, []

    def denoising_loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return make(value) if len(calls) in bad_calls else value

    monkeypatch.setattr(loss, "denoising_loss", denoising_loss)


class _InfGradient(torch.autograd.Function):
    """The identity forward (a finite loss) whose backward gives inf/nan gradients."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _steps(run_dir):
    return [e for e in read_events(run_dir / "events.jsonl").events if e["event"] == "step"]


def _embedding(run_dir, step):
    return load_state(run_dir / "checkpoints" / f"step-{step:06d}")["method"]


def test_a_non_finite_loss_skips_its_step_and_is_counted(ti_config, monkeypatch):
    """Issue 16: a nan loss no longer ends the run: the step makes no update, the schedule waits, the step
    events count it, and the run completes."""
    _losses_with(monkeypatch, {2, 4})
    raw = ti_config(basic={"max_train_steps": 5, "save_every_n_steps": 1, "validate_every_n_steps": None},
                    validation={"at_start": False}, optimizer={"warmup_steps": 2, "learning_rate": 0.04})
    result = train(parse_config(raw))
    assert result.status == "completed" and result.step == 5
    steps = _steps(result.run_dir)
    assert [e["skipped_steps"] for e in steps] == [0, 1, 1, 2, 2]
    assert [e.get("skipped", False) for e in steps] == [False, True, False, True, False]
    assert steps[1]["loss"] is None and all(math.isfinite(steps[i]["loss"]) for i in (0, 2, 4))
    assert [e["lr"] for e in steps] == [0.02, 0.02, 0.04, 0.04, 0.04]  # warmup advances on the good steps only
    for before, skipped in ((1, 2), (3, 4)):  # a skipped step changed nothing
        for name, tensor in _embedding(result.run_dir, before).items():
            assert torch.equal(tensor, _embedding(result.run_dir, skipped)[name]), name
    assert not torch.equal(next(iter(_embedding(result.run_dir, 4).values())),
                           next(iter(_embedding(result.run_dir, 5).values())))
    end = read_events(result.run_dir / "events.jsonl").events[-1]
    assert end["event"] == "end" and end["skipped_steps"] == 2


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_an_inf_gradient_with_a_finite_loss_skips_its_step(ti_config, monkeypatch, max_grad_norm):
    _losses_with(monkeypatch, {2}, make=_InfGradient.apply)
    raw = ti_config(basic={"max_train_steps": 3, "save_every_n_steps": 1, "validate_every_n_steps": None},
                    validation={"at_start": False}, advanced={"max_grad_norm": max_grad_norm})
    result = train(parse_config(raw))
    steps = _steps(result.run_dir)
    assert [e.get("skipped", False) for e in steps] == [False, True, False]
    assert all(math.isfinite(e["loss"]) for e in steps)
    for name, tensor in _embedding(result.run_dir, 1).items():
        assert torch.equal(tensor, _embedding(result.run_dir, 2)[name]), name
    assert all(torch.isfinite(t).all() for t in _embedding(result.run_dir, 3).values())


def test_a_run_that_keeps_skipping_stops_in_one_line_and_keeps_its_checkpoint(ti_config, monkeypatch):
    _losses_with(monkeypatch, set(range(3, 100)))
    raw = ti_config(basic={"max_train_steps": 10, "save_every_n_steps": 2, "validate_every_n_steps": None},
                    validation={"at_start": False}, advanced={"max_consecutive_skipped_steps": 3})
    with pytest.raises(ConjureError) as caught:
        train(parse_config(raw))
    run = caught.value.args[0]
    assert run.startswith("loss became nan at step 5 (3 step(s) in a row skipped, "
                          "advanced.max_consecutive_skipped_steps: 3); lower optimizer.learning_rate")
    assert run.endswith("(the last complete checkpoint is " + str(tmp_checkpoints(raw) / "step-000004") + ")")
    assert sorted(p.name for p in tmp_checkpoints(raw).iterdir()) == ["step-000002", "step-000004"]
    for name, tensor in _embedding(tmp_checkpoints(raw).parent, 2).items():  # the skips moved nothing since step 2
        assert torch.equal(tensor, _embedding(tmp_checkpoints(raw).parent, 4)[name]), name


def tmp_checkpoints(raw):
    return Path(raw["basic"]["output_dir"]) / raw["basic"]["run_name"] / "checkpoints"


def test_a_skipped_step_resumes_exactly(ti_config, monkeypatch):
    """A skipped step still takes its batch and noise, so a run stopped after it and resumed ends as one that
    was never stopped (the count of skips carries over too)."""
    from conjure.train.control import TrainControl

    def config(name):
        return parse_config(ti_config(basic={"max_train_steps": 6, "save_every_n_steps": 6, "run_name": name,
                                             "validate_every_n_steps": None}, validation={"at_start": False}))

    _losses_with(monkeypatch, {3})
    whole = train(config("whole"))
    _losses_with(monkeypatch, {3})
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 4 else None
    stopped = train(config("stopped"), control=control)
    assert stopped.status == "interrupted" and stopped.step == 4
    monkeypatch.undo()  # the resumed steps 5 and 6 are finite, as they were in the whole run
    resumed = train(config("stopped"), resume=str(stopped.run_dir))
    assert resumed.status == "completed"
    for name, tensor in _embedding(whole.run_dir, 6).items():
        assert torch.equal(tensor, _embedding(resumed.run_dir, 6)[name]), name
    assert _steps(resumed.run_dir)[-1]["skipped_steps"] == _steps(whole.run_dir)[-1]["skipped_steps"] == 1


def test_checkpointing_a_text_encoder_uses_transformers_current_call(ti_config, monkeypatch):
    """Issue 16: transformers 5.x renamed gradient_checkpointing_enable (the old name warns FutureWarning). A run
    that checkpoints a trained text encoder calls the new name: no warning, and the encoder's layers recompute."""
    import warnings

    import transformers.modeling_utils

    recomputed = []
    real = transformers.modeling_utils.checkpoint

    def checkpoint(*args, **kwargs):
        recomputed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", checkpoint)
    raw = ti_config(basic={"max_train_steps": 1, "validate_every_n_steps": None}, validation={"at_start": False},
                    advanced={"gradient_checkpointing": True})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable", category=FutureWarning)
        train(parse_config(raw))
    assert recomputed  # the text encoder (what textual inversion trains) was checkpointed


def test_a_stop_asked_after_the_processes_agreed_waits_for_the_next_step(ti_config, monkeypatch):
    """The loop saves and stops on what `agree_stop` answered, not on the stop flag read later: a signal landing
    just after the agreement (here: on the step-2 agreement's way out) is acted on at step 3 by every process
    alike. Acting on the flag at once made one process of a cancelled 2-process job save (a collective) and stop
    while the other stepped on: both hung."""
    import conjure.train.loop as loop
    from conjure.train.control import TrainControl

    def agree_then_signalled(accelerator, control):
        agreed = real(accelerator, control)
        if len(asked) == 1:
            control.request_stop("SIGTERM")
        asked.append(agreed)
        return agreed

    real, asked = loop.agree_stop, []
    monkeypatch.setattr(loop, "agree_stop", agree_then_signalled)
    control = TrainControl()
    raw = ti_config(basic={"max_train_steps": 8, "save_every_n_steps": 100, "validate_every_n_steps": None},
                    validation={"at_start": False})
    result = train(parse_config(raw), control=control)
    assert asked == [False, False, True]
    assert result.status == "interrupted" and result.step == 3
    assert sorted(p.name for p in tmp_checkpoints(raw).iterdir()) == ["step-000003"]
