"""The held-out validation loss (conjure.train.heldout): which images are held out, the objectives' loss at fixed
draws (the training loss itself), and a run that logs it at every validation with the same draws every time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from conjure.config import dump_config, parse_config
from conjure.data.example import Example
from conjure.errors import ConjureError
from conjure.runs.folder import resume_changes
from conjure.train.flow import FlowObjective
from conjure.train.heldout import split
from conjure.train.objectives import DdpmObjective


def _examples(n: int, repeats: int = 1) -> list[Example]:
    return [Example(Path(f"{i}.png"), None) for i in range(n) for _ in range(repeats)] + [
        Example(Path("class.png"), "a dog", is_class=True)]


def test_holdout_takes_a_spread_share_of_the_images_with_every_repeat():
    train, held, skipped = split(_examples(10, repeats=2), 0.2, None)
    assert [e.image.name for e in held] == ["2.png", "7.png"] and skipped == []
    assert len(train) == 8 * 2 + 1 and not {e.image for e in held} & {e.image for e in train}
    assert split(_examples(10, repeats=2), 0.2, None) == (train, held, skipped)  # the same images every time
    assert len(split(_examples(3), 0.1, None)[1]) == 1  # at least one
    assert split(_examples(3), 0.0, None)[1] == []


def test_holdout_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(ConjureError, match="validation.holdout: 0.5 of 1 image"):
        split(_examples(1), 0.5, None)


def test_loss_images_are_a_source_of_their_own(image_folder):
    train, held, _ = split(_examples(4), 0.0, str(image_folder))
    assert len(train) == 5 and [e.image.name for e in held] == [f"{i}.png" for i in range(6)]


def _predict(noisy: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return noisy * 0.7 + levels.float().view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("objective", [
    DdpmObjective(DDPMScheduler(), prediction_type="epsilon", min_snr_gamma=None, noise_offset=0.0),
    DdpmObjective(DDPMScheduler(), prediction_type="v_prediction", min_snr_gamma=None, noise_offset=0.0),
    FlowObjective(sampling="uniform"),
], ids=["epsilon", "v_prediction", "flow"])
def test_loss_at_is_the_training_loss_at_the_same_draws(objective):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    trained = objective.loss(_predict, latents, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the training loss's draws: the noise, then the levels
    noise = torch.randn(latents.shape, generator=generator)
    if isinstance(objective, FlowObjective):
        levels = torch.rand((3,), generator=generator)
    else:
        levels = torch.randint(0, 1000, (3,), generator=generator)
    assert torch.equal(objective.loss_at(_predict, latents, noise, levels), trained)


def test_levels_spread_evenly_over_the_schedule_in_named_bands():
    ddpm = DdpmObjective(DDPMScheduler(), prediction_type="epsilon", min_snr_gamma=None, noise_offset=0.0)
    assert [(name, levels.tolist()) for name, levels in ddpm.spread(4, 2)] == [
        ("0-249", [62, 187]), ("250-499", [312, 437]), ("500-749", [562, 687]), ("750-999", [812, 937])]
    assert [(name, levels.tolist()) for name, levels in FlowObjective().spread(2, 2)] == [
        ("0.00-0.50", [0.125, 0.375]), ("0.50-1.00", [0.625, 0.875])]


def test_a_resume_cannot_change_the_holdout(ti_config, tmp_path):
    saved = parse_config(ti_config(validation={"holdout": 0.2}))
    (tmp_path / "config.yaml").write_text(dump_config(saved), encoding="utf-8")
    with pytest.raises(ConjureError, match="validation.holdout is 0.2 in the run, 0.4"):
        resume_changes(tmp_path / "config.yaml", parse_config(ti_config(validation={"holdout": 0.4})))
    changed = resume_changes(tmp_path / "config.yaml", parse_config(ti_config(
        validation={"holdout": 0.2, "loss_images": str(tmp_path)})))
    assert list(changed) == ["validation.loss_images"]


def _losses(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines) if e["event"] == "validation_loss"}


def test_a_run_logs_the_held_out_loss_at_every_validation(ti_config, run_config, image_folder, tmp_path, run_cli):
    extra = tmp_path / "extra"
    shutil.copytree(image_folder, extra)
    raw = ti_config(basic={"max_train_steps": 2, "save_every_n_steps": 1, "validate_every_n_steps": 1},
                    data={"random_flip": True, "center_crop": False, "caption_dropout": 0.5},
                    validation={"holdout": 0.34, "loss_images": str(extra), "num_inference_steps": 1})
    first = run_config(raw)
    start = json.loads((first.run_dir / "events.jsonl").read_text().splitlines()[0])
    assert start["images"] == 4  # two of the six held out
    losses = _losses(first.run_dir)
    assert sorted(losses) == [0, 1, 2] and {e["images"] for e in losses.values()} == {2 + 6}
    assert list(losses[0]["bands"]) == ["0-249", "250-499", "500-749", "750-999"]
    assert losses[0]["loss"] == pytest.approx(sum(losses[0]["bands"].values()) / 4)
    assert losses[2]["loss"] != losses[0]["loss"]  # the embedding moved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(first.run_dir / "logs"))
    board.Reload()
    assert [(s.step, s.value) for s in board.Scalars("validation/loss")] == [
        (step, pytest.approx(losses[step]["loss"], abs=1e-6)) for step in (0, 1, 2)]
    assert board.Scalars("validation/loss_750-999")[0].value == pytest.approx(losses[0]["bands"]["750-999"], abs=1e-6)
    # Another seed trains on other noise, crops, flips and dropped captions, but the held-out loss draws the same:
    # step 0 is the same figure.
    raw["basic"].update(run_name="other-seed", seed=11, max_train_steps=1)
    assert _losses(run_config(raw).run_dir)[0]["loss"] == losses[0]["loss"]
    code, out, _ = run_cli("runs", "score", first.run_dir)
    assert code == 0 and "0-249" in out and "suggested step:" in out
    saved = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    assert saved["validation"]["loss_images"] == str(extra.absolute())
