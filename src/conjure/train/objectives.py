"""The seam between the training loop and a family's model: a conditioning and an objective per family.

A family record names both (`Family.conditioning`, `Family.objective`); the loop asks them, and never a family
name, for what a step needs:

- the **conditioning** turns captions into the text tensors the denoiser reads (`encode`, what the text cache
  keeps), gives the denoiser's call for a batch (`predictor`: SD's UNet with its hidden states and SDXL's
  size/crop ids; FLUX.1's transformer with packed latents, position ids, pooled text and guidance), and a
  validation prompt's pipeline arguments (`prompt_embeds`);
- the **objective** draws noise and a noise level from the run's generator, noises the latents, calls the
  predictor and returns the loss against its target (`loss`): "ddpm" (epsilon or v-prediction on the DDPM
  forward process, `conjure.train.loss`), "flow" (rectified flow, `conjure.train.flow`).

Adding a family with a known objective and another text side (Chroma: FLUX.1 with T5 only) is a record and a
conditioning class registered in `CONDITIONINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from conjure.models.loading import LoadedModel
    from conjure.train.conditioning import TextReading
    from conjure.train.settings import LoopSettings

# (noisy latents [B, C, H, W] in the VAE's latent layout, noise level [B] in the objective's units: DDPM timesteps
# or flow sigmas in [0, 1]) -> the denoiser's prediction, in the latents' layout
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Conditioning(Protocol):
    def encode(self, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-caption tensors, batch first, that depend on nothing but the caption (the text cache keeps them)."""
        ...

    def predictor(self, denoiser: Any, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device,
                  batch: dict[str, Any], text: dict[str, torch.Tensor] | None = None) -> Predict:
        """The denoiser's call for this batch; `text`: `encode`'s result for `captions` when at hand (a cache)."""
        ...

    def prompt_embeds(self, pairs: list[tuple[Any, Any]], prompt: str, negative: str,
                      device: torch.device) -> dict[str, Any]:
        """The pipeline call's keyword arguments for a validation prompt, encoded as training encodes captions."""
        ...

    def long_captions(self, pairs: list[tuple[Any, Any]], captions: list[str]) -> tuple[int, str]:
        """How many `captions` are cut off before the denoiser reads them, and that limit in words."""
        ...


