"""Text conditioning for the UNet: captions -> the keyword arguments of its forward call.

Which hidden state of each text encoder the UNet reads is a family fact (`TextEncoderSlot.hidden_layer`,
`final_norm`, `pooled`): SD 1.x/2.x the last one (SD 2.x's encoder already ends at the penultimate layer in
diffusers' layout), or with `advanced.clip_skip` N the N-th from the end with the final layer norm applied, as
kohya's `get_hidden_states` and A1111 do; SDXL both encoders' penultimate hidden states side by side, the second
encoder's pooled projection, and the size/crop ids, as diffusers' SDXL pipeline builds them at inference.

Captions longer than one 77-token window (`data.max_token_length` 150 or 225) are read as kohya reads them
(`library/strategy_base.py` `_get_input_ids`, `strategy_sd.py` / `strategy_sdxl.py` `encode_tokens`): tokenised
to max_token_length + 2, cut into 75-token chunks each wrapped in start and end tokens, encoded separately and
joined along the sequence as [start, chunk 1, ..., chunk n, end]: 2 + 75 n states; the pooled output comes from
the first chunk. Training, the text cache and validation all encode through `encode_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from conjure.errors import ConjureError
from conjure.families import FAMILIES, Family, TextEncoderSlot

CHUNK = 75  # caption tokens per encoder window (77 with the start and end tokens)


@dataclass(frozen=True)
class TextReading:
    """What the UNet reads of the text encoders: each encoder's slot (its hidden layer), clip skip and how many
    caption tokens (`data.max_token_length`)."""

    slots: tuple[TextEncoderSlot, ...]
    clip_skip: int = 1
    max_tokens: int = CHUNK

    @classmethod
    def of(cls, family: Family, encoders: list[Any], *, clip_skip: int = 1, max_tokens: int = CHUNK) -> TextReading:
        """The reading of `family`'s `encoders`; a clip skip past an encoder's first layer is refused."""
        if clip_skip > 1 and not family.clip_skip:
            raise ConjureError(f"advanced.clip_skip: {family.title} reads fixed text-encoder layers; set it to 1")
        for slot, encoder in zip(family.text_encoders, encoders):
            layers = encoder.config.num_hidden_layers
            if slot.read_layer(clip_skip) > layers:
                raise ConjureError(
                    f"advanced.clip_skip {clip_skip}: the model's {slot.encoder} has only {layers} layers"
                )
        return cls(family.text_encoders, clip_skip, max_tokens)


def _default_reading(count: int) -> TextReading:
    """Without a reading: the layers of the first family with `count` text encoders (SD 1.x or SDXL)."""
    return TextReading(next(f.text_encoders for f in FAMILIES.values() if len(f.text_encoders) == count))


def _ids(tokenizer: Any, captions: list[str], device: torch.device, max_tokens: int = CHUNK) -> torch.Tensor:
    """Token ids [batch, chunks, window]: one window per 75 caption tokens (kohya's `_get_input_ids`)."""
    window, chunks = tokenizer.model_max_length, max_tokens // CHUNK
    if chunks == 1:
        return tokenizer(
            captions, padding="max_length", max_length=window, truncation=True, return_tensors="pt"
        ).input_ids[:, None].to(device)
    ids = tokenizer(
        captions, padding="max_length", max_length=max_tokens + 2, truncation=True, return_tensors="pt"
    ).input_ids
    inner, eos, pad = window - 2, tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, max_tokens + 1, inner):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + inner], ids[:, -1:]], dim=1)
        # As kohya: a chunk cut inside the caption ends with an end token; an empty one starts with one.
        # (With CLIP-L, which pads with the end token, neither changes anything.)
        cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
        chunk[cut, -1] = eos
        chunk[chunk[:, 1] == pad, 1] = eos
        windows.append(chunk)
    return torch.stack(windows, dim=1).to(device)


