"""The run's training record in the header of the files it writes for sharing (issue 24): the `ss_*` keys kohya
sd-scripts writes for the same settings, which model sites and the apps' info panels read (base model, trigger
words, tags, training settings), and the model spec's description and trigger phrase.

The key set is kohya's train_network.py (`metadata` in train(), its one-data-set branch without a data-set
config, and save_model's ss_training_finished_at / ss_steps / ss_epoch), sd-scripts commit 48d368fa
(2026-02-16). Where conjure has no such setting the key holds the value kohya writes when the feature is off
(None, False, 0), so a reader finds every key it knows. Data sets are named by folder name, never by path, as
kohya does (os.path.basename); the base model by `conjure.export.sharing.model_name`.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conjure.export.sharing import base_file_hashes, finish_shared_file, model_name

if TYPE_CHECKING:
    from conjure.config import RunConfig
    from conjure.families import Family
    from conjure.methods import MethodSpec

# kohya's keys for features conjure does not have, with the value kohya writes when they are off
KOHYA_OFF = {
    "ss_num_validation_images": 0, "ss_full_fp16": False, "ss_lowram": False, "ss_multires_noise_iterations": None,
    "ss_multires_noise_discount": None, "ss_adaptive_noise_scale": None, "ss_zero_terminal_snr": False,
    "ss_caption_dropout_every_n_epochs": 0, "ss_caption_tag_dropout_rate": 0.0, "ss_face_crop_aug_range": None,
    "ss_scale_weight_norms": None, "ss_ip_noise_gamma": None, "ss_debiased_estimation": False,
    "ss_noise_offset_random_strength": False, "ss_ip_noise_gamma_random_strength": False, "ss_loss_type": "l2",
    "ss_huber_schedule": None, "ss_huber_scale": None, "ss_huber_c": None, "ss_fp8_base_unet": False,
    "ss_validation_seed": None, "ss_validation_split": 0.0, "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None, "ss_validate_every_n_steps": None, "ss_resize_interpolation": None,
    "ss_color_aug": False, "ss_bucket_no_upscale": False, "ss_reg_dataset_dirs": "{}",
}


@dataclass(frozen=True)
class RunRecord:
    """The record's keys, the level `export.metadata` keeps, and the steps of an epoch (for ss_epoch)."""

    keys: dict[str, str]
    level: str
    steps_per_epoch: float

    def finish(self, files: list[Path], step: int) -> list[Path]:
        """Each safetensors file the recipe wrote, its header made shareable with the record and its hashes."""
        at = {"ss_training_finished_at": str(time.time()), "ss_steps": str(step),
              "ss_epoch": str(max(1, math.ceil(step / self.steps_per_epoch)))}
        for path in files:
            if path.is_file() and path.suffix == ".safetensors":
                finish_shared_file(path, {**self.keys, **at}, self.level)
        return files


def _sources(config: RunConfig, captions: Any) -> tuple[dict, dict, dict]:
    """ss_dataset_dirs, ss_reg_dataset_dirs and ss_tag_frequency: per source, by its folder (or file) name
    (a name taken twice gets " (2)", as kohya does), the images and repeats, and the tags of the captions as
    training reads them (kohya train_util.py set_tag_frequency: comma-separated, stripped, lower case)."""
    from conjure.data.sources import scan_source

    dirs: dict[str, dict[str, int]] = {}
    reg: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for source in config.data.all_sources():
        name = base = model_name(str(source.path).removeprefix("hf:"))
        taken = 2
        while name in dirs or name in reg:
            name, taken = f"{base} ({taken})", taken + 1
        examples = scan_source(Path(source.path).expanduser(), check_images=False).examples
        (reg if source.class_images else dirs)[name] = {"n_repeats": source.repeats, "img_count": len(examples)}
        counts: Counter[str] = Counter()
        for example in examples:
            text = source.caption if source.caption is not None else example.caption
            counts.update(t.strip().lower() for t in captions(text, random.Random(0)).split(",") if t.strip())
        tags[name] = dict(counts)
    return dirs, reg, tags


