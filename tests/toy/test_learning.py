"""Learning tests: training must *teach* the toy base models a held-out concept (a yellow star).

A wrong loss target (epsilon vs v), latents left unscaled, or a gradient that never reaches the token all
still "run"; these tests fail on them (the sabotage tests below check that the criteria can fail).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conjure.config import parse_config
from conjure.toy.evaluate import score
from conjure.toy.learning import fixed_noise_loss, generate, load_pipeline, readings
from conjure.toy.models import concept_caption, concept_scenes, toy_model, write_concept_set
from conjure.toy.world import render
from conjure.train.loop import train

TOKEN, INITIALIZER = "<yellow-star>", "circle"
SEEDS = list(range(16))
VECTORS, LR = 1, 5e-3
# What is generated to look for the concept. The SDXL toy model (two 32-wide encoders) answers a bare "a <word>"
# weakly after training (LoRA: yellow 0.12 -> 0.28 over 32 seeds for "a zwx") while the caption form it trained
# on turns fully yellow (0.5 -> 1.0), so it is measured with that form.
PROBE = {"sd1": "a {}", "sd2": "a {}", "sdxl": "a large {} in the center on a white background"}
# SDXL textual inversion: the token's loss levels off at 0.90x the initializer's from 200 steps at 1e-2 (also
# at 2e-2; 300 steps at 5e-3: 0.90x); SD 1.x/2.x reach 0.74-0.85x.
SDXL_TI_STEPS, SDXL_TI_LR = 200, 1e-2


def concept_folder(tmp_path):
    """Images of the concept with world-style captions in which the token stands for "yellow star"."""
    return write_concept_set(tmp_path / "concept", TOKEN)


def train_ti(variant, tmp_path, steps=300, lr=LR):
    raw = {
        "type": "textual_inversion",
        "basic": {"base_model": str(toy_model(variant)), "output_dir": str(tmp_path / "runs"), "run_name": "ti",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(concept_folder(tmp_path)), "batch_size": 8, "random_flip": True},
        "textual_inversion": {"placeholder_token": TOKEN, "initializer": INITIALIZER, "num_vectors": VECTORS},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": lr},
        "advanced": {"max_grad_norm": None},
    }
    result = train(parse_config(raw))
    return result.checkpoints[-1] / "yellow-star.safetensors"


def load_embedding(pipe, variant, path):
    """As diffusers loads an embedding file: SD 1.x/2.x by path; SDXL's file holds one tensor per encoder
    (`clip_l`, `clip_g`), which diffusers takes one encoder at a time."""
    if variant != "sdxl":
        pipe.load_textual_inversion(str(path), token=TOKEN)
        return
    from safetensors.torch import load_file

    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(
        state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


def on_the_base_model(measure_base):
    """`measure_base(variant, ...)` on the base model, taken once per arguments in a test process and copied out:
    every run of one family is measured against the same "before"."""
    cache = {}

    def get(*args):
        if args not in cache:
            cache[args] = measure_base(*args)
        return copy.deepcopy(cache[args])

    return get


CONTROL_TI = "a red circle on a white background"


@on_the_base_model
def before_ti(variant):
    pipe = load_pipeline(toy_model(variant))
    scenes = concept_scenes(8, seed=999)  # unseen images of the concept, with the training captions' form
    before = {
        "yellow": score(readings(pipe, PROBE[variant].format(INITIALIZER), SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, INITIALIZER) for s in scenes]),
    }
    return before, np.asarray(generate(pipe, CONTROL_TI, SEEDS[:4])[0])


def measure(variant, embedding):
    """Yellow share and concept loss with the token, before (initializer) and after training."""
    before, control = before_ti(variant)
    pipe = load_pipeline(toy_model(variant))
    scenes = concept_scenes(8, seed=999)
    load_embedding(pipe, variant, embedding)
    after = {
        "yellow": score(readings(pipe, PROBE[variant].format(TOKEN), SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, TOKEN) for s in scenes]),
    }
    unchanged = np.array_equal(control, np.asarray(generate(pipe, CONTROL_TI, SEEDS[:4])[0]))
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
def test_sdxl_textual_inversion_teaches_the_concept(tmp_path):
    """Both encoders' vectors, loaded per encoder as diffusers does. Prompts without the token staying
    bit-identical also says that diffusers pools the encoders where training did (at the first end-of-text
    token, which the toy models' configs name)."""
    before, after, unchanged = measure("sdxl", train_ti("sdxl", tmp_path, steps=SDXL_TI_STEPS, lr=SDXL_TI_LR))
    print("sdxl", before, after)
    assert learned(before, after), (before, after)
    assert unchanged


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


# --- LoRA and DoRA ------------------------------------------------------------------------------------
# A concept model learns from the concept's images *and* ordinary world images with their own captions (the
# regularisation users add so that prompts without the trigger keep their meaning). The trigger is a word the
# toy models do not tie to yellow (their baseline share of yellow for "a zwx" is <= 0.06).

TRIGGER = "zwx"
CONTROL = "a large blue square in the center on a grey background"
# 150 steps (2026-12-05): yellow +0.31 (sd2 DoRA, the closest) to +0.5, loss 0.81-0.90x, control pixels moved 3-9;
# 200 steps gained little more for a third more time (README, "The toy models: proof that training teaches")
LORA_STEPS, LORA_LR = 150, 3e-3


def lora_folder(tmp_path):
    from conjure.demo import lora_demo_images

    return lora_demo_images(tmp_path / "lora-data", trigger=TRIGGER)


def train_lora(variant, tmp_path, *, dora=False, steps=LORA_STEPS):
    raw = {
        "type": "lora",
        "basic": {"base_model": str(toy_model(variant)), "output_dir": str(tmp_path / "runs"), "run_name": "lora",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(lora_folder(tmp_path)), "batch_size": 8, "random_flip": True},
        "lora": {"trigger_word": TRIGGER, "rank": 4, "unet_targets": "attention", "dora": dora, "save_dtype": "fp32"},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LORA_LR},
        "advanced": {"max_grad_norm": None},
    }
    result = train(parse_config(raw))
    return result.checkpoints[-1] / "lora.safetensors"