def _join_chunks(states: torch.Tensor, batch: int, window: int) -> torch.Tensor:
    """[batch * chunks, window, width] -> [batch, 2 + chunks * (window - 2), width]: the first start token, each
    chunk's inner states, the last chunk's final state (kohya's `encode_tokens`)."""
    states = states.reshape(batch, -1, states.shape[-1])
    if states.shape[1] == window:
        return states
    inner = [states[:, i : i + window - 2] for i in range(1, states.shape[1], window)]
    return torch.cat([states[:, :1], *inner, states[:, -1:]], dim=1)


def _final_norm(encoder: Any) -> Any:
    # A DDP-wrapped encoder holds the model as `.module`; the norm is frozen, so calling it outside the
    # wrapper's forward is safe.
    return getattr(encoder, "module", encoder).final_layer_norm


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
    reading: TextReading | None = None,
) -> dict[str, Any]:
    """`zero_empty`: empty captions give all-zero embeddings, which is what diffusers' SDXL pipeline uses
    as the unconditional input (`force_zeros_for_empty_prompt`), so caption dropout trains the same thing.
    `original_sizes` / `crops_top_left`: each image's (height, width) before resizing and (top, left) crop,
    as the data set's items carry them (batch keys "original_size", "crop_top_left"), and `target_sizes` (each
    image's training size, "target_size"), for SDXL's size and crop ids; without them the ids say
    "`resolution` square, uncropped". One-encoder models ignore them. `text`: `encode_text`'s result for
    these captions when it is already at hand (a cache), else it is computed with `reading`."""
    text = encode_text(pairs, captions, device, zero_empty=zero_empty, reading=reading) if text is None else text
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
    pairs: list[tuple[Any, Any]], captions: list[str], device: torch.device, *, zero_empty: bool = False,
    reading: TextReading | None = None,
) -> dict[str, torch.Tensor]:
    """What the text encoders give for `captions`: "encoder_hidden_states" (and for a family that reads a pooled
    projection, SDXL, "text_embeds"), per caption; nothing here depends on the image. `reading`: which hidden
    states and how many tokens (default: the family with this many encoders, no clip skip, 75 tokens)."""
    reading = reading or _default_reading(len(pairs))
    hidden, pooled = [], None
    for slot, (tokenizer, encoder) in zip(reading.slots, pairs):
        ids = _ids(tokenizer, captions, device, reading.max_tokens)
        window = ids.shape[-1]
        out = encoder(ids.reshape(-1, window), output_hidden_states=True)
        layer = slot.read_layer(reading.clip_skip)
        if layer == 1 and slot.final_norm:
            states = out.last_hidden_state
        else:
            states = out.hidden_states[-layer]
            states = _final_norm(encoder)(states) if slot.final_norm else states
        hidden.append(_join_chunks(states, len(captions), window))
        if slot.pooled:
            pooled = out[0][:: ids.shape[1]]  # the projected pooled embedding (`text_embeds`) of the first chunk
    states = torch.cat(hidden, dim=-1)
    if pooled is None:
        return {"encoder_hidden_states": states}
    if zero_empty:
        keep = torch.tensor([bool(c.strip()) for c in captions], device=device, dtype=states.dtype)
        states = states * keep[:, None, None]
        pooled = pooled * keep[:, None].to(pooled.dtype)
    return {"encoder_hidden_states": states, "text_embeds": pooled}


def prompt_embeds(
    pairs: list[tuple[Any, Any]], prompt: str, negative: str, device: torch.device, *, reading: TextReading
) -> dict[str, torch.Tensor]:
    """A diffusers SD / SDXL pipeline's text inputs for `prompt` and its `negative`, encoded as training encodes
    captions (same layers, clip skip and chunks; an empty SDXL negative is zeros, as the pipeline's
    `force_zeros_for_empty_prompt` makes it), so that validation shows what training teaches."""
    text, negative_text = (encode_text(pairs, [p], device, zero_empty=True, reading=reading) for p in (prompt, negative))
    embeds = {"prompt_embeds": text["encoder_hidden_states"],
              "negative_prompt_embeds": negative_text["encoder_hidden_states"]}
    if "text_embeds" in text:
        embeds.update(pooled_prompt_embeds=text["text_embeds"], negative_pooled_prompt_embeds=negative_text["text_embeds"])
    return embeds