def run_record(config: RunConfig, spec: MethodSpec, family: Family, *, sizes: list[tuple[int, int]],
               class_images: int, per_epoch: int, max_steps: int, mixed_precision: str,
               num_processes: int, optimizer: str, validation_images: int = 0, main: bool = True) -> RunRecord:
    """The record of a run about to start; `sizes`: each training item's bucket (the data set's `sizes`);
    `validation_images`: the held-out loss's images (validation.holdout), kohya's validation split; `main`:
    whether this is the process that writes the files (the others do not hash the base model)."""
    from conjure.data.captions import caption_transform

    basic, data, adv, opt = config.basic, config.data, config.advanced, config.optimizer
    lora = getattr(config, "lora", None)
    dirs, reg, tags = _sources(config, caption_transform(data, spec.token(config), dropout=False))
    te_lr = (lora.text_encoder_learning_rate or opt.learning_rate) if lora and lora.train_text_encoder else None
    buckets = Counter(sizes)
    keys: dict[str, Any] = {
        **KOHYA_OFF,
        "ss_session_id": secrets.randbelow(2**32), "ss_training_started_at": time.time(),
        "ss_learning_rate": opt.learning_rate, "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": (lora.unet_learning_rate if lora else None) or opt.learning_rate,
        "ss_num_train_images": len(sizes) - class_images, "ss_num_reg_images": class_images,
        "ss_num_validation_images": validation_images,
        "ss_num_batches_per_epoch": per_epoch,
        "ss_num_epochs": math.ceil(max_steps * adv.gradient_accumulation_steps / per_epoch),
        "ss_gradient_checkpointing": adv.gradient_checkpointing,
        "ss_gradient_accumulation_steps": adv.gradient_accumulation_steps, "ss_max_train_steps": max_steps,
        "ss_lr_warmup_steps": opt.warmup_steps, "ss_lr_scheduler": opt.scheduler,
        "ss_network_dropout": lora.dropout if lora else None, "ss_mixed_precision": mixed_precision,
        "ss_clip_skip": adv.clip_skip if family.clip_skip else None, "ss_max_token_length": data.max_token_length,
        "ss_cache_latents": data.cache_latents != "off", "ss_seed": basic.seed,
        "ss_noise_offset": adv.noise_offset or None, "ss_optimizer": optimizer,
        "ss_max_grad_norm": adv.max_grad_norm, "ss_caption_dropout_rate": data.caption_dropout,
        "ss_prior_loss_weight": next((s.loss_weight for s in data.all_sources() if s.class_images), 1.0),
        "ss_min_snr_gamma": adv.min_snr_gamma, "ss_fp8_base": adv.base_weights_dtype == "float8",
        "ss_batch_size_per_device": data.batch_size,
        "ss_total_batch_size": data.batch_size * num_processes * adv.gradient_accumulation_steps,
        "ss_flip_aug": data.random_flip, "ss_random_crop": not data.center_crop,
        "ss_shuffle_caption": data.shuffle_caption_delimiter is not None, "ss_keep_tokens": data.keep_tokens,
        "ss_enable_bucket": data.aspect_ratio_buckets,
        "ss_min_bucket_reso": data.bucket_min_side, "ss_max_bucket_reso": data.bucket_max_side,
        "ss_dataset_dirs": json.dumps(dirs), "ss_reg_dataset_dirs": json.dumps(reg),
        "ss_tag_frequency": json.dumps(tags),
        "ss_bucket_info": json.dumps({"buckets": {i: {"resolution": list(size), "count": n}
                                                  for i, (size, n) in enumerate(sorted(buckets.items()))}}
                                     if data.aspect_ratio_buckets else None),
        "ss_sd_model_name": model_name(basic.base_model), **(base_file_hashes(basic.base_model) if main else {}),
    }
    if basic.vae:
        keys["ss_vae_name"] = model_name(basic.vae)
        keys.update({k.replace("sd_model", "vae"): v for k, v in (base_file_hashes(basic.vae) if main else {}).items()})
    if family.objective == "flow":
        keys.update(_flow_keys(adv, family))
    trigger = spec.trigger(config)
    if trigger:
        keys["modelspec.trigger_phrase"] = trigger
    keys["modelspec.description"] = config.export.description or _description(
        config, family, trigger, len(sizes) - class_images, max_steps)
    return RunRecord({k: str(v) for k, v in keys.items()}, config.export.metadata,
                     per_epoch / adv.gradient_accumulation_steps)


def _flow_keys(adv: Any, family: Family) -> dict[str, Any]:
    """kohya flux_train_network.py update_metadata's keys for a flow-matching model (48d368fa), in its vocabulary
    (library/flux_train_utils.py): conjure's `shift` sampling is its `flux_shift`; the target is the velocity as
    the model predicts it (`raw`); T5's padding is not masked (train/flux.py); no discrete shift or mode scale."""
    return {
        "ss_model_type": family.name, "ss_apply_t5_attn_mask": False, "ss_weighting_scheme": adv.loss_weighting,
        "ss_logit_mean": adv.logit_mean, "ss_logit_std": adv.logit_std, "ss_mode_scale": None,
        "ss_guidance_scale": adv.guidance, "ss_sigmoid_scale": 1.0, "ss_model_prediction_type": "raw",
        "ss_timestep_sampling": {"shift": "flux_shift"}.get(adv.timestep_sampling, adv.timestep_sampling),
        "ss_discrete_flow_shift": None,
    }


def _description(config: RunConfig, family: Family, trigger: str | None, images: int, steps: int) -> str:
    what = {"textual_inversion": "Textual inversion embedding", "lora": "LoRA", "pivotal": "Pivotal-tuning LoRA "
            "and embedding", "finetune": "Fine-tuned model"}.get(config.type, config.type)
    if config.type == "lora" and getattr(config, "lora").dora:
        what = "DoRA"
    words = f"; trigger: {trigger}" if trigger else ""
    return f"{what} for {family.title}, trained with conjure on {images} images for {steps} steps{words}"
