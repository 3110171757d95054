"""Configs of pivotal tuning: `sd_lora_and_textual_inversion` (SD 1.x / 2.x) and
`sdxl_lora_and_textual_inversion`: a LoRA and its own new token, trained together in one loop.

The token is trained with its own learning rate and can be frozen after a fraction of the steps, so the
LoRA spends the rest of the run learning around a fixed word (the "pivot").
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conjure.config.lora import LoraAdapterSection, LoraOptimizerConfig
from conjure.config.sections import (
    AdvancedConfig,
    BasicConfig,
    DataConfig,
    ValidationConfig,
    check_clip_skip,
    check_family,
    type_for,
)
from conjure.config.textual_inversion import TextualInversionSection


class PivotalTextualInversionSection(TextualInversionSection):
    """The new token of a pivotal run: how it starts, how fast it learns, when it stops."""

    learning_rate: float = Field(
        1e-3, gt=0, description="Learning rate of the token's embedding (the LoRA uses optimizer.learning_rate)."
    )
    freeze_after: float | None = Field(
        None, gt=0, le=1,
        description="Fraction of the steps after which the embedding stops training (e.g. 0.5: the LoRA trains "
        "alone in the second half); null: it trains to the end.",
    )
    bundle: bool = Field(
        False,
        description="Also write one file that carries the LoRA and the embedding (`<name>.bundle.safetensors`, "
        "the `bundle_emb` layout), besides the two separate files. A1111/Forge read the embedding from the LoRA "
        "file; ComfyUI's LoRA loader skips it (ComfyUI finds it only with the same file also in "
        "models/embeddings, typed as embedding:<file name>) and InvokeAI drops it: there, install the two files.",
    )


def default_pivotal_prompts(token: str) -> list[str]:
    return [f"a photo of {token}", f"{token}, a painting"]


class _PivotalConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str  # each subclass pins its own name (declared here so that it comes first in YAML)
    FAMILIES: ClassVar[tuple[str, ...]]
    basic: BasicConfig
    data: DataConfig
    textual_inversion: PivotalTextualInversionSection
    lora: LoraAdapterSection = Field(default_factory=LoraAdapterSection)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: LoraOptimizerConfig = Field(default_factory=LoraOptimizerConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)

    @model_validator(mode="after")
    def _check(self) -> _PivotalConfigBase:
        check_family(self.type, self.FAMILIES, self.basic.family, pivotal_type_for)
        check_clip_skip(self.type, self.FAMILIES, self.advanced.clip_skip)
        if self.textual_inversion.bundle and self.lora.save_format != "kohya":
            raise ValueError(
                "textual_inversion.bundle: a bundled embedding needs lora.save_format: kohya (the PEFT format "
                "cannot carry it)"
            )
        if not self.validation.prompts:
            self.validation.prompts = default_pivotal_prompts(self.textual_inversion.placeholder_token)
        return self


class SdPivotalConfig(_PivotalConfigBase):
    """Pivotal tuning (a LoRA or DoRA and its own token) for Stable Diffusion 1.x and 2.x."""

    type: Literal["sd_lora_and_textual_inversion"] = "sd_lora_and_textual_inversion"
    FAMILIES = ("sd1", "sd2")


class SdxlPivotalConfig(_PivotalConfigBase):
    """Pivotal tuning for Stable Diffusion XL (the token in both text encoders)."""

    type: Literal["sdxl_lora_and_textual_inversion"] = "sdxl_lora_and_textual_inversion"
    FAMILIES = ("sdxl",)


def pivotal_type_for(family: str) -> str:
    """The config type that trains `family`."""
    return type_for(family, SdPivotalConfig, SdxlPivotalConfig)
