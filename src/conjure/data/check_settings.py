"""What a data-set check checks against (`conjure dataset check`, the web app's Check button): one typed model,
the single source of the settings' defaults and help for the CLI's options, the web API's body and the page's
form (which reads them from `GET /api/datasets/check/schema`, as the training form reads the config's schema).

Apart from conjure.data.check, which imports torch: the CLI builds its parser from this model on every start.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from conjure.models.tokenizer import MODEL_MAX_LENGTH


class CheckSettings(BaseModel):
    """The settings of `conjure.data.check.check_source`. Their bounds are checked there, with the messages
    the CLI and the web app show."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(512, description="training resolution; SDXL: 1024")
    bucket_step: int = Field(64, description="bucket sides are multiples of this")
    max_tokens: int = Field(
        MODEL_MAX_LENGTH, description="text-encoder limit, start and end tokens included; every SD family: 77")
