"""Learning test of the full fine-tune: training every UNet weight on the yellow-star images (captioned with the
word "zwx" in place of "yellow star") teaches the toy SD 1.x model the concept, measured on the diffusers folder
the run saved, loaded as apps load a model; with latents left unscaled the same run does not pass the criterion.

Measured (80 steps at 2e-4, batch 8): yellow 0.125 -> 0.5 for "a zwx" over 16 seeds, concept loss 0.90x. A full
fine-tune moves every weight with Adam's sign-like first steps, so its rate is far below a LoRA's (3e-3 there):
1e-3 made the concept loss rise (1.30x at 30 steps), 3e-4 for 40 steps left it at 0.98x.
"""

from __future__ import annotations

import pytest

from conjure.config import parse_config
from conjure.toy.evaluate import score
from conjure.toy.learning import fixed_noise_loss, load_pipeline, readings
from conjure.toy.models import concept_caption, concept_scenes, toy_model, write_concept_set
from conjure.toy.world import render
from conjure.train.loop import train

TRIGGER, STEPS, LR = "zwx", 80, 2e-4
SEEDS = list(range(16))


def train_finetune(tmp_path):
    raw = {
        "type": "finetune",
        "basic": {"base_model": str(toy_model("sd1")), "output_dir": str(tmp_path / "runs"), "run_name": "finetune",
                  "max_train_steps": STEPS, "save_every_n_steps": STEPS, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(write_concept_set(tmp_path / "concept", TRIGGER)), "batch_size": 8,
                 "random_flip": True},
        "finetune": {"save_dtype": "fp32", "output_name": "model"},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LR},
        "advanced": {"max_grad_norm": None},
    }
    return train(parse_config(raw)).checkpoints[-1] / "model"


def measure(model_dir):
    pipe = load_pipeline(model_dir)
    scenes = concept_scenes(8, seed=999)  # unseen images of the concept
    return {
        "yellow": score(readings(pipe, f"a {TRIGGER}", SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, TRIGGER) for s in scenes]),
    }


@pytest.fixture(scope="module")
def before():
    return measure(toy_model("sd1"))


def learned(before, after) -> bool:
    return after["yellow"] >= before["yellow"] + 0.25 and after["loss"] <= 0.95 * before["loss"]


@pytest.mark.slow
def test_finetune_teaches_the_concept(before, tmp_path):
    after = measure(train_finetune(tmp_path))
    print("finetune", before, after)
    assert learned(before, after), (before, after)


@pytest.mark.slow
def test_the_finetune_criterion_fails_with_unscaled_latents(before, tmp_path, monkeypatch):
    import conjure.train.loss as loss

    real = loss.encode_latents

    def unscaled(vae, pixels, generator):
        return real(vae, pixels, generator) / vae.config.scaling_factor

    with monkeypatch.context() as patch:
        patch.setattr(loss, "encode_latents", unscaled)
        folder = train_finetune(tmp_path)
    after = measure(folder)
    print("finetune, unscaled", before, after)
    assert not learned(before, after)
