"""Training methods: each config type maps to a recipe (what trains, how captions are made, what is saved).

A recipe object offers: `trainable_modules()` (pipeline name -> module whose parameters train),
`parameter_groups(lr)`, `frozen_parameters(step, max_steps)` (parameters that sit out the step about to be
taken: their gradients are dropped before clipping and the optimizer step), `expand_caption(text)`,
`state_dict()` / `load_state_dict()` (resume),
`save(folder, step=, resolution=, base_model=, run_name=, prediction_type=)` (files apps load; `prediction_type`:
what the run trains the model to predict, for the files' metadata) and `kind` (modelspec suffix).
The loop knows nothing else about methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conjure.config.lora import SdLoraConfig, SdxlLoraConfig
from conjure.config.pivotal import SdPivotalConfig, SdxlPivotalConfig
from conjure.config.textual_inversion import SdTextualInversionConfig, SdxlTextualInversionConfig
from conjure.data.captions import CaptionTransform
from conjure.errors import ConjureError
from conjure.models.loading import LoadedModel


@dataclass(frozen=True)
class MethodSpec:
    families: tuple[str, ...]
    build: Callable[[Any, LoadedModel], Any]
    caption_transform: Callable[[Any], CaptionTransform]
    trigger: Callable[[Any], str | None]  # the word captions must contain (None: no such word)
    trigger_hint: Callable[[Any], str] = lambda config: ""  # how to get it into captions, when none has it


def _build_ti(config: Any, model: LoadedModel) -> Any:
    from conjure.methods.textual_inversion import TextualInversion

    ti = config.textual_inversion
    return TextualInversion(
        model, placeholder_token=ti.placeholder_token, initializer=ti.initializer, num_vectors=ti.num_vectors
    )


def _ti_captions(config: Any) -> CaptionTransform:
    """Templates for images without a caption; the token replaces `replace_word`, or goes in front."""
    ti, data = config.textual_inversion, config.data
    return CaptionTransform(
        prefix=data.caption_prefix,
        shuffle_delimiter=data.shuffle_caption_delimiter,
        keep_tokens=data.keep_tokens,
        preset=ti.caption_preset,
        placeholder=ti.placeholder_token,
        replace_word=ti.replace_word,
        ensure_placeholder=ti.replace_word is None,
        dropout=data.caption_dropout,
    )


def _build_lora(config: Any, model: LoadedModel) -> Any:
    from conjure.methods.lora import Lora

    return Lora(model, config.lora, trigger=config.lora.trigger_word, seed=config.basic.seed,
                clip_skip=config.advanced.clip_skip)


def _build_pivotal(config: Any, model: LoadedModel) -> Any:
    from conjure.methods.pivotal import PivotalTuning

    return PivotalTuning(model, config.lora, config.textual_inversion, seed=config.basic.seed,
                         clip_skip=config.advanced.clip_skip)


def _lora_captions(config: Any) -> CaptionTransform:
    data = config.data
    return CaptionTransform(
        prefix=data.caption_prefix, shuffle_delimiter=data.shuffle_caption_delimiter, keep_tokens=data.keep_tokens,
        dropout=data.caption_dropout,
    )


def _placeholder(config: Any) -> str:
    return config.textual_inversion.placeholder_token


def _trigger_word(config: Any) -> str | None:
    return config.lora.trigger_word


def _replace_word_hint(config: Any) -> str:
    word = config.textual_inversion.replace_word
    return f"no caption contains textual_inversion.replace_word {word!r}; fix it, or set it to null" if word else ""


def _spec(config_class: Any, build: Callable[[Any, LoadedModel], Any], captions: Callable[[Any], CaptionTransform],
          trigger: Callable[[Any], str | None]) -> MethodSpec:
    hint = _replace_word_hint if trigger is _placeholder else MethodSpec.trigger_hint
    return MethodSpec(config_class.FAMILIES, build, captions, trigger, hint)


METHODS: dict[str, MethodSpec] = {
    "sd_textual_inversion": _spec(SdTextualInversionConfig, _build_ti, _ti_captions, _placeholder),
    "sdxl_textual_inversion": _spec(SdxlTextualInversionConfig, _build_ti, _ti_captions, _placeholder),
    "sd_lora": _spec(SdLoraConfig, _build_lora, _lora_captions, _trigger_word),
    "sdxl_lora": _spec(SdxlLoraConfig, _build_lora, _lora_captions, _trigger_word),
    # Pivotal tuning: the token goes into captions exactly as for textual inversion.
    "sd_lora_and_textual_inversion": _spec(SdPivotalConfig, _build_pivotal, _ti_captions, _placeholder),
    "sdxl_lora_and_textual_inversion": _spec(SdxlPivotalConfig, _build_pivotal, _ti_captions, _placeholder),
}


def method_spec(config_type: str) -> MethodSpec:
    try:
        return METHODS[config_type]
    except KeyError:
        raise ConjureError(f"no training method for config type {config_type!r}") from None
