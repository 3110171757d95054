"""Training methods: each config type maps to a recipe (what trains, how captions are made, what is saved).

A recipe object offers: `trainable_modules()` (pipeline name -> module whose parameters train),
`parameter_groups(lr)`, `expand_caption(text)`, `state_dict()` / `load_state_dict()` (resume),
`save(folder, step=, resolution=, base_model=, run_name=)` (files apps load) and `kind` (modelspec suffix).
The loop knows nothing else about methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conjure.config.lora import SdLoraConfig, SdxlLoraConfig
from conjure.data.captions import CaptionTransform
from conjure.errors import ConjureError
from conjure.models.loading import LoadedModel


@dataclass(frozen=True)
class MethodSpec:
    families: tuple[str, ...]
    build: Callable[[Any, LoadedModel], Any]
    caption_transform: Callable[[Any], CaptionTransform]
    trigger: Callable[[Any], str | None]  # the word captions must contain (None: no such word)


def _build_ti(config: Any, model: LoadedModel) -> Any:
    from conjure.methods.textual_inversion import TextualInversion

    ti = config.textual_inversion
    return TextualInversion(
        model, placeholder_token=ti.placeholder_token, initializer=ti.initializer, num_vectors=ti.num_vectors
    )


def _ti_captions(config: Any) -> CaptionTransform:
    ti, data = config.textual_inversion, config.data
    return CaptionTransform(
        prefix=data.caption_prefix,
        shuffle_delimiter=data.shuffle_caption_delimiter,
        keep_tokens=data.keep_tokens,
        preset=ti.caption_preset,
        placeholder=ti.placeholder_token,
    )


def _build_lora(config: Any, model: LoadedModel) -> Any:
    from conjure.methods.lora import Lora

    return Lora(model, config.lora, trigger=config.lora.trigger_word, seed=config.basic.seed)


def _lora_captions(config: Any) -> CaptionTransform:
    data = config.data
    return CaptionTransform(
        prefix=data.caption_prefix, shuffle_delimiter=data.shuffle_caption_delimiter, keep_tokens=data.keep_tokens
    )


METHODS: dict[str, MethodSpec] = {
    "sd_textual_inversion": MethodSpec(
        families=("sd1", "sd2"),
        build=_build_ti,
        caption_transform=_ti_captions,
        trigger=lambda config: config.textual_inversion.placeholder_token,
    ),
    "sd_lora": MethodSpec(
        families=SdLoraConfig.FAMILIES, build=_build_lora, caption_transform=_lora_captions,
        trigger=lambda config: config.lora.trigger_word,
    ),
    "sdxl_lora": MethodSpec(
        families=SdxlLoraConfig.FAMILIES, build=_build_lora, caption_transform=_lora_captions,
        trigger=lambda config: config.lora.trigger_word,
    ),
}


def method_spec(config_type: str) -> MethodSpec:
    try:
        return METHODS[config_type]
    except KeyError:
        raise ConjureError(f"no training method for config type {config_type!r}") from None
