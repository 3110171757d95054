"""Where the run trains, and what it keeps in RAM of its data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conjure.errors import ConjureError
from conjure.estimate.model import Term

if TYPE_CHECKING:
    from conjure.config import RunConfig
    from conjure.models.loading import LoadedModel


@dataclass(frozen=True)
class Where:
    """Where the run trains and in what precision: `cuda` (a CUDA GPU, this machine's or asked for with --gpu)."""

    cuda: bool
    precision: str
    source: str


def where(config: RunConfig, *, assume_gpu: bool = False) -> Where:
    from conjure.train.setup import resolve_precision

    adv = config.advanced
    if assume_gpu and not adv.cpu and not torch.cuda.is_available():
        precision = adv.mixed_precision if adv.mixed_precision != "auto" else "bf16"
        return Where(True, precision, "--gpu: a CUDA GPU with bf16 assumed" if adv.mixed_precision == "auto"
                     else "advanced.mixed_precision")
    fact = resolve_precision(adv.mixed_precision, cpu=adv.cpu)
    return Where(not adv.cpu and torch.cuda.is_available(), fact.value, fact.source)


def native_resolution(model: LoadedModel) -> int:
    """The model's own size, as loading settles it: the VAE config's sample_size (FLUX.1), else the UNet's times
    the VAE's downscale (loading._native_resolution)."""
    from conjure.models.loading import _native_resolution as unet_native

    size = model.vae.config.get("sample_size")
    if model.family.denoiser == "unet":
        return unet_native(model.unet, model.vae)
    return size if isinstance(size, int) else model.family.reference.resolution


def _images(config: RunConfig) -> tuple[int, int, list[str]]:
    """(distinct images, distinct captions) the data set holds, or (0, 0) and why, when it cannot be read now."""
    from conjure.data.sources import scan_sources

    try:
        examples = scan_sources(config.data.all_sources(), check_images=False).examples
    except ConjureError as exc:
        return 0, 0, [f"data set not read ({exc}): in-memory data and caches are left out"]
    captions = {ex.caption for ex in examples} | ({""} if config.data.caption_dropout > 0 else set())
    return len({ex.image for ex in examples}), len(captions), []


def data_terms(config: RunConfig, model: LoadedModel, conditioning: Any, resolution: int, frozen: torch.dtype
               ) -> tuple[list[Term], list[str]]:
    """What the run keeps in RAM of its data: decoded images (data.keep_in_memory: RGB bytes at the training
    size), the latent cache in memory (mean and std per image and flip, `train/caches.py`), the text cache (one
    `Conditioning.encode` result per caption, on the CPU)."""
    data = config.data
    images, captions, notes = _images(config)
    terms = []
    if data.keep_in_memory:
        terms.append(Term(f"decoded images ({images}, data.keep_in_memory)", images * resolution**2 * 3.0, "modelled"))
    if data.cache_latents == "memory":
        vae = model.vae.config
        side = resolution // 2 ** (len(vae.block_out_channels) - 1)
        flips = 2 if data.random_flip else 1
        size = torch.empty((), dtype=next(model.vae.parameters()).dtype).element_size()
        terms.append(Term(f"latent cache ({images} images x {flips} flip)",
                          images * flips * 2.0 * vae.latent_channels * side**2 * size, "counted"))
    if data.cache_text_encoder_outputs:
        encoded = conditioning.encode(model.text_encoders(), ["a photo"], torch.device("meta"))
        per_caption = sum(t.numel() for t in encoded.values()) * torch.empty((), dtype=frozen).element_size()
        terms.append(Term(f"text cache ({captions} captions)", float(captions * per_caption), "counted"))
    return terms, notes
