"""`RunConfigBase`: what every config type shares (the type and format version, the basic, data, validation,
optimizer and advanced sections) and the checks of those sections against `basic.family`.

A config type names a training method; the model family is a setting of its own (`basic.family`, 'auto': read
from the model), so one type trains every family its method supports (`FAMILIES`). Settings that apply to some
families only are checked here when the family is named, and once it is detected from the model's configs
(conjure.models.loading, before any weights load).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from conjure.config.presets import apply_to_config
from conjure.config.problems import FieldProblem
from conjure.config.sections import (
    AdvancedConfig, BasicConfig, DataConfig, ExportConfig, OptimizerConfig, ValidationConfig,
)

CONFIG_VERSION: Final = 2
"""Version 1: the config types named the family too (sd_lora, sdxl_lora, ...); conjure.config.migrate reads them."""


# DeepSpeed runs here: deepspeed 0.19.8 installs only from its sdist (pip download: no wheel), compiles its shm
# comm op at first use, and then ZeRO-3 steps a toy model in 2 CPU processes over gloo (measured 2026-12-05, torch
# 2.13). What keeps it out is its engine: `deepspeed.initialize` takes one model and owns the optimizer, gradient
# accumulation, clipping and checkpoints, which conjure's loop holds for every method (its exact resume included).
DEEPSPEED_REFUSED = ("deepspeed is not built in: its engine owns the optimizer, accumulation and checkpoints that "
                     "conjure's loop holds; use fsdp, which shards what ZeRO-3 shards (parameters, gradients, "
                     "optimizer state) with torch itself")


class RunConfigHead(BaseModel):
    """The first keys of every config. A method declares its own sections on a subclass of this, which its config
    class then lists after RunConfigBase: pydantic orders fields along the MRO, so YAML, the schema and the web
    form show the method's sections after `data` and before `validation`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str  # each config type pins its own name (declared here so that it comes first in YAML)
    version: Literal[2] = Field(
        CONFIG_VERSION, description="Config format version; configs of older versions are migrated when loaded."
    )
    basic: BasicConfig
    data: DataConfig


class RunConfigBase(RunConfigHead):
    FAMILIES: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")  # the families the method trains
    FUSED_BACKWARD: ClassVar[bool] = False  # whether the method can take optimizer.fused_backward_pass
    SHARDS: ClassVar[bool] = False  # whether advanced.distributed: fsdp applies (the trained state is the model)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    _migration_notes: list[str] = PrivateAttr(default_factory=list)
    _preset_choices: dict[str, tuple[Any, str]] = PrivateAttr(default_factory=dict)

    @property
    def migration_notes(self) -> list[str]:
        """What conjure.config.migrate changed to load this config (empty for a current one)."""
        return self._migration_notes

    @property
    def preset_choices(self) -> dict[str, tuple[Any, str]]:
        """What basic.memory_preset set, or left, and why: option name -> (value, reason) (conjure.config.presets)."""
        return self._preset_choices

    def trains_text_encoder(self) -> bool:
        """Whether a text encoder (or its embeddings) trains, so its outputs cannot be cached."""
        return True

    def __eq__(self, other: object) -> bool:
        # The settings alone: a config loaded from version 1 equals its version 2 form (pydantic would compare the
        # migration notes too).
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def default_prompts(self) -> list[str]:
        """Validation prompts when none are set."""
        raise NotImplementedError

    def concept_word(self) -> tuple[str, str] | None:
        """The word prompts call the trained concept by, and the word that replaces it in the prompts image
        alignment is scored on (conjure.scoring); None: the prompts are scored as they are."""
        return None

    @model_validator(mode="after")
    def _check_fused_backward(self) -> RunConfigBase:
        """optimizer.fused_backward_pass steps each weight inside the backward pass: what needs every gradient at
        once (or a method's own say over a step: pivotal's frozen token) cannot run with it."""
        opt, adv = self.optimizer, self.advanced
        if not opt.fused_backward_pass:
            return self
        field = "optimizer.fused_backward_pass"
        if not self.FUSED_BACKWARD:
            raise FieldProblem(field, f"only full fine-tunes (type: finetune) step this way, not {self.type}")
        if adv.max_grad_norm is not None:
            raise FieldProblem("advanced.max_grad_norm", "clipping scales every gradient by their joint norm, and "
                               f"{field} never holds them all; set it to null")
        if adv.gradient_accumulation_steps != 1:
            raise FieldProblem("advanced.gradient_accumulation_steps", f"{field} uses each gradient as it is made, "
                               "so none is left to add the next batch's to; set it to 1")
        if opt.optimizer == "prodigy":
            raise FieldProblem(field, "Prodigy's step size comes from every gradient at once; use adamw, "
                               "adamw8bit or adafactor")
        if adv.mixed_precision == "fp16":
            raise FieldProblem(field, "fp16's gradient scaler checks every gradient before any step; use "
                               "advanced.mixed_precision: bf16 or no")
        return self

    @model_validator(mode="after")
    def _check_distributed(self) -> RunConfigBase:
        """advanced.distributed: what cannot shard is refused in one line (conjure.train.sharding)."""
        field, chosen = "advanced.distributed", self.advanced.distributed
        if chosen == "deepspeed":
            raise FieldProblem(field, DEEPSPEED_REFUSED)
        if chosen == "fsdp" and not self.SHARDS:
            raise FieldProblem(field, f"fsdp shards a full fine-tune's weights; a {self.type} run trains a small "
                               "state beside a frozen model, which sharding would not shrink: use ddp")
        return self

    @model_validator(mode="after")
    def _check_family(self) -> RunConfigBase:
        family = self.basic.family
        if family != "auto" and family not in self.FAMILIES:
            raise FieldProblem("basic.family", f"{self.type} trains {' and '.join(self.FAMILIES)} models, not {family}")
        from conjure.families import get

        misplaced = self.advanced.misplaced(get(family).objective, get(family).title) if family != "auto" else None
        if misplaced:
            raise FieldProblem(*misplaced)
        if family != "auto" and not get(family).clip_skip and self.advanced.clip_skip != 1:
            raise FieldProblem(
                "advanced.clip_skip",
                f"{get(family).title} reads fixed text-encoder layers (kohya ignores clip skip there too); set it to 1",
            )
        apply_to_config(self)
        # Written into the resolved config, so the run folder says exactly what was rendered.
        if not self.validation.prompts:
            self.validation.prompts = self.default_prompts()
        return self
