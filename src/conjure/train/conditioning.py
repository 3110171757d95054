"""Text conditioning for the UNet: captions -> the keyword arguments of its forward call.

One text encoder (SD 1.x/2.x): its last hidden state (SD 2.x's encoder already ends at the penultimate
layer in diffusers' layout). Two (SDXL): both encoders' penultimate hidden states side by side, the second
encoder's pooled projection, and the size/crop ids, as diffusers' SDXL pipeline builds them at inference.
"""

from __future__ import annotations

from typing import Any

import torch


def _ids(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def sdxl_time_ids(
    batch: int, resolution: int, device: torch.device, *, original: list[tuple[int, int]] | None = None,
    crops: list[tuple[int, int]] | None = None, targets: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """(original height, original width, crop top, crop left, target height, target width) per image.
    Without `original`, every image is taken to be `resolution` square; without `crops`, uncropped (0, 0);
    without `targets` (each image's training size, e.g. its aspect-ratio bucket), `resolution` square:
    what diffusers' SDXL pipeline uses at inference."""
    for name, values in (("original sizes", original), ("crops", crops), ("target sizes", targets)):
        if values is not None and len(values) != batch:
            raise ValueError(f"{len(values)} {name} for a batch of {batch}")
    rows = []
    for i in range(batch):
        oh, ow = original[i] if original else (resolution, resolution)
        ct, cl = crops[i] if crops else (0, 0)
        th, tw = targets[i] if targets else (resolution, resolution)
        rows.append([oh, ow, ct, cl, th, tw])
    return torch.tensor(rows, dtype=torch.float32, device=device)


def encode_captions(
    pairs: list[tuple[Any, Any]],
    captions: list[str],
    device: torch.device,
    *,
    resolution: int | None = None,
    zero_empty: bool = False,
    original_sizes: list[tuple[int, int]] | None = None,
    crops_top_left: list[tuple[int, int]] | None = None,
    target_sizes: list[tuple[int, int]] | None = None,
    text: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """`zero_empty`: empty captions give all-zero embeddings, which is what diffusers' SDXL pipeline uses
    as the unconditional input (`force_zeros_for_empty_prompt`), so caption dropout trains the same thing.
    `original_sizes` / `crops_top_left`: each image's (height, width) before resizing and (top, left) crop,
    as the data set's items carry them (batch keys "original_size", "crop_top_left"), and `target_sizes` (each
    image's training size, "target_size"), for SDXL's size and crop ids; without them the ids say
    "`resolution` square, uncropped". One-encoder models ignore them. `text`: `encode_text`'s result for
    these captions when it is already at hand (a cache), else it is computed."""
    text = encode_text(pairs, captions, device, zero_empty=zero_empty) if text is None else text
    if "text_embeds" not in text:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}
    states, pooled = text["encoder_hidden_states"], text["text_embeds"]
    if resolution is None:
        raise ValueError("two-encoder (SDXL) conditioning needs the training resolution for its size ids")
    time_ids = sdxl_time_ids(
        len(captions), resolution, device, original=original_sizes, crops=crops_top_left, targets=target_sizes
    ).to(states.dtype)
    return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def encode_text(
    pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device, *, zero_empty: bool = False
) -> dict[str, torch.Tensor]:
    """What the text encoders give for `captions`: "encoder_hidden_states" (and for two encoders, SDXL,
    "text_embeds": the second's pooled projection), per caption; nothing here depends on the image."""
    if len(pairs) == 1:
        tokenizer, encoder = pairs[0]
        return {"encoder_hidden_states": encoder(_ids(tokenizer, captions, device))[0]}
    hidden, pooled = [], None
    for tokenizer, encoder in pairs:
        out = encoder(_ids(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's pooled (projected) embedding: `text_embeds`
    states = torch.cat(hidden, dim=-1)
    if zero_empty:
        keep = torch.tensor([bool(c.strip()) for c in captions], device=device, dtype=states.dtype)
        states = states * keep[:, None, None]
        pooled = pooled * keep[:, None].to(pooled.dtype)
    return {"encoder_hidden_states": states, "text_embeds": pooled}
