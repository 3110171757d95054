"""How `conjure caption` and the web app's caption buttons caption images: one typed model, the single source of
the settings' defaults and help for the CLI's options and the web API's body (as `CheckSettings` is for the
check). Apart from conjure.data.autocaption, which imports torch: the CLI builds its parser from this on every
start.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"
"""Florence-2 base in the layout transformers loads natively (no trust_remote_code); why: docs/captions.md."""


class CaptionSettings(BaseModel):
    """The settings of `conjure.data.autocaption.caption_images`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_CAPTION_MODEL, description="image-to-text model: a Hub id or a local folder "
                       "(anything AutoModelForImageTextToText loads)")
    style: Literal["sentence", "tags"] = Field(
        "sentence", description="sentence: a one-line description; tags: comma-separated object names (Florence-2's "
        "object detection; see docs/captions.md for its limits)")
    prompt: str | None = Field(None, description="text given to the model with each image (default: Florence-2's "
                               "<CAPTION> or <OD> task; other models: none)")
    prefix: str = Field("", description="word put in front of every new caption, e.g. the trigger word")
    overwrite: bool = Field(False, description="replace existing captions (default: caption only images without one)")
    batch_size: int = Field(4, ge=1, description="images captioned at once")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when there is one")
    max_new_tokens: int = Field(256, ge=1, description="longest answer, in tokens (object detection needs 5 per "
                                "object)")
