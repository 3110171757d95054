"""Validation images: latents rendered under the run's autocast, decoded outside it in float32 (SDXL's VAE
overflows in fp16), the same images as the pipelines' own decoding in fp32, and basic.vae used."""

import numpy as np
import pytest
import torch

from conjure.models.loading import load_base_model
from conjure.train.validation import build_pipeline, decode_latents, render

SETTINGS = dict(prompts=["a photo of a dog"], seeds=[3], negative_prompt="", num_inference_steps=2,
                guidance_scale=2.0, resolution=64)


def pipeline(tiny_models, family):
    model = load_base_model(str(tiny_models(family)))
    return build_pipeline(model.family.pipeline_class, dict(model.components))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_images_are_the_pipelines_own_in_fp32(tiny_models, tmp_path, family):
    pipe = pipeline(tiny_models, family)
    paths, _ = render(pipe, tmp_path, **SETTINGS)
    own = pipe(SETTINGS["prompts"][0], num_inference_steps=2, guidance_scale=2.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(3)).images[0]
    from PIL import Image

    with Image.open(paths[0]) as ours:
        difference = np.abs(np.asarray(ours.convert("RGB"), dtype=int) - np.asarray(own, dtype=int))
    assert difference.max() <= 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_decoding_leaves_autocast_and_runs_in_fp32(tiny_models, tmp_path, family, monkeypatch):
    """A VAE that overflows under autocast (here: gives NaN whenever autocast is on, as the SDXL VAE does under
    CUDA fp16 autocast) still gives finite images: decode is called outside autocast, with float32 latents."""
    pipe = pipeline(tiny_models, family)
    vae, calls, decode = pipe.vae, [], pipe.vae.decode

    def overflowing_decode(latents, *args, **kwargs):
        calls.append((torch.is_autocast_enabled("cpu"), latents.dtype))
        out = decode(latents, *args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            (out[0] if isinstance(out, tuple) else out.sample).fill_(float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", overflowing_decode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        paths, _ = render(pipe, tmp_path, **SETTINGS)
    assert calls == [(False, torch.float32)]
    from PIL import Image

    with Image.open(paths[0]) as image:
        assert np.asarray(image.convert("RGB")).std() > 5  # not a flat black image


def test_decode_undoes_the_vaes_scaling_shift_and_per_channel_statistics():
    class Config:
        scaling_factor, shift_factor, latents_mean, latents_std = 0.5, 0.25, None, None

    class Identity(torch.nn.Module):
        config, dtype = Config(), torch.float32
        device = torch.device("cpu")

        def decode(self, z):
            return type("Out", (), {"sample": z})

    vae, latents = Identity(), torch.ones(1, 4, 2, 2, dtype=torch.bfloat16)
    assert torch.equal(decode_latents(vae, latents), torch.full((1, 4, 2, 2), 1 / 0.5 + 0.25))
    Config.latents_mean, Config.latents_std = [1.0, 2.0, 3.0, 4.0], [2.0] * 4  # SDXL pipeline's rule
    expected = torch.ones(1, 4, 2, 2) * 2.0 / 0.5 + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    assert torch.equal(decode_latents(vae, latents), expected)


@pytest.mark.parametrize("configured, family_default, expected", [(None, 7.5, 7.5), (None, 3.5, 3.5), (2.0, 3.5, 2.0)])
def test_validation_guidance_is_the_familys_unless_set(lora_config, configured, family_default, expected):
    """validation.guidance_scale null: the family's usual value (SD 7.5; FLUX.1-dev's distilled guidance 3.5,
    where SD's 7.5 would overcook every image); a set value wins."""
    from conjure.config import parse_config
    from conjure.families import FLUX, SD1
    from conjure.train.settings import LoopSettings

    raw = lora_config(validation={"seeds": [0], "guidance_scale": configured})
    settings = LoopSettings.of(parse_config(raw), resolution=64, mixed_precision="no", max_steps=1,
                               guidance_scale=family_default)
    assert settings.validation.guidance_scale == expected
    assert (SD1.guidance_scale, FLUX.guidance_scale) == (7.5, 3.5)
