"""The settings a training session reads: the config unpacked once (`LoopSettings.of`) into frozen values, with
the figures setup settles (the resolution, the precision, the number of steps). Nothing below the recipe reads a
config object (torchtune's rule, docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from conjure.export.sharing import model_name

if TYPE_CHECKING:
    from conjure.config import RunConfig


@dataclass(frozen=True)
class ValidationSettings:
    """What the run renders to show its progress (validation.*; `every`: basic.validate_every_n_steps)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    at_start: bool
    every: int | None
    # image scores (conjure.scoring): "auto" | "on" | "off", the model, the prompts alignment scores (the
    # trained word replaced by its class word)
    image_scores: str
    score_model: str
    alignment_prompts: tuple[str, ...]


@dataclass(frozen=True)
class LoopSettings:
    """Every setting the training session reads, unpacked from the config once (`LoopSettings.of`), with
    the figures setup settles: the training resolution, the precision and the number of steps."""

    config_type: str
    base_model: str  # as the files written name it: a hub id or a file name, never a path (export/sharing.py)
    seed: int
    resolution: int
    mixed_precision: str  # "no", "fp16" or "bf16", as resolved (never "auto")
    max_steps: int
    batch_size: int
    dataloader_num_workers: int
    gradient_accumulation_steps: int
    max_grad_norm: float | None
    max_consecutive_skipped_steps: int
    prediction_type: str  # as configured ("auto": the model's own)
    min_snr_gamma: float | None
    noise_offset: float
    # flow matching (FLUX.1): advanced.timestep_sampling, logit_mean, logit_std, loss_weighting, guidance
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    loss_weighting: str
    guidance: float
    base_weights_dtype: str  # "auto", "float8" or "nf4": how the frozen transformer is stored
    save_every_n_steps: int
    keep_last_n_checkpoints: int | None
    validation: ValidationSettings

    @classmethod
    def of(cls, config: RunConfig, *, resolution: int, mixed_precision: str, max_steps: int,
           guidance_scale: float = 7.5) -> LoopSettings:
        """`guidance_scale`: the family's, for a validation section that leaves it null."""
        basic, data, adv, val = config.basic, config.data, config.advanced, config.validation
        return cls(
            config_type=config.type, base_model=model_name(basic.base_model), seed=basic.seed, resolution=resolution,
            mixed_precision=mixed_precision, max_steps=max_steps, batch_size=data.batch_size,
            dataloader_num_workers=data.dataloader_num_workers,
            gradient_accumulation_steps=adv.gradient_accumulation_steps, max_grad_norm=adv.max_grad_norm,
            max_consecutive_skipped_steps=adv.max_consecutive_skipped_steps,
            prediction_type=adv.prediction_type, min_snr_gamma=adv.min_snr_gamma, noise_offset=adv.noise_offset,
            timestep_sampling=adv.timestep_sampling, logit_mean=adv.logit_mean, logit_std=adv.logit_std,
            loss_weighting=adv.loss_weighting, guidance=adv.guidance, base_weights_dtype=adv.base_weights_dtype,
            save_every_n_steps=basic.save_every_n_steps, keep_last_n_checkpoints=basic.keep_last_n_checkpoints,
            validation=ValidationSettings(
                prompts=tuple(val.prompts), seeds=tuple(val.seeds), negative_prompt=val.negative_prompt,
                num_inference_steps=val.num_inference_steps,
                guidance_scale=guidance_scale if val.guidance_scale is None else val.guidance_scale,
                at_start=val.at_start, every=basic.validate_every_n_steps, image_scores=val.image_scores,
                score_model=val.score_model, alignment_prompts=alignment_prompts(val.prompts, config.concept_word()),
            ),
        )


def alignment_prompts(prompts: list[str], concept: tuple[str, str] | None) -> tuple[str, ...]:
    """The validation prompts as alignment scores them: the trained word replaced by its class word."""
    if concept is None:
        return tuple(prompts)
    from conjure.scoring.scorer import with_class_word

    return tuple(with_class_word(p, *concept) for p in prompts)