def state(pipe, variant, word):
    """Concept share and loss with `word`, and the control prompt's colour and pixels."""
    scenes = concept_scenes(8, seed=999)
    return {
        "yellow": score(readings(pipe, PROBE[variant].format(word), SEEDS), colour="yellow"),
        "loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, word) for s in scenes]),
        "control": score(readings(pipe, CONTROL, SEEDS[:8]), colour="blue"),
        "pixels": np.asarray(generate(pipe, CONTROL, SEEDS[:4])[0], dtype=np.float64),
    }


@on_the_base_model
def base_state(variant, word):
    return state(load_pipeline(toy_model(variant)), variant, word)


def measure_lora(variant, path, *, dora):
    """`state` with the trigger before and after loading the file the way apps do (diffusers' loader; conjure's
    reader for kohya DoRA, which diffusers drops)."""
    from conjure.export.convert import apply_lora
    from conjure.export.kohya import load_kohya

    before = base_state(variant, TRIGGER)
    pipe = load_pipeline(toy_model(variant))
    if dora:
        components = {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
                      if getattr(pipe, name, None) is not None}
        apply_lora(components, load_kohya(path)[0])
    else:
        pipe.load_lora_weights(str(path))
    after = state(pipe, variant, TRIGGER)
    after["control_change"] = float(np.abs(after.pop("pixels") - before.pop("pixels")).mean())
    return before, after


def lora_learned(before, after) -> bool:
    return after["yellow"] >= before["yellow"] + 0.25 and after["loss"] <= 0.92 * before["loss"]


def barely_changed(before, after) -> bool:
    """The control prompt still draws what it says, and its pixels moved little (0-255 scale)."""
    return after["control"] >= before["control"] - 0.125 and after["control_change"] < 20


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_lora_teaches_the_concept_and_keeps_other_prompts(variant, dora, tmp_path):
    before, after = measure_lora(variant, train_lora(variant, tmp_path, dora=dora), dora=dora)
    print(variant, "dora" if dora else "lora", before, after)
    assert lora_learned(before, after), (before, after)
    assert barely_changed(before, after), (before, after)


