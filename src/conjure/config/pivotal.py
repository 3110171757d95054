"""The `pivotal` config (pivotal tuning): a LoRA and its own new token, trained together in one loop.

The token is trained with its own learning rate and can be frozen after a fraction of the steps, so the
LoRA spends the rest of the run learning around a fixed word (the "pivot").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conjure.config.base import RunConfigBase, RunConfigHead
from conjure.config.lora import LoraAdapterSection, LoraOptimizerConfig
from conjure.config.problems import FieldProblem
from conjure.config.textual_inversion import TextualInversionSection, ti_concept_word


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


class _PivotalSections(RunConfigHead):
    textual_inversion: PivotalTextualInversionSection
    lora: LoraAdapterSection = Field(default_factory=LoraAdapterSection)


class PivotalConfig(RunConfigBase, _PivotalSections):
    """Pivotal tuning: a LoRA or DoRA and its own new token, trained together (SDXL: the token in both encoders)."""

    type: Literal["pivotal"] = "pivotal"
    optimizer: LoraOptimizerConfig = Field(default_factory=LoraOptimizerConfig)

    def default_prompts(self) -> list[str]:
        return default_pivotal_prompts(self.textual_inversion.placeholder_token)

    def concept_word(self) -> tuple[str, str] | None:
        return ti_concept_word(self.textual_inversion, self.validation.class_word)

    @model_validator(mode="after")
    def _bundle_needs_kohya(self) -> PivotalConfig:
        if self.textual_inversion.bundle and self.lora.save_format != "kohya":
            raise FieldProblem(
                "textual_inversion.bundle",
                "a bundled embedding needs lora.save_format: kohya (the PEFT format cannot carry it)",
            )
        return self
