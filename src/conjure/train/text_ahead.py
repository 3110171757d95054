"""Text encoded ahead of training, so that the text encoders leave the GPU before the denoiser arrives on it.

With `data.cache_text_encoder_outputs` on a CUDA GPU, every caption the data can give (each example's caption
as its transforms make it, the empty caption where caption dropout is on) and every validation prompt is encoded
once, before the denoiser is placed on the GPU; then the text encoders move to the CPU. FLUX.1's T5-XXL alone is
9.5 GB in bf16: beside FLUX.1's 22 GiB of transformer weights a 24 GB card has no room for it (kohya's
`--cache_text_encoder_outputs` with its encoders on the CPU, OneTrainer's and SimpleTuner's caches do the same).
The held-out loss's captions, which are not cached, are encoded on the CPU where the encoders are: slower, never
wrong. Validation reads the prompts' encodings kept here. On the CPU nothing moves, and the cache fills as the
steps meet captions (`TextCache`), but for a transformer still to be read quantised
(`frees_for_a_quantised_read`), which is read once the encoders are freed.

Freed, not only moved (`still_needed`): without a held-out loss nothing the run does calls the encoders again, so
they are dropped from the model, unless the method saves them (a fine-tune's whole model). Every caption a step can meet was encoded ahead (an unreadable image's stand-in
is another example of the data; random prompt templates come only with a placeholder token, whose methods train
the text encoder and so refuse the cache: train/setup.py), and so was every validation prompt. A FLUX.1 run so
gives back T5-XXL's 9.5 GB of RAM before it trains (kohya's sd-scripts flux_train_network.py,
cache_text_encoder_outputs_if_needed, only moves them to the CPU and keeps them). The VAE is kept: validation
decodes with it and the latent cache encodes an image when its first epoch meets it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from conjure.train.caches import TextCache

if TYPE_CHECKING:
    from accelerate import Accelerator

    from conjure.config import RunConfig
    from conjure.data.example import Example
    from conjure.methods import MethodSpec
    from conjure.models.loading import LoadedModel
    from conjure.train.objectives import Conditioning

CHUNK = 16  # captions per encoder call


@dataclass
class EncodedAhead:
    """The text cache filled ahead, the validation prompts' pipeline inputs (on the CPU), and the encoders that
    were moved off the accelerator (pipeline names)."""

    cache: TextCache
    prompts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    on_cpu: tuple[str, ...] = ()


def offloads(device: torch.device) -> bool:
    """Whether encoding ahead moves the text encoders off `device` (a CUDA GPU; on the CPU they are there)."""
    return device.type == "cuda"


def frees_for_a_quantised_read(model: LoadedModel, base_weights: str) -> bool:
    """Whether a run that caches text encodes it ahead on the CPU too: where the denoiser is still to be read
    quantised (advanced.base_weights_dtype float8: models/transformer_stream.py), the case of FLUX.1-dev on a 24 GB
    machine, whose RAM holds the float8 transformer (~12 GB) only once T5-XXL (9.5 GB) is freed."""
    return bool(model.pending) and base_weights != "auto"


def captions_ahead(config: RunConfig, spec: MethodSpec, examples: list[Example]) -> list[str]:
    """The captions the data gives, each once: every example's as its transforms make it (without dropout), and
    "" when caption dropout is on."""
    from conjure.data.captions import caption_transform

    plain = caption_transform(config.data, spec.token(config), dropout=False)
    for_class = caption_transform(config.data, None, class_images=True, dropout=False)
    captions = [(for_class if ex.is_class else plain)(ex.caption, random.Random(0)) for ex in examples]
    if config.data.caption_dropout > 0:
        captions.append("")
    return list(dict.fromkeys(captions))


def still_needed(spec: MethodSpec, held_out: bool) -> str | None:
    """Why the text encoders must stay once the captions were encoded ahead; None when they can be freed (module
    doc). `held_out`: whether the run has a held-out loss (examples to encode). The estimate asks the same."""
    if spec.saves_whole_model:
        return "the method saves the whole model, text encoders included"
    return "the held-out loss encodes its images' captions" if held_out else None


def free_encoders(model: LoadedModel, ahead: EncodedAhead) -> None:
    """Drop the text encoders encoded ahead with (`still_needed` said nothing needs them again); their tokenizers
    stay (the start's long-caption count reads them)."""
    import gc

    for name in ahead.on_cpu:
        model.components[name] = None
    gc.collect()


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def encode_ahead(model: LoadedModel, conditioning: Conditioning, captions: list[str], prompts: list[tuple[str, str]],
                 accelerator: Accelerator, dtype: torch.dtype) -> EncodedAhead:
    """Encode `captions` and the validation `prompts` (prompt, negative) on the accelerator with the text encoders
    alone there, then move the encoders to the CPU (module doc)."""
    from tqdm import tqdm

    device = accelerator.device
    names = tuple(slot.encoder for slot in model.family.text_encoders)
    for name in names:
        model.components[name].requires_grad_(False).to(device, dtype)
    pairs = model.text_encoders()
    cache = TextCache()
    memo: dict[tuple[str, str], dict[str, Any]] = {}
    bar = tqdm(total=len(captions), unit="caption", desc="encoding captions ahead",
               disable=len(captions) < 4 * CHUNK or not accelerator.is_main_process)
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(captions), CHUNK):
            chunk = captions[start:start + CHUNK]
            cache.get(chunk, lambda new: conditioning.encode(pairs, new, device))
            bar.update(len(chunk))
        for prompt, negative in prompts:
            embeds = conditioning.prompt_embeds(pairs, prompt, negative, device)
            memo[(prompt, negative)] = {k: _to(v, "cpu") for k, v in embeds.items()}
    bar.close()
    for name in names:
        model.components[name].to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return EncodedAhead(cache, memo, names)


def prompt_inputs(ahead: EncodedAhead | None, prompt: str, negative: str, device: torch.device) -> dict[str, Any] | None:
    """A validation prompt's pipeline inputs encoded ahead, on `device`; None when it was not."""
    kept = ahead.prompts.get((prompt, negative)) if ahead else None
    return None if kept is None else {k: _to(v, device) for k, v in kept.items()}