class Objective(Protocol):
    def loss(self, predict: Predict, latents: torch.Tensor, generator: torch.Generator, *,
             mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Draw noise and noise levels from `generator` (CPU: all of a step's randomness comes from it, for exact
        resume), noise the latents, predict, and return the loss: per-pixel `mask` weights and per-sample
        `weights` as `conjure.train.loss.denoising_loss` applies them; the plain MSE when neither is given."""
        ...

    def sampler(self, scheduler: Any) -> Any:
        """The scheduler validation samples with, made from the model's own."""
        ...

    def spread(self, bands: int, per_band: int) -> list[tuple[str, torch.Tensor]]:
        """`bands` bands of `per_band` noise levels each, evenly over the schedule in the objective's units, each
        band with its name "<lo>-<hi>" (the held-out loss's fixed levels, conjure.train.heldout)."""
        ...

    def loss_at(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`loss` at the given noise and noise levels, unweighted (no min-SNR or SD3 weighting, no offset noise):
        the same figure whatever the run's weighting."""
        ...


class ClipConditioning:
    """SD 1.x, 2.x and SDXL: CLIP hidden states (and SDXL's pooled embedding and size/crop ids) into the UNet's
    cross-attention (`conjure.train.conditioning`). Empty captions encode as zeros where the family's pipeline
    does so (SDXL's `force_zeros_for_empty_prompt`), so caption dropout trains the unconditional input."""

    def __init__(self, reading: TextReading, resolution: int):
        self.reading, self.resolution = reading, resolution

    def encode(self, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        from conjure.train import conditioning

        return conditioning.encode_text(pairs, captions, device, zero_empty=True, reading=self.reading)

    def predictor(self, denoiser: Any, pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device,
                  batch: dict[str, Any], text: dict[str, torch.Tensor] | None = None) -> Predict:
        from conjure.train import conditioning

        kwargs = conditioning.encode_captions(
            pairs, captions, device, resolution=self.resolution, zero_empty=True,
            original_sizes=batch.get("original_size"), crops_top_left=batch.get("crop_top_left"),
            target_sizes=batch.get("target_size"), text=text, reading=self.reading,
        )
        return lambda noisy, t: denoiser(noisy, t, **kwargs).sample

    def prompt_embeds(self, pairs: list[tuple[Any, Any]], prompt: str, negative: str,
                      device: torch.device) -> dict[str, Any]:
        from conjure.train import conditioning

        return conditioning.prompt_embeds(pairs, prompt, negative, device, reading=self.reading)

    def long_captions(self, pairs: list[tuple[Any, Any]], captions: list[str]) -> tuple[int, str]:
        from conjure.train.setup import count_long_captions

        tokens = self.reading.max_tokens
        return count_long_captions(pairs[0][0], captions, tokens), f"data.max_token_length: {tokens} tokens"


def _as_unet(predict: Predict) -> Callable[[torch.Tensor, torch.Tensor], SimpleNamespace]:
    """`predict` as diffusers' UNet call (an output with `.sample`), which conjure.train.loss keeps: its tests and
    the toy pre-training call it with a UNet."""
    return lambda noisy, t: SimpleNamespace(sample=predict(noisy, t))


class DdpmObjective:
    """Epsilon or v-prediction on the model's DDPM forward process, with min-SNR weighting and offset noise
    (`conjure.train.loss.denoising_loss`, whose draws and result are the loop's from before this seam)."""

    def __init__(self, scheduler: Any, *, prediction_type: str, min_snr_gamma: float | None, noise_offset: float):
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.min_snr_gamma, self.noise_offset = min_snr_gamma, noise_offset

    def loss(self, predict: Predict, latents: torch.Tensor, generator: torch.Generator, *,
             mask: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        from conjure.train import loss

        return loss.denoising_loss(
            _as_unet(predict), self.scheduler, latents, {}, generator, prediction_type=self.prediction_type,
            min_snr_gamma=self.min_snr_gamma, noise_offset=self.noise_offset, mask=mask, weights=weights,
        )

    def spread(self, bands: int, per_band: int) -> list[tuple[str, torch.Tensor]]:
        from conjure.train.loss import evenly_spread

        steps = self.scheduler.config.num_train_timesteps
        return [(f"{b * steps // bands}-{(b + 1) * steps // bands - 1}", (levels * steps).long())
                for b, levels in enumerate(evenly_spread(bands, per_band))]

    def loss_at(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, *,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        from conjure.train import loss

        return loss.noised_loss(_as_unet(predict), self.scheduler, latents, noise, levels, {},
                                prediction_type=self.prediction_type, mask=mask)

    def sampler(self, scheduler: Any) -> Any:
        from conjure.train.validation import dpm_solver

        return dpm_solver(scheduler)


def _clip(model: LoadedModel, reading: TextReading, resolution: int, guidance: float) -> Conditioning:
    return ClipConditioning(reading, resolution)


def _ddpm(model: LoadedModel, settings: LoopSettings) -> Objective:
    return DdpmObjective(model.noise_scheduler, prediction_type=settings.prediction_type,
                         min_snr_gamma=settings.min_snr_gamma, noise_offset=settings.noise_offset)


def _flux(model: LoadedModel, reading: TextReading, resolution: int, guidance: float) -> Conditioning:
    from conjure.train.flux import build_flux_conditioning

    return build_flux_conditioning(model, guidance)


def _flow(model: LoadedModel, settings: LoopSettings) -> Objective:
    from conjure.train.flow import build_flow_objective

    return build_flow_objective(model, settings)


# builder(model, reading, training resolution, advanced.guidance): built before the model is placed, since text
# may be encoded ahead of training (conjure.train.text_ahead)
CONDITIONINGS: dict[str, Callable[[LoadedModel, TextReading, int, float], Conditioning]] = {
    "clip": _clip, "flux": _flux,
}
OBJECTIVES: dict[str, Callable[[LoadedModel, LoopSettings], Objective]] = {"ddpm": _ddpm, "flow": _flow}


def build_conditioning(model: LoadedModel, reading: TextReading, *, resolution: int, guidance: float) -> Conditioning:
    return CONDITIONINGS[model.family.conditioning](model, reading, resolution, guidance)


def build_objective(model: LoadedModel, settings: LoopSettings) -> Objective:
    return OBJECTIVES[model.family.objective](model, settings)
