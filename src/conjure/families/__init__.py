"""Model families: the facts about SD 1.x, SD 2.x and SDXL that the rest of conjure needs, in one place.

Each family is one `Family` record (`families/sd1.py`, `sd2.py`, `sdxl.py`; types in `record.py`): text encoders
and their widths, which of their hidden states the UNet reads, the embedding file's tensor names, kohya and
modelspec names, the pipeline class, and the full-size architecture the reference, tiny and toy models are built
from. Code elsewhere asks the family; it never branches on a family name. `detect()` reads the family from a
loaded model's own configs.
"""

from __future__ import annotations

from typing import Any

from conjure.errors import ConjureError
from conjure.families.record import EncoderArchitecture, Family, ReferenceArchitecture, TextEncoderSlot
from conjure.families.sd1 import SD1
from conjure.families.sd2 import SD2
from conjure.families.sdxl import SDXL

__all__ = [
    "FAMILIES", "SD1", "SD2", "SDXL", "EncoderArchitecture", "Family", "ReferenceArchitecture", "TextEncoderSlot",
    "detect", "get",
]

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


def get(name: str | Family) -> Family:
    """The family named `name` ("sd1", "sd2", "sdxl"); a Family is returned as it is."""
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
