"""The first losses of a tiny deterministic run per method and family, pinned to 1e-5 (as torchtune pins its
recipes' first losses): a refactor that changes what training computes (data order, noise, timesteps,
conditioning, the loss, the optimizer step) fails here loudly, not later in a learning test's figures.

The values were recorded on CPU with one thread (tests/conftest.py); the tiny models' weights
(conjure.models.tiny, seed 0) are part of what they pin. A deliberate change of the maths updates
them in the same commit and says why; a move or rename must leave them alone."""

import json

import numpy as np
import pytest
from PIL import Image

from conjure.config import parse_config
from conjure.train.loop import train

STEPS = 4
TOKEN = "<zq-thing>"

PINNED = {  # (method, family): the losses of steps 1-4
    ("textual_inversion", "sd1"): [1.487130, 1.157346, 0.983210, 1.057947],
    ("lora", "sd1"): [1.479599, 1.153446, 0.927857, 0.956362],
    ("pivotal", "sd1"): [1.487130, 1.149015, 0.944151, 0.972632],
    ("textual_inversion", "sd2"): [0.534977, 0.712675, 0.876851, 0.145205],
    ("lora", "sd2"): [0.536983, 0.701851, 0.839110, 0.118626],
    ("pivotal", "sd2"): [0.534977, 0.705976, 0.840078, 0.115771],
    ("textual_inversion", "sdxl"): [1.263640, 1.204402, 1.040869, 1.060826],
    ("lora", "sdxl"): [1.261606, 1.183791, 0.939214, 0.891489],
    ("pivotal", "sdxl"): [1.263640, 1.181387, 0.952063, 0.905397],
}


@pytest.fixture(scope="module")
def pinned_images(tmp_path_factory):
    """Four fixed images with captions, made here so a change to other fixtures cannot move the pins."""
    folder = tmp_path_factory.mktemp("pinned-images")
    rng = np.random.default_rng(1234)
    for i in range(4):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        pixels[16:48, 8 + 4 * i:40 + 4 * i] = (240, 200, 20)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of a yellow square number {i}")
    return folder


def pinned_config(method: str, family: str, base_model, images, out_dir) -> dict:
    """A raw config of `method` on `family`'s tiny model: 4 steps of batch 1 at 64 px, no validation grid
    beyond the final one (1 seed, 1 denoising step)."""
    data = {
        "type": method,
        "basic": {"base_model": str(base_model), "family": family, "output_dir": str(out_dir), "run_name": "run",
                  "seed": 7, "max_train_steps": STEPS, "save_every_n_steps": STEPS, "validate_every_n_steps": None},
        "data": {"source": str(images), "resolution": 64, "batch_size": 1},
        "validation": {"seeds": [0], "num_inference_steps": 1, "guidance_scale": 1.0, "at_start": False},
    }
    if method in ("textual_inversion", "pivotal"):
        data["textual_inversion"] = {"placeholder_token": TOKEN, "initializer": "dog"}
    if method == "pivotal":
        data["textual_inversion"]["learning_rate"] = 0.05
    if method in ("lora", "pivotal"):
        # LoRA also trains the text encoder(s), so their adapters' path is pinned too.
        data["lora"] = {"rank": 4, "alpha": 4.0, "train_text_encoder": method == "lora"}
        data["data"]["caption_prefix"] = "zwx " if method == "lora" else ""
        data["optimizer"] = {"learning_rate": 0.02}
    else:
        data["optimizer"] = {"learning_rate": 0.05}
    return data


def step_losses(run_dir) -> list[float]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e.get("event") == "step"]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("method", ["textual_inversion", "lora", "pivotal"])
def test_first_losses_are_pinned(method, family, tiny_models, pinned_images, tmp_path):
    raw = pinned_config(method, family, tiny_models(family), pinned_images, tmp_path / "runs")
    result = train(parse_config(raw))
    losses = step_losses(result.run_dir)
    expected = PINNED[method, family]
    assert len(losses) == STEPS
    assert np.allclose(losses, expected, rtol=0, atol=1e-5), (
        f"the first {STEPS} losses of a tiny {method} run on {family} changed: got {losses}, pinned {expected}. "
        "A refactor changed the maths of training (data order, noise, timesteps, conditioning, loss or "
        "optimizer). If the change is intended, update PINNED in this file and say why in the commit."
    )
