"""Config of `sd_textual_inversion`: new token(s) for SD 1.x / 2.x, learned from a few images."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conjure.config.sections import (
    AdvancedConfig,
    BasicConfig,
    DataConfig,
    OptimizerConfig,
    Section,
    ValidationConfig,
)

OBJECT_PROMPTS = ("a photo of {}", "a close-up photo of {} on a table")
STYLE_PROMPTS = ("a painting of a house in the style of {}", "a portrait of a woman in the style of {}")


class TextualInversionSection(Section):
    """The new token and how it starts."""

    placeholder_token: str = Field(
        description="The new token you will type in prompts, e.g. '<my-style>'. Must not exist in the vocabulary.",
        json_schema_extra={"example": "<my-concept>"},
    )
    initializer: str = Field(
        description="A word or phrase close to the concept; the new vectors start from its embedding(s).",
        json_schema_extra={"example": "toy"},
    )
    num_vectors: int = Field(
        1, ge=1, le=16, description="Vectors per token: more can hold more detail, but take prompt room."
    )
    caption_preset: Literal["object", "style"] = Field(
        "object",
        description="Captions for images without one: 'object' ('a photo of a <token>', ...) or "
        "'style' ('a painting in the style of <token>', ...).",
    )

    @field_validator("placeholder_token")
    @classmethod
    def _token_is_one_word(cls, value: str) -> str:
        if not value or re.search(r"\s", value):
            raise ValueError("must be one word without spaces, e.g. '<my-style>'")
        return value


class SdTextualInversionConfig(BaseModel):
    """Textual inversion for Stable Diffusion 1.x and 2.x."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: Literal["sd_textual_inversion"] = "sd_textual_inversion"
    basic: BasicConfig
    data: DataConfig
    textual_inversion: TextualInversionSection
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)

    @model_validator(mode="after")
    def _fill_validation_prompts(self) -> SdTextualInversionConfig:
        # Written into the resolved config, so the run folder says exactly what was rendered.
        if not self.validation.prompts:
            ti = self.textual_inversion
            templates = OBJECT_PROMPTS if ti.caption_preset == "object" else STYLE_PROMPTS
            self.validation.prompts = [t.format(ti.placeholder_token) for t in templates]
        return self
