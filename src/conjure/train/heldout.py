"""The held-out validation loss: the training loss on images the run never trains on, at every validation.

Its images are `validation.holdout`'s share of the training images (`split`: spread evenly over the sources'
order, so the same images every run) and those of `validation.loss_images`. Each image is scored at fixed noise
levels spread evenly over the schedule (`Objective.spread`: `BANDS` bands of `PER_BAND` levels, DDPM timesteps or
flow sigmas) with fixed noise (drawn once from `SEED`), through the objective's own loss at those draws
(`Objective.loss_at`: epsilon, v-prediction or flow velocity, unweighted), so the figure moves only with the
weights: comparable across steps, and across runs on the same images. Each image's latent is its VAE posterior's
mean, encoded once (the VAE never trains), its caption as training reads it before dropout. kohya-ss/sd-scripts
measures the same kind of figure (docs/validation.md, main as read 2026-12-05: `--validation_split`, "the same random
seed is used for noise generation and timestep selection" at every validation); conjure's is per noise band too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conjure.errors import ConjureError

if TYPE_CHECKING:
    from conjure.data.dataset import TrainDataset
    from conjure.data.example import Example
    from conjure.train.objectives import Objective, Predict

BANDS, PER_BAND = 4, 2
SEED = 20260
"""Any fixed seed: the held-out noise, crops and caption shuffles are the same at every validation, in every run
(conjure.train.setup makes the held-out data set with it)."""


def split(examples: list[Example], share: float, loss_images: str | None
          ) -> tuple[list[Example], list[Example], list[tuple[Path, str]]]:
    """(the examples to train on, the held-out ones, the `loss_images` files skipped as unreadable). `share` of
    the distinct non-class images is held out (at least one), every (1 / share)-th in the sources' order, with
    every repeat of it; `loss_images` adds a source of its own."""
    from conjure.data.sources import scan_source

    held: list[Example] = []
    if share > 0:
        images = list(dict.fromkeys(example.image for example in examples if not example.is_class))
        count = max(1, int(len(images) * share))
        if count >= len(images):
            raise ConjureError(f"validation.holdout: {share} of {len(images)} image(s) leaves none to train on; "
                               "lower it, or use validation.loss_images")
        chosen = {images[int((i + 0.5) * len(images) / count)] for i in range(count)}
        held = list({example.image: example for example in examples if example.image in chosen}.values())
        examples = [example for example in examples if example.image not in chosen]
    skipped: list[tuple[Path, str]] = []
    if loss_images:
        scan = scan_source(Path(loss_images).expanduser())
        held, skipped = held + scan.examples, scan.skipped
    return examples, held, skipped


@dataclass
class HeldOutLoss:
    """The held-out images (a data set of their items at epoch 0, without caption dropout) and, once measured,
    each image's batch of `PER_BAND` copies, latents and noise (one per noise level)."""

    dataset: TrainDataset
    prepared: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def _prepare(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        from conjure.data.dataset import collate

        generator = torch.Generator().manual_seed(SEED)
        for index in range(len(self.dataset)):
            batch = collate([self.dataset[(0, index)]] * PER_BAND)
            latents = encode(batch["pixel_values"][:1])
            noise = torch.randn((BANDS * PER_BAND, *latents.shape[1:]), generator=generator)
            self.prepared.append((batch, latents.expand(PER_BAND, *latents.shape[1:]), noise))

    @torch.no_grad()
    def measure(self, objective: Objective, vae: Any, dtype: torch.dtype,
                predictor: Callable[[dict[str, Any]], Predict]) -> tuple[float, dict[str, float]]:
        """The mean loss over every image and level, and per band ("<lo>-<hi>": its mean). `vae` and `dtype`: the
        latents the denoiser reads (encoded once per image, at the first measure); `predictor`: a batch -> the
        denoiser's call for it, with the weights as they are now."""
        from conjure.train.loss import scaled_latents, vae_posterior

        if not self.prepared:
            self._prepare(lambda pixels: scaled_latents(vae, vae_posterior(vae, pixels)[0]).to(dtype))
        spread = objective.spread(BANDS, PER_BAND)
        sums = dict.fromkeys((name for name, _ in spread), 0.0)
        for batch, latents, noise in self.prepared:
            predict = predictor(batch)
            for (name, levels), band_noise in zip(spread, noise.split(PER_BAND)):
                sums[name] += float(objective.loss_at(predict, latents, band_noise, levels, mask=batch.get("mask")))
        bands = {name: total / len(self.prepared) for name, total in sums.items()}
        return sum(bands.values()) / len(bands), bands
