"""Measure whether training taught something, on the toy models: generate with a pipeline and read the
images back with the evaluator; and the denoising loss of a prompt on given images at fixed noise.

Used by the learning tests (tests/toy/test_learning.py) and the demo; any method's result can be loaded
into a diffusers pipeline with the apps' loaders and measured the same way.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conjure.toy.evaluate import Reading, read_scene


def load_pipeline(model_dir: Path) -> Any:
    """A diffusers pipeline of a toy model in float32 with a few-step multistep sampler where its scheduler
    allows one (DDPM models; a flow-matching model keeps its own Euler sampler)."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(str(model_dir))
    cls = getattr(diffusers, index["_class_name"])
    kwargs = {"safety_checker": None} if "safety_checker" in index else {}
    pipe = cls.from_pretrained(str(model_dir), torch_dtype=torch.float32, **kwargs)
    if diffusers.DPMSolverMultistepScheduler in pipe.scheduler.compatibles:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, prompt: str, seeds: list[int], *, steps: int = 20, guidance: float = 4.0) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    extra = {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        # a T5-reading pipeline pads to max_sequence_length (FluxPipeline: 512) with no attention mask: read the
        # prompt at the length the model was trained with (the toy FLUX: its T5 tokenizer's 16)
        extra["max_sequence_length"] = pipe.tokenizer_2.model_max_length
    return pipe(
        [prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
        height=64, width=64, **extra,
    ).images


def readings(pipe: Any, prompt: str, seeds: list[int], **kwargs: Any) -> list[Reading]:
    return [read_scene(image) for image in generate(pipe, prompt, seeds, **kwargs)]


@torch.no_grad()
def fixed_noise_loss(
    pipe: Any, images: list[Image.Image], prompt: str | list[str], *, seed: int = 0, repeats: int = 4
) -> float:
    """Mean denoising loss of `prompt` (one for all, or one per image) on `images` at noise and timesteps
    fixed by `seed`: lower means the prompt describes the images better to the model."""
    if getattr(pipe, "transformer", None) is not None:
        return fixed_noise_flow_loss(pipe, images, prompt, seed=seed, repeats=repeats)
    from diffusers import DDPMScheduler

    from conjure.train.conditioning import encode_captions
    from conjure.train.loss import diffusion_target

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    texts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
    cond = encode_captions(pairs, texts, latents.device, resolution=64)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(50, 950, (len(images),), generator=g)
        pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, **cond).sample
        losses.append(torch.nn.functional.mse_loss(pred, diffusion_target(scheduler, latents, noise, t)).item())
    return float(np.mean(losses))


@torch.no_grad()
def fixed_noise_flow_loss(
    pipe: Any, images: list[Image.Image], prompt: str | list[str], *, seed: int = 0, repeats: int = 4
) -> float:
    """`fixed_noise_loss` of a flow-matching pipeline (FluxPipeline): the velocity error at noise levels fixed by
    `seed` (sigmas in [0.05, 0.95]), the latents shifted and scaled by the VAE's factors, the transformer called
    through conjure's FLUX conditioning at the T5 length the model reads (its tokenizer's) and guidance 1."""
    from conjure.train.flow import flow_target, noisy_latents
    from conjure.train.flux import FluxConditioning

    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    config = pipe.vae.config
    latents = (pipe.vae.encode(pixels).latent_dist.mean - (config.shift_factor or 0.0)) * config.scaling_factor
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    conditioning = FluxConditioning(t5_tokens=pipe.tokenizer_2.model_max_length, guidance=1.0)
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    predict = conditioning.predictor(pipe.transformer, pairs, prompts, latents.device, {})
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(repeats):
        noise = torch.randn(latents.shape, generator=g)
        sigmas = 0.05 + 0.9 * torch.rand(len(images), generator=g)
        pred = predict(noisy_latents(latents, noise, sigmas), sigmas)
        losses.append(torch.nn.functional.mse_loss(pred, flow_target(latents, noise)).item())
    return float(np.mean(losses))