@pytest.mark.slow
def test_the_lora_criterion_fails_with_a_wrong_target(tmp_path, monkeypatch):
    import conjure.train.loss as loss

    with monkeypatch.context() as patch:
        patch.setattr(loss, "diffusion_target", lambda scheduler, latents, noise, timesteps: noise)
        path = train_lora("sd2", tmp_path)
    before, after = measure_lora("sd2", path, dora=False)
    print("lora, wrong target", before, after)
    assert not lora_learned(before, after)


# --- Pivotal tuning (a LoRA and its own token) ----------------------------------------------------------
# The LoRA demo's data with "zwx" replaced by the new token in the concept's captions (the world images keep
# theirs). The token trains at its own rate for the first half, the LoRA throughout. Measured (150 steps),
# initializer word on the base model -> token with both files: yellow 0.06 -> 0.62 (sd1), 0.06 -> 0.81 (sd2),
# 0.44 -> 0.88 (sdxl); loss 0.82x, 0.74x, 0.87x; control pixels moved 11.2, 3.6, 4.8.

PIVOTAL_STEPS, EMBEDDING_LR, FREEZE_AFTER = 150, 1e-2, 0.5


def train_pivotal(variant, tmp_path, *, steps=PIVOTAL_STEPS):
    raw = {
        "type": "pivotal",
        "basic": {"base_model": str(toy_model(variant)), "output_dir": str(tmp_path / "runs"), "run_name": "pivotal",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(lora_folder(tmp_path)), "batch_size": 8, "random_flip": True},
        "textual_inversion": {"placeholder_token": TOKEN, "initializer": INITIALIZER, "replace_word": TRIGGER,
                              "learning_rate": EMBEDDING_LR, "freeze_after": FREEZE_AFTER},
        "lora": {"rank": 4, "unet_targets": "attention", "save_dtype": "fp32"},
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LORA_LR},
        "advanced": {"max_grad_norm": None},
    }
    folder = train(parse_config(raw)).checkpoints[-1]
    return folder / "pivotal.safetensors", folder / "yellow-star.safetensors"


def measure_pivotal(variant, lora, embedding):
    """Before: the base model with the initializer word. After: the LoRA and the embedding loaded into the
    pipeline as apps do, with the token. Alone: the embedding without the LoRA (its concept loss only)."""
    before = base_state(variant, INITIALIZER)
    pipe = load_pipeline(toy_model(variant))
    scenes = concept_scenes(8, seed=999)
    load_embedding(pipe, variant, embedding)
    alone = {"loss": fixed_noise_loss(pipe, [render(s) for s in scenes], [concept_caption(s, TOKEN) for s in scenes])}
    pipe.load_lora_weights(str(lora))
    after = state(pipe, variant, TOKEN)
    after["control_change"] = float(np.abs(after.pop("pixels") - before.pop("pixels")).mean())
    return before, after, alone


def token_learned(before, alone) -> bool:
    """The token itself carries the concept, not only the LoRA: with the embedding alone the concept's loss
    drops (measured 0.73-0.90x). A token that never trains stays at 1.0x while the LoRA alone still passes
    `learned` (sd1: yellow 0.06 -> 0.56, loss 0.84x), so `learned` cannot tell."""
    return alone["loss"] <= 0.95 * before["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_pivotal_tuning_teaches_the_concept_and_keeps_other_prompts(variant, tmp_path):
    before, after, alone = measure_pivotal(variant, *train_pivotal(variant, tmp_path))
    print(variant, "pivotal", before, after, alone)
    assert learned(before, after), (before, after)
    assert barely_changed(before, after), (before, after)
    assert token_learned(before, alone), (before, alone)


@pytest.mark.slow
def test_the_pivotal_token_criterion_fails_when_the_token_never_trains(tmp_path, monkeypatch):
    """The embedding frozen from step 0: the LoRA alone learns the concept, the token does not."""
    from conjure.methods.pivotal import PivotalTuning

    with monkeypatch.context() as patch:
        patch.setattr(PivotalTuning, "freeze_step", lambda self, max_steps: 0)
        files = train_pivotal("sd1", tmp_path)
    before, after, alone = measure_pivotal("sd1", *files)
    print("pivotal, token never trains", before, after, alone)
    assert not token_learned(before, alone)
