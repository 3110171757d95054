"""Rectified-flow (flow-matching) training math, as FLUX.1 is trained: x_t = (1 - s) x0 + s e, target e - x0.

Sigma sampling, as the references draw it, but every draw from the loop's CPU `torch.Generator` (diffusers'
`compute_density_for_timestep_sampling` and kohya's `get_noisy_model_input_and_timesteps` use the global RNG
unless handed one, which would break exact resume):
- `logit_normal` (default): s = sigmoid(N(logit_mean, logit_std)), the SD3 paper's lognorm(m, s) (section 3.1)
  and diffusers' density `u`. conjure uses the draw as the noise level itself, continuous, as kohya's
  `sigmoid`/`shift` do; diffusers' scripts instead look `u` up in the scheduler's descending sigma table
  (sigma ~ 1 - u, 1000 steps), which flips the sign of `logit_mean`.
- `sigmoid`: s = sigmoid(N(0, 1)) (kohya, from XLabs' x-flux; `sigmoid_scale` 1).
- `uniform`: s ~ U(0, 1).
- `shift`: s = sigmoid(N(0, 1)) moved towards noise by the resolution-dependent shift that FLUX.1 samples
  with: mu = FluxPipeline's `calculate_shift` of the image's packed sequence length between the scheduler's
  (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), then s' = e^mu / (e^mu + 1/s - 1)
  (kohya's `flux_shift`, the scheduler's `time_shift` "exponential" with sigma 1).

Loss weighting (diffusers' `compute_loss_weighting_for_sd3`): `none` 1, `sigma_sqrt` s^-2, `cosmap`
2 / (pi (1 - 2 s + 2 s^2)). Packing (FluxPipeline's `_pack_latents`/`_unpack_latents`): [B, C, H, W] latents
become [B, (H/2)(W/2), 4C] tokens of 2x2 patches; image position ids are (0, row, column) per patch, text ids
zeros (`_prepare_latent_image_ids`, `encode_prompt`).

Draws per call of `FlowObjective.loss`, in order: the noise, then the sigmas (one normal or uniform per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from conjure.train.loss import draw_for_batch, evenly_spread, weighted_mse

SAMPLINGS = ("logit_normal", "sigmoid", "uniform", "shift")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ShiftSchedule:
    """The resolution-dependent shift of FlowMatchEulerDiscreteScheduler's config (FLUX.1-dev's values)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def of(cls, scheduler_config: Any) -> ShiftSchedule:
        """Read from a scheduler config (a diffusers FrozenDict or any mapping); missing keys keep FLUX's."""
        get = scheduler_config.get
        return cls(
            float(get("base_shift", cls.base_shift)), float(get("max_shift", cls.max_shift)),
            int(get("base_image_seq_len", cls.base_image_seq_len)),
            int(get("max_image_seq_len", cls.max_image_seq_len)),
        )

    def mu(self, image_seq_len: int) -> float:
        """FluxPipeline's `calculate_shift`: linear in the packed image sequence length."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """e^mu / (e^mu + (1/s - 1)): FlowMatchEulerDiscreteScheduler's exponential `time_shift` with sigma 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_sigmas(
    generator: torch.Generator, batch: int, sampling: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
    schedule: ShiftSchedule | None = None, image_seq_len: int = 0,
) -> torch.Tensor:
    """`batch` noise levels in (0, 1), float32 on the CPU, drawn only from `generator` (see the module doc)."""
    if sampling == "uniform":
        return torch.rand((batch,), generator=generator)
    if sampling == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(batch,), generator=generator))
    sigmas = torch.sigmoid(torch.randn((batch,), generator=generator))
    if sampling == "sigmoid":
        return sigmas
    if sampling == "shift":
        return time_shift((schedule or ShiftSchedule()).mu(image_seq_len), sigmas)
    raise ValueError(f"unknown timestep sampling {sampling!r} (expected one of {', '.join(SAMPLINGS)})")


