"""The `lora` config: a LoRA or DoRA concept model from captioned images."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from conjure.config.base import RunConfigBase, RunConfigHead
from conjure.config.sections import OptimizerConfig, Section


class LoraAdapterSection(Section):
    """The adapter: which layers, how big, how it is saved."""

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (dim): bigger holds more, files grow with it.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. null: equal to rank (scale 1)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    dora: bool = Field(
        False, description="Train a DoRA (weight-decomposed LoRA): a learned magnitude per input column as well."
    )
    unet_targets: Literal["auto", "attention", "attention_ff", "attention_mlp", "all"] = Field(
        "auto",
        description="Denoiser layers to adapt (kohya calls every denoiser 'unet'). 'auto': the family's default, "
        "'attention_ff' for SD/SDXL and 'attention_mlp' for FLUX.1. SD/SDXL UNet: 'attention' (q, k, v, out of "
        "self- and cross-attention), 'attention_ff' (+ feed-forward and the transformer's in/out projections, "
        "kohya's default), 'all' (+ every ResNet convolution, time-embedding projection and down/upsampler: "
        "LoCon). FLUX.1 transformer: 'attention' (q, k, v, out of both streams of the double blocks, the single "
        "blocks' q, k, v), 'attention_mlp' (+ both streams' feed-forward, the single blocks' MLP and output "
        "projections), 'all' (+ the modulation layers); never the final output layer.",
    )
    train_text_encoder: bool = Field(
        False, description="Also train a LoRA on the text encoder(s): both of them for SDXL, CLIP-L for FLUX.1 (its "
        "T5 stays frozen)."
    )
    unet_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the UNet adapter; null: optimizer.learning_rate."
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the text-encoder adapter(s); null: optimizer.learning_rate."
    )
    save_format: Literal["kohya", "peft"] = Field(
        "kohya",
        description="'kohya': the single file InvokeAI, ComfyUI, A1111/Forge and diffusers all load. "
        "'peft': diffusers' own format (loads in diffusers only).",
    )
    save_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Precision of the saved file.")
    output_name: str | None = Field(
        None, description="File name of the saved LoRA (without .safetensors); null: the run's name."
    )

    @field_validator("output_name")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+", value):
            raise ValueError("use letters, digits, '.', '-' and '_' only (it becomes a file name)")
        return value

    @model_validator(mode="after")
    def _resolve_alpha(self) -> LoraAdapterSection:
        if self.alpha is None:
            self.alpha = float(self.rank)  # written into the resolved config: the file says what trained
        return self


class LoraSection(LoraAdapterSection):
    """A concept model's adapter and the word that calls it."""

    trigger_word: str | None = Field(
        None,
        description="The word (or words) in your captions that calls the concept, e.g. 'ohwx dog'. Used in the "
        "default validation prompts and written into the file's metadata; captions must contain it.",
        json_schema_extra={"example": "ohwx"},
    )

    @field_validator("trigger_word")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank; use null for no trigger word")
        return value.strip() if value else value


class LoraOptimizerConfig(OptimizerConfig):
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (Prodigy: a multiplier, use 1.0).")


def default_prompts(trigger: str | None) -> list[str]:
    if not trigger:
        return ["a photo", "a painting of a landscape"]
    return [f"a photo of {trigger}", f"{trigger}, a painting"]


class _LoraSections(RunConfigHead):
    lora: LoraSection = Field(default_factory=LoraSection)


class LoraConfig(RunConfigBase, _LoraSections):
    """LoRA / DoRA: a concept model from captioned images (SDXL: size/crop conditioning, both text encoders)."""

    type: Literal["lora"] = "lora"
    FAMILIES: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl", "flux")
    optimizer: LoraOptimizerConfig = Field(default_factory=LoraOptimizerConfig)

    def default_prompts(self) -> list[str]:
        return default_prompts(self.lora.trigger_word)

    def concept_word(self) -> tuple[str, str] | None:
        trigger = self.lora.trigger_word
        return (trigger, self.validation.class_word or "") if trigger else None

    def trains_text_encoder(self) -> bool:
        return self.lora.train_text_encoder
