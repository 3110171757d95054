"""Training methods: each config type maps to a recipe (what trains, its token in the captions, what is saved).

A recipe is any object with the `Recipe` interface below; the loop knows nothing else about methods.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from conjure.config.base import RunConfigBase
from conjure.config.finetune import FinetuneConfig
from conjure.config.lora import LoraConfig
from conjure.config.pivotal import PivotalConfig
from conjure.config.textual_inversion import TextualInversionConfig
from conjure.data.captions import TokenRule
from conjure.errors import ConjureError
from conjure.models.loading import LoadedModel


class Recipe(Protocol):
    """What the training loop asks of a method (`TextualInversion`, `Lora`, `PivotalTuning`, `FullFinetune`).

    The loop freezes and casts the whole model first; a recipe then adds its trainable float32 parts and says
    which they are. Its say over a step is `frozen_parameters` and `after_step`; everything else runs before the
    first step (parameters, captions), at a validation (its weights) or at a checkpoint (state, files)."""

    kind: str  # the modelspec architecture suffix of the recipe's main file ("lora", "textual-inversion")

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Components whose parameters train, by pipeline name ("unet", "text_encoder", ...); the loop wraps
        them for distributed training and calls their prepared forms in the step."""
        ...

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """The optimizer's groups (`params`, `lr`, optional `name`), `learning_rate` being optimizer.learning_rate."""
        ...

    def frozen_parameters(self, step: int, max_steps: int) -> list[nn.Parameter]:
        """Parameters that sit out the step about to be taken (counted from 0): their gradients are dropped
        before clipping and the optimizer step, so they neither move nor decay."""
        ...

    def after_step(self, step: int) -> None:
        """Called after each optimizer step that moved the weights (`step`: steps taken, counted from 1; the
        full fine-tune's EMA updates here)."""
        ...

    def validation_weights(self) -> AbstractContextManager[None]:
        """The weights validation renders with, in place while it runs (an EMA's); nothing for most methods."""
        ...

    def expand_caption(self, caption: str) -> str:
        """A caption as the text encoders read it (a multi-vector token spelled out as diffusers' pipelines do)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, for a checkpoint's training state (exact resume)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what `state_dict` returned."""
        ...

    def save(
        self, folder: Path, *, step: int, resolution: int, base_model: str, run_name: str, prediction_type: str
    ) -> list[Path]:
        """Write the files apps load into `folder` (with their modelspec metadata); returns the files written.
        `prediction_type`: what the run trains the model to predict (epsilon, v_prediction), for that metadata."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    families: tuple[str, ...]
    build: Callable[[Any, LoadedModel], Recipe]
    token: Callable[[Any], TokenRule | None]  # how the method's token gets into captions (data.captions)
    trigger: Callable[[Any], str | None]  # the word captions must contain (None: no such word)
    trigger_hint: Callable[[Any], str] = lambda config: ""  # how to get it into captions, when none has it
    # Whether its saved files are the whole model, frozen parts included (a fine-tune's folder and single file):
    # then the text encoders are kept though their outputs were encoded ahead (train/text_ahead.py still_needed)
    saves_whole_model: bool = False


def _build_ti(config: Any, model: LoadedModel) -> Recipe:
    from conjure.methods.textual_inversion import TextualInversion

    ti = config.textual_inversion
    return TextualInversion(
        model, placeholder_token=ti.placeholder_token, initializer=ti.initializer, num_vectors=ti.num_vectors
    )


def _ti_token(config: Any) -> TokenRule:
    """Templates for images without a caption; the token replaces `replace_word`, or goes in front."""
    ti = config.textual_inversion
    return TokenRule(ti.placeholder_token, replace_word=ti.replace_word, preset=ti.caption_preset)


def _build_lora(config: Any, model: LoadedModel) -> Recipe:
    from conjure.methods.lora import Lora

    return Lora(model, config.lora, trigger=config.lora.trigger_word, seed=config.basic.seed,
                clip_skip=config.advanced.clip_skip)


def _build_pivotal(config: Any, model: LoadedModel) -> Recipe:
    from conjure.methods.pivotal import PivotalTuning

    return PivotalTuning(model, config.lora, config.textual_inversion, seed=config.basic.seed,
                         clip_skip=config.advanced.clip_skip)


def _build_finetune(config: Any, model: LoadedModel) -> Recipe:
    from conjure.methods.finetune import FullFinetune

    return FullFinetune(model, config.finetune, clip_skip=config.advanced.clip_skip)


def _no_token(config: Any) -> None:
    return None  # a LoRA's trigger word is the user's own caption text; a fine-tune learns the captions as written


def _placeholder(config: Any) -> str:
    return config.textual_inversion.placeholder_token


def _trigger_word(config: Any) -> str | None:
    return config.lora.trigger_word


def _no_trigger(config: Any) -> None:
    return None


def _replace_word_hint(config: Any) -> str:
    word = config.textual_inversion.replace_word
    return f"no caption contains textual_inversion.replace_word {word!r}; fix it, or set it to null" if word else ""


def _spec(config_class: type[RunConfigBase], build: Callable[[Any, LoadedModel], Recipe],
          token: Callable[[Any], TokenRule | None], trigger: Callable[[Any], str | None],
          saves_whole_model: bool = False) -> MethodSpec:
    hint = _replace_word_hint if trigger is _placeholder else MethodSpec.trigger_hint
    return MethodSpec(config_class.FAMILIES, build, token, trigger, hint, saves_whole_model)


METHODS: dict[str, MethodSpec] = {
    "textual_inversion": _spec(TextualInversionConfig, _build_ti, _ti_token, _placeholder),
    "lora": _spec(LoraConfig, _build_lora, _no_token, _trigger_word),
    # Pivotal tuning: the token goes into captions exactly as for textual inversion.
    "pivotal": _spec(PivotalConfig, _build_pivotal, _ti_token, _placeholder),
    "finetune": _spec(FinetuneConfig, _build_finetune, _no_token, _no_trigger, saves_whole_model=True),
}


def method_spec(config_type: str) -> MethodSpec:
    try:
        return METHODS[config_type]
    except KeyError:
        raise ConjureError(f"no training method for config type {config_type!r}") from None