def loss_weighting(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights for `sigmas`, as diffusers' `compute_loss_weighting_for_sd3`."""
    if weighting == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if weighting == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"unknown loss weighting {weighting!r} (expected one of {', '.join(WEIGHTINGS)})")


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s e, with one s per sample."""
    s = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_t / d s = e - x0 that the transformer predicts."""
    return noise - latents


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent size (H, W): the inverse of `pack_latents`
    (FluxPipeline._unpack_latents, given latent rather than pixel sizes)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] RoPE ids (0, row, column) of the packed tokens of an [H, W] latent
    (FluxPipeline._prepare_latent_image_ids with the packed grid's size)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[length, 3] zeros: FLUX gives the text tokens no position in RoPE (FluxPipeline.encode_prompt)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


class FlowObjective:
    """The `Objective` of flow families: noise with the flow forward process, predict the velocity, MSE.

    `sampling` / `logit_mean` / `logit_std`: how sigmas are drawn (module doc); `weighting`: SD3 loss
    weighting; `schedule`: the scheduler's shift settings (used by `shift` sampling)."""

    def __init__(
        self, *, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
        weighting: str = "none", schedule: ShiftSchedule | None = None,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {sampling!r} (expected one of {', '.join(SAMPLINGS)})")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r} (expected one of {', '.join(WEIGHTINGS)})")
        self.sampling, self.logit_mean, self.logit_std = sampling, logit_mean, logit_std
        self.weighting, self.schedule = weighting, schedule or ShiftSchedule()

    def sigmas(self, generator: torch.Generator, latents: torch.Tensor) -> torch.Tensor:
        """One noise level per sample; `shift` reads the packed sequence length (H/2)(W/2) of `latents`."""
        h, w = latents.shape[-2:]
        return draw_for_batch(generator, lambda n: sample_sigmas(
            generator, n, self.sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
            schedule=self.schedule, image_seq_len=(h // 2) * (w // 2),
        ), latents.shape[0])

    def loss(
        self, predict: Predict, latents: torch.Tensor, generator: torch.Generator, *,
        mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE between `predict(x_t, s)` and e - x0; `mask` (per-pixel, [B, 1, H, W] at image or latent size)
        and `weights` ([B] per-sample) as `conjure.train.loss.denoising_loss` applies them. Plain MSE over the
        batch when neither is set and the weighting is `none`."""
        noise = draw_for_batch(
            generator, lambda n: torch.randn((n, *latents.shape[1:]), generator=generator), latents.shape[0]
        )
        sigmas = self.sigmas(generator, latents)
        sample_weights = None if self.weighting == "none" else loss_weighting(self.weighting, sigmas)
        return self.loss_at(predict, latents, noise, sigmas, mask=mask, weights=weights, sample_weights=sample_weights)

    def spread(self, bands: int, per_band: int) -> list[tuple[str, torch.Tensor]]:
        """Sigmas evenly over (0, 1) in `bands` bands named by their sigma range."""
        return [(f"{b / bands:.2f}-{(b + 1) / bands:.2f}", levels.float())
                for b, levels in enumerate(evenly_spread(bands, per_band))]

    def loss_at(
        self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, *,
        mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at given `noise` and sigmas (`levels`): drawn by `loss`, fixed by the held-out loss."""
        noise = noise.to(latents.device, latents.dtype)
        prediction = predict(noisy_latents(latents, noise, levels), levels.to(latents.device))
        target = flow_target(latents, noise)
        return weighted_mse(prediction, target, mask=mask, weights=weights, sample_weights=sample_weights)

    def sampler(self, scheduler: Any) -> Any:
        """Validation samples with the model's own flow-matching scheduler (FlowMatchEulerDiscreteScheduler, whose
        resolution-dependent shift FluxPipeline sets)."""
        return scheduler


def build_flow_objective(model: Any, settings: Any) -> FlowObjective:
    """The flow objective for a loaded model and the loop's settings (`advanced.timestep_sampling`,
    `logit_mean`, `logit_std`, `loss_weighting`); the shift settings come from the model's own scheduler."""
    scheduler = model.components.get("scheduler")
    config = scheduler.config if scheduler is not None else {}
    return FlowObjective(
        sampling=getattr(settings, "timestep_sampling", "logit_normal"),
        logit_mean=getattr(settings, "logit_mean", 0.0),
        logit_std=getattr(settings, "logit_std", 1.0),
        weighting=getattr(settings, "loss_weighting", "none"),
        schedule=ShiftSchedule.of(config),
    )
