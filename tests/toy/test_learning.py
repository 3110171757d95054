"""Learning tests: training must *teach* the toy base models a held-out concept (a yellow star).

A wrong loss target (epsilon vs v), latents left unscaled, or a gradient that never reaches the token all
still "run"; these tests fail on them (the sabotage tests below check that the criteria can fail).
"""

from __future__ import annotations

import numpy as np
import pytest

from conjure.config import parse_config
from conjure.toy.evaluate import score
from conjure.toy.learning import fixed_noise_loss, generate, load_pipeline, readings
from conjure.toy.models import concept_caption, concept_scenes, toy_model
from conjure.toy.world import render
from conjure.train.loop import train

TOKEN, INITIALIZER = "<yellow-star>", "circle"
SEEDS = list(range(16))
VECTORS, LR = 1, 5e-3


def concept_folder(tmp_path):
    """Images of the concept with world-style captions in which the token stands for "yellow star"."""
    folder = tmp_path / "concept"
    folder.mkdir()
    for i, scene in enumerate(concept_scenes(16, seed=123)):
        render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(concept_caption(scene))
    return folder


def train_ti(variant, tmp_path, steps=300):
    raw = {
        "type": "sd_textual_inversion",
        "basic": {"base_model": str(toy_model(variant)), "output_dir": str(tmp_path / "runs"), "run_name": "ti",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(concept_folder(tmp_path)), "batch_size": 8, "random_flip": True},
        "textual_inversion": {"placeholder_token": TOKEN, "initializer": INITIALIZER, "num_vectors": VECTORS},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LR},
        "advanced": {"max_grad_norm": None},
    }
    result = train(parse_config(raw))
    return result.checkpoints[-1] / "yellow-star.safetensors"


def measure(variant, embedding):
    """Yellow share and concept loss with the token, before (initializer) and after training."""
    pipe = load_pipeline(toy_model(variant))
    scenes = concept_scenes(8, seed=999)  # unseen images of the concept, with the training captions' form
    concept = [render(s) for s in scenes]
    control = np.asarray(generate(pipe, "a red circle on a white background", SEEDS[:4])[0])
    before = {
        "yellow": score(readings(pipe, f"a {INITIALIZER}", SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, concept, [concept_caption(s, INITIALIZER) for s in scenes]),
    }
    pipe.load_textual_inversion(str(embedding), token=TOKEN)
    after = {
        "yellow": score(readings(pipe, f"a {TOKEN}", SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, concept, [concept_caption(s, TOKEN) for s in scenes]),
    }
    unchanged = np.array_equal(control, np.asarray(generate(pipe, "a red circle on a white background", SEEDS[:4])[0]))
    return before, after, unchanged


def learned(before, after) -> bool:
    return after["yellow"] >= before["yellow"] + 0.25 and after["loss"] <= 0.92 * before["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_textual_inversion_teaches_the_concept(variant, tmp_path):
    before, after, unchanged = measure(variant, train_ti(variant, tmp_path))
    print(variant, before, after)
    assert learned(before, after), (before, after)
    assert unchanged  # prompts without the token are bit-identical


@pytest.mark.slow
def test_the_learning_criterion_fails_with_a_wrong_target(tmp_path, monkeypatch):
    """v-prediction model trained against the epsilon target: runs fine, teaches nothing useful."""
    import conjure.train.loss as loss

    with monkeypatch.context() as patch:  # sabotage training only, not the measurement
        patch.setattr(loss, "diffusion_target", lambda scheduler, latents, noise, timesteps: noise)
        embedding = train_ti("sd2", tmp_path)
    before, after, _ = measure("sd2", embedding)
    print("wrong target", before, after)
    assert not learned(before, after)


@pytest.mark.slow
def test_the_learning_criterion_fails_with_unscaled_latents(tmp_path, monkeypatch):
    import conjure.train.loss as loss

    real = loss.encode_latents

    def unscaled(vae, pixels, generator):
        return real(vae, pixels, generator) / vae.config.scaling_factor

    with monkeypatch.context() as patch:
        patch.setattr(loss, "encode_latents", unscaled)
        embedding = train_ti("sd1", tmp_path)
    before, after, _ = measure("sd1", embedding)
    print("unscaled", before, after)
    assert not learned(before, after)
