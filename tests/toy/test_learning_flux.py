"""Learning tests on the toy FLUX.1: a LoRA and a DoRA trained with the flow objective must teach the held-out
concept (a yellow star) and keep other prompts, as the SD tests do (tests/toy/test_learning.py); the same run
with the flow target reversed (x0 - e) or the latents left unshifted must fail the same criterion."""

from __future__ import annotations

import numpy as np
import pytest

from conjure.config import parse_config
from conjure.toy.evaluate import score
from conjure.toy.learning import fixed_noise_loss, generate, load_pipeline, readings
from conjure.toy.models import concept_caption, concept_scenes, toy_model
from conjure.toy.world import render
from conjure.train.loop import train

TRIGGER = "zwx"
CONTROL = "a large blue square in the center on a grey background"
PROBE = "a large {} in the center on a white background"
SEEDS = list(range(16))
STEPS, LR = 200, 3e-3  # tests/toy/test_learning.py's LoRA recipe


def train_flux_lora(tmp_path, *, dora=False, steps=STEPS):
    """The demo's recipe on the toy FLUX: 16 stars captioned with the trigger and 16 ordinary world images."""
    from conjure.demo import lora_demo_images

    raw = {
        "type": "lora",
        "basic": {"base_model": str(toy_model("flux")), "output_dir": str(tmp_path / "runs"), "run_name": "lora",
                  "max_train_steps": steps, "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(lora_demo_images(tmp_path / "lora-data", trigger=TRIGGER)), "batch_size": 8,
                 "random_flip": True},
        "lora": {"trigger_word": TRIGGER, "rank": 4, "dora": dora, "save_dtype": "fp32"},  # FLUX's preset
        "validation": {"at_start": False},
        "optimizer": {"learning_rate": LR},
        "advanced": {"max_grad_norm": None},
    }
    result = train(parse_config(raw))
    return result.checkpoints[-1] / "lora.safetensors"


def measure(path):
    """Concept share and loss with the trigger, the control prompt's colour and pixels, before and after merging
    the kohya file as ComfyUI does (conjure's reader: diffusers' kohya FLUX converter assumes FLUX.1's 19/38
    full-width blocks, STACK_NOTES)."""
    from conjure.export.convert import apply_lora
    from conjure.export.kohya import load_kohya
    from conjure.families import FLUX

    pipe = load_pipeline(toy_model("flux"))
    scenes = concept_scenes(8, seed=999)
    concept = [render(s) for s in scenes]

    def state():
        return {
            "yellow": score(readings(pipe, PROBE.format(TRIGGER), SEEDS), colour="yellow"),
            "loss": fixed_noise_loss(pipe, concept, [concept_caption(s, TRIGGER) for s in scenes]),
            "control": score(readings(pipe, CONTROL, SEEDS[:8]), colour="blue"),
            "pixels": np.asarray(generate(pipe, CONTROL, SEEDS[:4])[0], dtype=np.float64),
        }

    before = state()
    apply_lora({"transformer": pipe.transformer}, load_kohya(path, FLUX)[0])
    after = state()
    after["control_change"] = float(np.abs(after.pop("pixels") - before.pop("pixels")).mean())
    return before, after


def learned(before, after) -> bool:
    """The SD tests' criterion with the loss bar at 0.97x instead of 0.92x: the flow target e - x0 carries the
    noise itself, so the concept's share of the velocity error is smaller than of an epsilon error. Measured on
    this machine (rank 4, attention_mlp, 200 steps at 3e-3): yellow 0.06 -> 0.94 and loss 0.93x (LoRA), 0.93x
    (DoRA); other rates and lengths 0.91-0.96x; the sabotaged runs 11.9x (target x0 - e) and 7.4x (unshifted
    latents), yellow 0.06 and 0.0. With the `attention` preset alone the images turn yellow but the loss stays at
    1.0x: what the toy knows of shapes lives in the MLPs too."""
    return after["yellow"] >= before["yellow"] + 0.25 and after["loss"] <= 0.97 * before["loss"]


def barely_changed(before, after) -> bool:
    return after["control"] >= before["control"] - 0.125 and after["control_change"] < 20


@pytest.mark.slow
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_flux_lora_teaches_the_concept_and_keeps_other_prompts(dora, tmp_path):
    before, after = measure(train_flux_lora(tmp_path, dora=dora))
    print("flux", "dora" if dora else "lora", before, after)
    assert learned(before, after), (before, after)
    assert barely_changed(before, after), (before, after)


@pytest.mark.slow
def test_the_flux_criterion_fails_with_a_reversed_target(tmp_path, monkeypatch):
    import conjure.train.flow as flow

    with monkeypatch.context() as patch:  # sabotage training only, not the measurement
        patch.setattr(flow, "flow_target", lambda latents, noise: latents - noise)
        path = train_flux_lora(tmp_path)
    before, after = measure(path)
    print("flux, target x0 - e", before, after)
    assert not learned(before, after)


@pytest.mark.slow
def test_the_flux_criterion_fails_with_unshifted_latents(tmp_path, monkeypatch):
    import conjure.train.loss as loss

    real = loss.sample_latents

    def unshifted(vae, mean, std, generator):
        return real(vae, mean, std, generator) + vae.config.shift_factor * vae.config.scaling_factor

    with monkeypatch.context() as patch:
        patch.setattr(loss, "sample_latents", unshifted)
        path = train_flux_lora(tmp_path)
    before, after = measure(path)
    print("flux, latents without the shift", before, after)
    assert not learned(before, after)
