"""Learning test of the full fine-tune: training every UNet weight on the yellow-star images (captioned with the
word "zwx" in place of "yellow star") teaches the toy SD 1.x model the concept, measured on the diffusers folder
the run saved, loaded as apps load a model; with latents left unscaled the same run does not pass the criterion.

Measured (80 steps at 2e-4, batch 8): yellow 0.125 -> 0.5 for "a zwx" over 16 seeds, concept loss 0.90x. A full
fine-tune moves every weight with Adam's sign-like first steps, so its rate is far below a LoRA's (3e-3 there):
1e-3 made the concept loss rise (1.30x at 30 steps), 3e-4 for 40 steps left it at 0.98x.

The same fine-tune (trained once per module) extracted as a rank-16 LoRA (`conjure lora extract`'s code) and loaded
by diffusers keeps its learning: yellow 0.4375, 103% of the loss gain; written without the alpha/rank scale it
keeps 29% and fails (figures in the README, "LoRA tools").
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
EXTRACT_RANK = 16
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


def measure(model_dir, lora=None):
    pipe = load_pipeline(model_dir)
    if lora is not None:
        pipe.load_lora_weights(str(lora))  # diffusers' own reader, as apps load the file
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


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The fine-tune, trained once for this module's tests."""
    return train_finetune(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def after(finetuned):
    return measure(finetuned)


@pytest.mark.slow
def test_finetune_teaches_the_concept(before, after):
    print("finetune", before, after)
    assert learned(before, after), (before, after)


def kept(before, after, lora) -> bool:
    """The extracted LoRA keeps most of the fine-tune's learning: >= 70% of its loss gain, and its yellow share
    within 2 of 16 seeds of the fine-tune's."""
    gain = before["loss"] - after["loss"]
    return before["loss"] - lora["loss"] >= 0.7 * gain and lora["yellow"] >= after["yellow"] - 0.125


@pytest.mark.slow
@pytest.mark.parametrize("sabotage", [None, "no alpha/rank scale"])
def test_the_extracted_lora_keeps_the_finetunes_learning(before, after, finetuned, sabotage, tmp_path, monkeypatch):
    import dataclasses

    import conjure.tools.extract as extract_mod

    if sabotage:  # a writer that forgets the alpha/rank scale: every update 1/16 of its size
        real = extract_mod.extract_module

        def unscaled(diff, rank, energy):
            module, kept_energy = real(diff, rank, energy)
            return dataclasses.replace(module, alpha=1.0), kept_energy

        monkeypatch.setattr(extract_mod, "extract_module", unscaled)
    path = tmp_path / "extracted.safetensors"
    extract_mod.extract(str(toy_model("sd1")), str(finetuned), path, rank=EXTRACT_RANK, save_dtype="fp32")
    lora = measure(toy_model("sd1"), lora=path)
    print("extracted", sabotage, before, after, lora)
    assert kept(before, after, lora) != bool(sabotage), (before, after, lora)


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
