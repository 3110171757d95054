"""The loop's step bookkeeping: what advances the LR schedule."""

from accelerate.optimizer import AcceleratedOptimizer

from conjure.config import parse_config
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
