"""The `textual_inversion` config: new token(s) learned from a few images."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from conjure.config.base import RunConfigBase, RunConfigHead
from conjure.config.sections import Section

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


def ti_concept_word(ti: TextualInversionSection, class_word: str | None) -> tuple[str, str]:
    """The placeholder token and the word alignment puts in its place: validation.class_word, else the initializer."""
    return ti.placeholder_token, class_word or ti.initializer


def default_ti_prompts(ti: TextualInversionSection) -> list[str]:
    templates = OBJECT_PROMPTS if ti.caption_preset == "object" else STYLE_PROMPTS
    return [t.format(ti.placeholder_token) for t in templates]


class _TextualInversionSections(RunConfigHead):
    textual_inversion: TextualInversionSection


class TextualInversionConfig(RunConfigBase, _TextualInversionSections):
    """Textual inversion: new token(s) learned from a few images (SDXL: in both text encoders together)."""

    type: Literal["textual_inversion"] = "textual_inversion"

    def default_prompts(self) -> list[str]:
        return default_ti_prompts(self.textual_inversion)

    def concept_word(self) -> tuple[str, str] | None:
        return ti_concept_word(self.textual_inversion, self.validation.class_word)
