"""Configs of `sd_textual_inversion` (SD 1.x / 2.x) and `sdxl_textual_inversion` (both SDXL encoders):
new token(s) learned from a few images."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conjure.config.sections import (
    AdvancedConfig,
    BasicConfig,
    DataConfig,
    OptimizerConfig,
    Section,
    ValidationConfig,
    check_clip_skip,
    check_family,
    type_for,
)

OBJECT_PROMPTS = ("a photo of {}", "a close-up photo of {} on a table")
STYLE_PROMPTS = ("a painting of a house in the style of {}", "a portrait of a woman in the style of {}")


class TextualInversionSection(Section):
    """The new token, how it starts, and how it gets into the captions."""

    placeholder_token: str = Field(
        description="The new token you will type in prompts, e.g. '<my-style>'. Must not exist in the vocabulary.",
        json_schema_extra={"example": "<my-concept>"},
    )
    initializer: str = Field(
        description="A word or phrase close to the concept; the new vectors start from its tokens' embeddings: "
        "vector i from token i, the tokens repeated in order when there are more vectors and cut when there are "
        "fewer (kohya's rule; 'red round ball' with 2 vectors starts from 'red' and 'round').",
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
    replace_word: str | None = Field(
        None,
        description="A word of your captions that stands for the concept (e.g. 'sks'): each occurrence becomes "
        "the placeholder token, and captions without it are left as they are (regularisation images). "
        "null: the token is put in front of every caption that lacks it.",
    )

    @field_validator("placeholder_token")
    @classmethod
    def _token_is_one_word(cls, value: str) -> str:
        if not value or re.search(r"\s", value):
            raise ValueError("must be one word without spaces, e.g. '<my-style>'")
        return value

    @field_validator("replace_word")
    @classmethod
    def _word(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank; use null to put the token in front of captions")
        return value.strip() if value else value


def default_ti_prompts(ti: TextualInversionSection) -> list[str]:
    templates = OBJECT_PROMPTS if ti.caption_preset == "object" else STYLE_PROMPTS
    return [t.format(ti.placeholder_token) for t in templates]


class _TextualInversionConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str  # each subclass pins its own name (declared here so that it comes first in YAML)
    FAMILIES: ClassVar[tuple[str, ...]]  # the model families this type trains (the methods registry reads it too)
    basic: BasicConfig
    data: DataConfig
    textual_inversion: TextualInversionSection
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)

    @model_validator(mode="after")
    def _check(self) -> _TextualInversionConfigBase:
        check_family(self.type, self.FAMILIES, self.basic.family, ti_type_for)
        check_clip_skip(self.type, self.FAMILIES, self.advanced.clip_skip)
        # Written into the resolved config, so the run folder says exactly what was rendered.
        if not self.validation.prompts:
            self.validation.prompts = default_ti_prompts(self.textual_inversion)
        return self


class SdTextualInversionConfig(_TextualInversionConfigBase):
    """Textual inversion for Stable Diffusion 1.x and 2.x."""

    type: Literal["sd_textual_inversion"] = "sd_textual_inversion"
    FAMILIES = ("sd1", "sd2")


class SdxlTextualInversionConfig(_TextualInversionConfigBase):
    """Textual inversion for Stable Diffusion XL: the token is learned in both text encoders together."""

    type: Literal["sdxl_textual_inversion"] = "sdxl_textual_inversion"
    FAMILIES = ("sdxl",)


def ti_type_for(family: str) -> str:
    """The textual-inversion config type that trains `family`."""
    return type_for(family, SdTextualInversionConfig, SdxlTextualInversionConfig)
