"""The denoising loss: DDPM forward process, epsilon or v-prediction target (read from the model's own
scheduler config), latents scaled by the VAE's own factor.

All randomness comes from one CPU `torch.Generator` owned by the loop, so runs are reproducible on any
device and a resumed run draws exactly the noise an uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def encode_latents(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents with the scale the UNet was trained on."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
    latents = posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config")


def denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    unet_kwargs: dict[str, Any],
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, at random timesteps."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **unet_kwargs).sample
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
