"""Text conditioning for the UNet: captions -> the keyword arguments of its forward call."""

from __future__ import annotations

from typing import Any

import torch

from conjure.errors import ConjureError


def encode_captions(pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device) -> dict[str, Any]:
    """SD 1.x/2.x: the last hidden state of the one CLIP text encoder (SD 2.x's encoder already ends at
    the penultimate layer in diffusers' layout)."""
    if len(pairs) != 1:
        raise ConjureError("two-encoder conditioning (SDXL) is not available yet for this method")
    tokenizer, encoder = pairs[0]
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return {"encoder_hidden_states": encoder(ids)[0]}
