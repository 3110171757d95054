"""The `finetune` config: a full fine-tune of an SD 1.x/2.x or SDXL model (every UNet weight trains, and the text
encoders that are given a learning rate), saved as a diffusers model folder and a single-file checkpoint."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from conjure.config.base import RunConfigBase, RunConfigHead
from conjure.config.problems import FieldProblem
from conjure.config.sections import OptimizerConfig, Section


class EmaSection(Section):
    """An exponential moving average of the trained weights, which validation and the saved model can use."""

    enabled: bool = Field(False, description="Keep an EMA of the trained weights (one more copy of them in memory).")
    decay: float = Field(
        0.9999, gt=0, lt=1,
        description="Weight of the old average per optimizer step (diffusers' EMAModel defaults to 0.9999, as its "
        "text-to-image example's --use_ema trains with). "
        "Early on the decay is at most (1 + step) / (10 + step), as in diffusers' EMAModel, so a short run's "
        "average is not stuck at the base model.",
    )
    update_every: int = Field(
        1, ge=1,
        description="Update the average every N optimizer steps (each update then counts as N steps: the decay is "
        "raised to the power N, so the average spans as many steps whatever N is).",
    )
    on_cpu: bool = Field(
        False, description="Keep the average in the CPU's memory instead of the GPU's (slower updates, less VRAM)."
    )
    use_for_validation: bool = Field(True, description="Render validation images with the EMA weights.")
    use_for_save: bool = Field(True, description="Save the EMA weights as the model (false: the trained weights).")


class FinetuneSection(Section):
    """What trains (the UNet always; text encoders with a learning rate of their own), the EMA, and the files."""

    unet_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the UNet; null: optimizer.learning_rate."
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0,
        description="Train the (first) text encoder at this learning rate; null: it stays frozen. Full fine-tunes "
        "usually train it slower than the UNet, if at all.",
    )
    text_encoder_2_learning_rate: float | None = Field(
        None, gt=0, description="SDXL: train the second text encoder (OpenCLIP bigG) at this rate; null: frozen."
    )
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="How the trained weights are stored: 'fp32' masters (4 bytes a weight), or 'bf16' (2 bytes: "
        "SDXL's UNet 5 GB less), each step computed in float32 and rounded back stochastically (OneTrainer's "
        "bf16 stochastic rounding), so updates below bf16's resolution still count on average. bf16 needs "
        "optimizer.fused_backward_pass (one weight at a time in float32) and advanced.mixed_precision: bf16.",
    )
    ema: EmaSection = Field(default_factory=EmaSection)
    save_dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="Precision of the saved model (fp16: what apps load; half the size of fp32)."
    )
    single_file: bool = Field(
        True,
        description="Also write the model as one `<name>.safetensors` in the original (LDM/SGM) layout: the "
        "checkpoint file A1111/Forge, ComfyUI and InvokeAI load as a main model (the same size again on disk).",
    )
    output_name: str | None = Field(
        None, description="Name of the saved model folder (and file) inside each checkpoint; null: the run's name."
    )

    @field_validator("output_name")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(r"[\w.-]+", value) or value in (".", "..")):
            raise ValueError("use letters, digits, '.', '-' and '_' only (it becomes a folder name)")
        return value

    def learning_rates(self) -> dict[str, float | None]:
        """Pipeline component -> its learning rate (None: frozen; the UNet's None: optimizer.learning_rate)."""
        return {"unet": self.unet_learning_rate, "text_encoder": self.text_encoder_learning_rate,
                "text_encoder_2": self.text_encoder_2_learning_rate}


class FinetuneOptimizerConfig(OptimizerConfig):
    # Full fine-tunes move every weight: their rates are 100-1000x below an adapter's. diffusers' text-to-image
    # example trains SD at 1e-5 (examples/text_to_image/README.md, with --use_ema); kohya's train_util.py
    # defaults --learning_rate to 2e-6.
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (full fine-tunes: 1e-6 to 1e-5).")


class _FinetuneSections(RunConfigHead):
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)


class FinetuneConfig(RunConfigBase, _FinetuneSections):
    """Full fine-tune: every weight of the UNet (and optionally the text encoders) trains; a diffusers model folder
    and a single-file checkpoint."""

    type: Literal["finetune"] = "finetune"
    # FLUX.1 is not built yet: its 12B transformer needs the fused backward pass and block offloading first.
    FAMILIES: ClassVar[tuple[str, ...]] = ("sd1", "sd2", "sdxl")
    FUSED_BACKWARD: ClassVar[bool] = True
    SHARDS: ClassVar[bool] = True
    optimizer: FinetuneOptimizerConfig = Field(default_factory=FinetuneOptimizerConfig)

    def default_prompts(self) -> list[str]:
        return ["a photo", "a painting of a landscape"]

    def trains_text_encoder(self) -> bool:
        return any(lr is not None for name, lr in self.finetune.learning_rates().items() if name != "unet")

    @model_validator(mode="after")
    def _bf16_weights(self) -> FinetuneConfig:
        if self.finetune.weights_dtype == "bf16" and not self.optimizer.fused_backward_pass:
            raise FieldProblem("finetune.weights_dtype", "bf16 weights step in float32 one at a time inside the "
                               "backward pass: set optimizer.fused_backward_pass: true")
        if self.finetune.weights_dtype == "bf16" and self.advanced.mixed_precision != "bf16":
            raise FieldProblem("finetune.weights_dtype", "bf16 weights compute in bf16: set "
                               "advanced.mixed_precision: bf16")
        return self

    @model_validator(mode="after")
    def _what_fsdp_shards(self) -> FinetuneConfig:
        """advanced.distributed: fsdp shards the UNet (conjure.train.sharding) and nothing that holds its weights
        whole beside it."""
        if self.advanced.distributed != "fsdp":
            return self
        if self.finetune.ema.enabled:
            raise FieldProblem("finetune.ema.enabled", "the EMA is a whole copy of the trained weights, which "
                               "advanced.distributed: fsdp shards; set it to false or use ddp")
        # fully_shard makes a sharded model's class a subclass of its own, and transformers 5.25 finds a model's
        # hidden-state recorders by its exact class (_CAN_RECORD_REGISTRY, utils/output_capturing.py): a sharded
        # CLIP returns no hidden states, which SDXL and clip skip read.
        encoders = [name for name, lr in self.finetune.learning_rates().items() if name != "unet" and lr is not None]
        if encoders:
            raise FieldProblem(f"finetune.{encoders[0]}_learning_rate", "advanced.distributed: fsdp shards the UNet "
                               "only, not the text encoders; set it to null (the encoder stays frozen) or use ddp")
        return self

    @model_validator(mode="after")
    def _encoders_of_the_family(self) -> FinetuneConfig:
        from conjure.families import get

        family = self.basic.family
        if family == "auto":
            return self  # checked by the recipe once the model says which it is
        encoders = {slot.encoder for slot in get(family).text_encoders}
        for name, lr in self.finetune.learning_rates().items():
            if lr is not None and name != "unet" and name not in encoders:
                raise FieldProblem(f"finetune.{name}_learning_rate", f"{get(family).title} has no {name}")
        return self
