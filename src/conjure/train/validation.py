"""Validation images: every prompt at fixed seeds, so one prompt/seed is comparable across steps.

Writes `validation/step-NNNNNN/<prompt index>-seed<seed>.png` and `grid.png` (rows: prompts, columns: seeds;
the names: conjure.runs.folder).
The pipeline is built from the training components (with the new tokens), sampling with the objective's choice
(`Objective.sampler`): for DDPM models a multistep DPM-Solver configured from the model's own scheduler
(prediction type, betas) so few steps give clean images; for flow models the model's own flow-matching Euler
scheduler.

The pipeline denoises under the run's autocast but stops at the latents: `decode_latents` decodes them
outside autocast in float32. Under fp16 autocast every convolution runs in fp16 whatever the weights' dtype,
and the SDXL VAE's decoder overflows there (black/NaN grids; kohya-ss/sd-scripts PR #2322,
diffusers#9844); the pipelines' own upcast does not fire because the VAE itself is float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conjure.files import atomic_write
from conjure.runs.folder import VALIDATION_GRID, validation_image_name


def dpm_solver(scheduler: Any) -> Any:
    """A multistep DPM-Solver configured from a DDPM model's scheduler (prediction type, betas): clean images in
    few steps."""
    import diffusers

    config = scheduler.config
    # Zero-terminal-SNR models sample from pure noise: "trailing" spacing starts at the last timestep
    # (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.3).
    spacing = {"timestep_spacing": "trailing"} if config.get("rescale_betas_zero_snr") else {}
    return diffusers.DPMSolverMultistepScheduler.from_config(config, **spacing)


def build_pipeline(family_pipeline_class: str, components: dict[str, Any],
                   sampler: Callable[[Any], Any] = dpm_solver) -> Any:
    """The family's pipeline over the training components, sampling with `sampler(the model's scheduler)` (the
    objective's choice: `Objective.sampler`)."""
    import diffusers

    cls = getattr(diffusers, family_pipeline_class)
    kwargs = dict(components, scheduler=sampler(components["scheduler"]))
    expected = set(cls._get_signature_keys(cls)[0])
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in expected:
            kwargs.setdefault(optional, None)
    if "requires_safety_checker" in expected:
        kwargs["requires_safety_checker"] = False
    pipe = cls(**{k: v for k, v in kwargs.items() if k in expected or k == "requires_safety_checker"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grid(images: list[list[Image.Image]]) -> Image.Image:
    rows, cols = len(images), len(images[0])
    w, h = images[0][0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            out.paste(image, (c * w, r * h))
    return out


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the UNet sees them -> images in [-1, 1], decoded outside autocast in float32 (in bfloat16 if
    the VAE is: bf16 has float32's range). Undoes the VAE config's scaling and shift, or SDXL-style
    per-channel latents_mean/latents_std where the config has them (as diffusers' SDXL pipeline does)."""
    config = vae.config
    with torch.autocast(latents.device.type, enabled=False):
        latents = latents.float()
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        dtype = vae.dtype if vae.dtype == torch.bfloat16 else torch.float32
        return vae.decode(latents.to(vae.device, dtype)).sample.float()


@torch.no_grad()
def render(
    pipe: Any,
    out_dir: Path,
    *,
    prompts: list[str],
    seeds: list[int],
    negative_prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    embed: Callable[[str, str], dict[str, torch.Tensor]] | None = None,
) -> tuple[list[Path], Path]:
    """`embed(prompt, negative_prompt)`: the pipeline's text inputs (`prompt_embeds`, ...), encoded as training
    encodes captions (a pipeline's own prompt encoding knows no clip skip or long captions); None: the
    pipeline encodes the prompts itself."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for p, prompt in enumerate(prompts):
        row = []
        for seed in seeds:
            texts = embed(prompt, negative_prompt) if embed else {"prompt": prompt,
                                                                 "negative_prompt": negative_prompt or None}
            latents = pipe(
                **texts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
            ).images
            if latents.ndim == 3:  # a transformer pipeline's packed tokens (FluxPipeline): back to [B, C, H, W]
                latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
            image = pipe.image_processor.postprocess(decode_latents(pipe.vae, latents), output_type="pil")[0]
            path = out_dir / validation_image_name(p, seed)
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
            row.append(image)
            paths.append(path)
        rows.append(row)
    grid_path = out_dir / VALIDATION_GRID
    atomic_write(grid_path, lambda tmp: grid(rows).save(tmp, format="PNG"))
    return paths, grid_path


def as_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
