"""Model families: the facts about SD 1.x, SD 2.x, SDXL and FLUX.1 that the rest of conjure needs, in one place.

Each family is one `Family` record (`families/sd1.py`, `sd2.py`, `sdxl.py`, `flux.py`; types in `record.py`):
text encoders and what the denoiser reads of them, the denoiser (UNet or transformer), the training objective and
conditioning (looked up in `conjure.train.objectives`), LoRA target presets, the embedding file's tensor names,
kohya and modelspec names, the pipeline class, and the full-size architecture the reference, tiny and toy models
are built from. Code elsewhere asks the family; it never branches on a family name. `detect()` reads an SD family
from a UNet's config, `detect_variant()` a variant (FLUX.1 dev or schnell) from a transformer's.
"""

from __future__ import annotations

from typing import Any

from conjure.errors import ConjureError
from conjure.families.flux import FLUX
from conjure.families.record import (
    EncoderArchitecture,
    Family,
    ReferenceArchitecture,
    T5Architecture,
    TextEncoderSlot,
    TransformerArchitecture,
    Variant,
)
from conjure.families.sd1 import SD1
from conjure.families.sd2 import SD2
from conjure.families.sdxl import SDXL

__all__ = [
    "FAMILIES", "FLUX", "SD1", "SD2", "SDXL", "EncoderArchitecture", "Family", "ReferenceArchitecture",
    "T5Architecture", "TextEncoderSlot", "TransformerArchitecture", "Variant", "detect", "detect_variant", "get",
    "unet_families",
]

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, FLUX)}


def unet_families() -> dict[str, Family]:
    """The families whose denoiser is a UNet (their `reference` is a ReferenceArchitecture)."""
    return {name: f for name, f in FAMILIES.items() if isinstance(f.reference, ReferenceArchitecture)}


def get(name: str | Family) -> Family:
    """The family named `name` ("sd1", "sd2", "sdxl", "flux"); a Family is returned as it is."""
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ConjureError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect(unet_config: Any, has_text_encoder_2: bool) -> Family:
    """Tell the family from the UNet's config (a diffusers FrozenDict or a plain dict).

    SDXL conditions on size/crop through `addition_embed_type="text_time"` and has a second text encoder;
    SD 2.x uses linear projections in its transformers (and 1024-wide cross-attention); SD 1.x neither.
    Width alone is not enough: tiny test models share one width across families.
    """
    cfg = dict(unet_config)
    if cfg.get("addition_embed_type") == "text_time" or has_text_encoder_2:
        return SDXL
    if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024:
        return SD2
    return SD1


def detect_variant(family: Family, transformer_config: Any) -> Variant:
    """The variant of a transformer family from the transformer's config: FLUX.1-dev was guidance-distilled and
    takes the guidance value as an input (`guidance_embeds`), schnell does not."""
    return variant_with_guidance(family, bool(dict(transformer_config).get("guidance_embeds", False)))


def variant_with_guidance(family: Family, guidance: bool) -> Variant:
    """The variant of a transformer family that takes a guidance input (FLUX.1-dev) or not (schnell): from its
    config (`detect_variant`) or from a file's keys (a guidance embedder)."""
    return next(v for v in family.variants if v.guidance == guidance)
