"""Learning test of the full fine-tune: training every UNet weight on the yellow-star images (captioned with the
word "zwx" in place of "yellow star") teaches each toy model (SD 1.x, SD 2.x, SDXL) the concept, measured on the
diffusers folder the run saved, loaded as apps load a model; a broken trainer (latents left unscaled, SD 2.x's
v-prediction model trained against the epsilon target) does not pass the same criterion.

Measured at 2e-4, batch 8, "a zwx" over 16 seeds (SDXL: the caption form, as in test_learning.py): SD 1.x 80
steps: yellow 0.125 -> 0.5, concept loss 0.90x; SD 2.x 120 steps: 0.06 -> 0.5, 0.80x (80 steps: 0.06 -> 0.25, too
little); SDXL 120 steps: 0.5 -> 1.0, 0.91x (80 steps: 0.94, 0.95x; 80 at 3e-4: 0.88, 0.97x). A full fine-tune moves
every weight with Adam's sign-like first steps, so its rate is far below a LoRA's (3e-3 there): 1e-3 made SD 1.x's
concept loss rise (1.30x at 30 steps), 3e-4 for 40 steps left it at 0.98x.

The SD 1.x fine-tune (trained once per module) extracted as a rank-16 LoRA (`conjure lora extract`'s code) and
loaded by diffusers keeps its learning: yellow 0.4375, 103% of the loss gain; written without the alpha/rank scale
it keeps 29% and fails (figures in the README, "LoRA tools").
"""

from __future__ import annotations

import pytest

from conjure.config import parse_config
from conjure.toy.evaluate import score
from conjure.toy.learning import fixed_noise_loss, load_pipeline, readings
from conjure.toy.models import concept_caption, concept_scenes, toy_model, write_concept_set
from conjure.toy.world import render
from conjure.train.loop import train

TRIGGER, LR = "zwx", 2e-4
STEPS = {"sd1": 80, "sd2": 120, "sdxl": 120}
PROBE = {"sd1": "a {}", "sd2": "a {}", "sdxl": "a large {} in the center on a white background"}
EXTRACT_RANK = 16
SEEDS = list(range(16))


def train_finetune(variant, tmp_path):
    steps = STEPS[variant]
    raw = {
        "type": "finetune",
        "basic": {"base_model": str(toy_model(variant)), "output_dir": str(tmp_path / "runs"), "run_name": "finetune",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(write_concept_set(tmp_path / "concept", TRIGGER)), "batch_size": 8,
                 "random_flip": True},
        "finetune": {"save_dtype": "fp32", "output_name": "model"},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LR},
        "advanced": {"max_grad_norm": None},
    }
    return train(parse_config(raw)).checkpoints[-1] / "model"


def measure(variant, model_dir, lora=None):
    pipe = load_pipeline(model_dir)
    if lora is not None:
        pipe.load_lora_weights(str(lora))  # diffusers' own reader, as apps load the file
    scenes = concept_scenes(8, seed=999)  # unseen images of the concept
    return {
        "yellow": score(readings(pipe, PROBE[variant].format(TRIGGER), SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, TRIGGER) for s in scenes]),
    }


@pytest.fixture(scope="module")
def base_scores():
    """variant -> the base model's measure, taken once per module."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = measure(variant, toy_model(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def before(base_scores):
    return base_scores("sd1")


def learned(before, after) -> bool:
    return after["yellow"] >= before["yellow"] + 0.25 and after["loss"] <= 0.95 * before["loss"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The SD 1.x fine-tune, trained once for this module's tests."""
    return train_finetune("sd1", tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def after(finetuned):
    return measure("sd1", finetuned)


@pytest.mark.slow
def test_finetune_teaches_the_concept(before, after):
    print("finetune", before, after)
    assert learned(before, after), (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd2", "sdxl"])
def test_finetune_teaches_the_concept_to_sd2_and_sdxl(base_scores, variant, tmp_path):
    before, after = base_scores(variant), measure(variant, train_finetune(variant, tmp_path))
    print("finetune", variant, before, after)
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
    lora = measure("sd1", toy_model("sd1"), lora=path)
    print("extracted", sabotage, before, after, lora)
    assert kept(before, after, lora) != bool(sabotage), (before, after, lora)


def unscaled_latents(patch):
    import conjure.train.loss as loss

    real = loss.encode_latents
    patch.setattr(loss, "encode_latents", lambda vae, pixels, generator: real(vae, pixels, generator)
                  / vae.config.scaling_factor)


def epsilon_target(patch):
    """SD 2.x's v-prediction model trained against the epsilon target."""
    import conjure.train.loss as loss

    patch.setattr(loss, "diffusion_target", lambda scheduler, latents, noise, timesteps: noise)


@pytest.mark.slow
@pytest.mark.parametrize("variant, sabotage", [("sd1", unscaled_latents), ("sd2", epsilon_target),
                                               ("sdxl", unscaled_latents)], ids=["sd1-unscaled", "sd2-epsilon",
                                                                                  "sdxl-unscaled"])
def test_the_finetune_criterion_fails_on_a_broken_trainer(base_scores, variant, sabotage, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # sabotage training only, not the measurement
        sabotage(patch)
        folder = train_finetune(variant, tmp_path)
    before, after = base_scores(variant), measure(variant, folder)
    print("finetune, broken", variant, sabotage.__name__, before, after)
    assert not learned(before, after)
