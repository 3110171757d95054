"""The denoising loss: DDPM forward process, epsilon or v-prediction target (read from the model's own
scheduler config unless overridden), latents scaled by the VAE's own factor; optional min-SNR weighting,
noise offset and per-pixel loss masks.

All randomness comes from one CPU `torch.Generator` owned by the loop, so runs are reproducible on any
device and a resumed run draws exactly the noise an uninterrupted one would have. The draws per call are,
in order: the noise, the timesteps, and (only when `noise_offset > 0`) the offset; a run without the
offset therefore draws exactly what it always did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


class BatchGenerator(torch.Generator):
    """The run's noise generator: seeded alike in every process of a run, and knowing this process's place in the
    global batch (`rank` of `world`). Per-sample draws (`draw_for_batch`) draw the numbers of the whole global
    batch and keep this process's rows, so N processes of batch b draw exactly what one process of batch N x b
    draws, and a run's result does not depend on how many processes ran it. A generator seeded per rank would
    throw no numbers away (they are a few KiB per step) but would make every process count a different run."""

    rank, world = 0, 1
    rows: int | None = None  # the current global micro-batch's sample count (MicroBatchSampler.rows); None: full

    def share(self) -> float:
        """What this process's loss (a mean over its rows) is multiplied by so that DDP's mean over the processes
        is the mean over the global batch's rows: its rows x world / rows. 1 for a full batch; for a bucket's
        short last batch the processes hold unequal shares (0 for a process that only holds a stand-in)."""
        if self.world == 1 or self.rows is None:
            return 1.0
        return len(range(self.rank, self.rows, self.world)) * self.world / self.rows


def draw_for_batch(generator: torch.Generator, draw: Callable[[int], torch.Tensor], batch: int) -> torch.Tensor:
    """`draw(n)` (n samples' random numbers, first dimension n) for this process's `batch` samples: the global
    batch's draw, rows rank, rank + world, ... (data/dataset.MicroBatchSampler gives rank r those examples).
    Every process draws the whole global micro-batch (`rows`, or `batch` x world when it is full), so the shared
    generator stays in step across processes and with one process, a bucket's short last batch included; a
    process whose share of a short batch is empty trains a stand-in example at weight 0 (`BatchGenerator.share`)
    and takes the first rows."""
    world = getattr(generator, "world", 1)
    if world == 1:
        return draw(batch)
    drawn = draw(getattr(generator, "rows", None) or batch * world)
    kept = drawn[getattr(generator, "rank", 0) :: world]
    return kept if len(kept) == batch else drawn[:batch]


def evenly_spread(bands: int, per_band: int) -> list[torch.Tensor]:
    """`bands` consecutive groups of `per_band` points spread evenly over [0, 1), each in the middle of its share:
    the held-out loss's fixed noise levels, as fractions of the schedule."""
    count = bands * per_band
    return list(((torch.arange(count, dtype=torch.float64) + 0.5) / count).split(per_band))


def encode_latents(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents with the scale the UNet was trained on."""
    return sample_latents(vae, *vae_posterior(vae, pixels), generator)


def placed(model: Any) -> torch.Tensor:
    """A parameter of `model`, for where and in what dtype it runs: train/setup.place_model puts each model whole
    on one device in one dtype, while diffusers' `ModelMixin.device` / `.dtype` walk every submodule at each call
    (group-offload hooks, modules kept in float32): 0.3 ms each on the tiny VAE, at every step."""
    return next(model.parameters())


def vae_posterior(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) of the VAE's latent distribution for pixels in [-1, 1] (what the latent cache keeps)."""
    weight = placed(vae)
    posterior = vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(vae: Any, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A latent drawn from (mean, std) with `generator`, shifted and scaled by the VAE's own factors."""
    noise = draw_for_batch(
        generator, lambda n: torch.randn((n, *mean.shape[1:]), generator=generator, dtype=torch.float32), mean.shape[0]
    )
    return scaled_latents(vae, mean + std * noise.to(mean.device, mean.dtype))


def scaled_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents shifted and scaled by the VAE's own factors, as the denoiser reads them."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def resolve_prediction_type(scheduler: Any, prediction_type: str | None = None) -> str:
    """What the UNet predicts: `prediction_type` when it names one, else (None / "auto") the scheduler's."""
    kind = scheduler.config.prediction_type if prediction_type in (None, "auto") else prediction_type
    if kind not in PREDICTION_TYPES:
        source = "the model's scheduler config" if prediction_type in (None, "auto") else "prediction_type"
        raise ValueError(f"unsupported prediction_type {kind!r} in {source} (expected epsilon or v_prediction)")
    return kind


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """The noise (epsilon) or the velocity (v-prediction); `prediction_type` None/"auto": the scheduler's."""
    kind = resolve_prediction_type(scheduler, prediction_type)
    if kind == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of each timestep, float32, on timesteps' device."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alphas / (1 - alphas)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, as diffusers' train scripts compute them):
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction. A zero-SNR timestep
    (zero-terminal-SNR schedules) gets the epsilon weight's limit, 1."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    return torch.where(ratio > 0, clipped / ratio.clamp(min=torch.finfo(ratio.dtype).tiny), torch.ones_like(ratio))


def _mask_to(mask: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """A [B, 1, H, W] (or [B, H, W]) weight mask resized to the error's [h, w] and placed on its device."""
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != error.shape[0]:
        raise ValueError(f"mask must be [batch, 1, height, width] with batch {error.shape[0]}, got {tuple(mask.shape)}")
    mask = mask.to(error.device, torch.float32)
    size = tuple(error.shape[-2:])
    if tuple(mask.shape[-2:]) != size:
        shrinking = mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]
        if shrinking:  # area: each latent pixel gets the mean weight of the pixels it covers
            mask = F.interpolate(mask, size=size, mode="area")
        else:
            mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    return mask


def denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    unet_kwargs: dict[str, Any],
    generator: torch.Generator,
    *,
    prediction_type: str | None = None,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the target, at random timesteps.

    `prediction_type`: None/"auto" reads the scheduler config; "epsilon"/"v_prediction" override it.
    `min_snr_gamma`: weight each sample by the min-SNR-gamma weight (5.0 is the usual value).
    `noise_offset`: add `offset * randn(B, C, 1, 1)` to the noise (Crosslabs' offset noise); drawn after the
    timesteps, so noise and timesteps are the same as without it.
    `mask`: per-pixel weights [B, 1, H, W] in [0, 1] at image or latent resolution; each sample's loss is
    sum(w * err) / sum(w) (a sample whose mask is all zero contributes 0).
    `weights`: a [B] loss weight per sample (a source's `loss_weight`), multiplying its loss before the batch
    mean, so a weight of 2 counts a sample twice (kohya's convention); all ones is the same as None.
    With none of the options the result is exactly the plain MSE over the whole batch.
    """
    batch, rest = latents.shape[0], latents.shape[1:]
    noise = draw_for_batch(generator, lambda n: torch.randn((n, *rest), generator=generator), batch)
    timesteps = draw_for_batch(
        generator, lambda n: torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator), batch
    )
    if noise_offset > 0:
        offset = draw_for_batch(
            generator, lambda n: torch.randn((n, rest[0], *([1] * (latents.ndim - 2))), generator=generator), batch
        )
        noise = noise + noise_offset * offset
    return noised_loss(unet, scheduler, latents, noise, timesteps, unet_kwargs, prediction_type=prediction_type,
                       min_snr_gamma=min_snr_gamma, mask=mask, weights=weights)


def noised_loss(
    unet: Any, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
    unet_kwargs: dict[str, Any], *, prediction_type: str | None = None, min_snr_gamma: float | None = None,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`denoising_loss` at given `noise` and `timesteps` (drawn by it; fixed by the held-out loss,
    conjure.train.heldout)."""
    noise = noise.to(latents.device, latents.dtype)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **unet_kwargs).sample
    # The four-argument call is kept for the scheduler's own type: the learning tests patch this function.
    override = {} if prediction_type in (None, "auto") else {"prediction_type": prediction_type}
    target = diffusion_target(scheduler, latents, noise, timesteps, **override)
    snr_weights = None
    if min_snr_gamma is not None:
        kind = resolve_prediction_type(scheduler, prediction_type)
        snr_weights = min_snr_weights(scheduler, timesteps, min_snr_gamma, kind)
    return weighted_mse(prediction, target, mask=mask, weights=weights, sample_weights=snr_weights)


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's mean squared error, computed in float32, as every objective weights it: `mask` per pixel (each
    sample's error is sum(w * err) / sum(w)), `sample_weights` [B] from the objective (min-SNR, SD3 weighting), then
    `weights` [B] from the data (a source's `loss_weight`; all ones is the same as None). With none of them: exactly
    the plain MSE over the whole batch."""
    batch = target.shape[0]
    if weights is not None and tuple(weights.shape) != (batch,):
        raise ValueError(f"weights must be [batch] = [{batch}], got {tuple(weights.shape)}")
    if weights is not None and bool((weights == 1).all()):
        weights = None
    if sample_weights is None and mask is None and weights is None:
        return F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, error.ndim))
    if mask is None:
        per_sample = error.mean(dim=dims)
    else:
        pixel_weights = _mask_to(mask, error).expand_as(error)
        per_sample = (pixel_weights * error).sum(dim=dims) / pixel_weights.sum(dim=dims).clamp(min=1e-8)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
