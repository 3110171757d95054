"""Config sections shared by every training method: basic, data, validation, optimizer, advanced.

Every default, help text and JSON-schema entry of conjure's settings lives here or in a method's own
section model; the CLI, YAML files, the starter config and the UI forms all read them from these models.
A field that names a file or folder says what it does with it in `json_schema_extra["path"]`: "model" (read:
a model, or a hub id), "data" (read: a data source), "output" (written), "run" (a run folder to continue);
the web app's path gate walks these (conjure.ui.training), and a test keeps every string field classified.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conjure.config.presets import MemoryPreset
from conjure.config.problems import FieldProblem

SEED_MAX = 2**32 - 1
"""Largest `basic.seed`: the 32-bit range apps and numpy use. The noise generator's seed is derived from it
(seed * 7919 + rank), which must stay within the 64 bits torch.Generator.manual_seed takes."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must never be ignored silently), and every
    number must be finite (YAML's .inf and .nan are numbers to pydantic, and no setting means them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class BasicConfig(Section):
    """Base model, where the run goes, how long it trains, and when it saves and validates."""

    base_model: str = Field(
        description="Hub id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5' or "
        "'black-forest-labs/FLUX.1-dev'), a diffusers model folder, or a single-file .safetensors checkpoint "
        "(for FLUX.1: ComfyUI's all-in-one checkpoint, or a transformer file with basic.base_model_config).",
        json_schema_extra={"example": "path/to/model", "path": "model"},
    )
    base_model_config: str | None = Field(
        None,
        description="Only for a single-file checkpoint: a diffusers model folder or hub id whose configs "
        "describe it (needed offline, where diffusers cannot fetch them). Its scheduler's prediction type and "
        "its resolution apply unless the file has a 'v_pred' marker (e.g. an SD 2.x file: point this at "
        "stable-diffusion-2-1 for 768-v or stable-diffusion-2-1-base for 512 epsilon). A FLUX.1 transformer "
        "file (e.g. flux1-dev.safetensors) holds the transformer alone: this model (e.g. "
        "'black-forest-labs/FLUX.1-dev') gives its config and the VAE, text encoders and scheduler (ComfyUI's "
        "all-in-one FLUX.1 checkpoint needs none).",
        json_schema_extra={"path": "model"},
    )
    vae: str | None = Field(
        None,
        description="A VAE to use instead of the base model's, for training and validation: a hub id, a diffusers "
        "VAE folder, or a single .safetensors file (e.g. 'madebyollin/sdxl-vae-fp16-fix' for SDXL in fp16).",
        json_schema_extra={"path": "model"},
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of base_model.")
    variant: str | None = Field(None, description="Weights variant to load, e.g. 'fp16'.")
    family: Literal["auto", "sd1", "sd2", "sdxl", "flux"] = Field(
        "auto",
        description="Model family; 'auto' reads it from the model's own configs (FLUX.1 dev or schnell too). "
        "Naming one also checks that the model is one, and checks settings that depend on it (advanced.clip_skip, "
        "the DDPM-only and flow-only settings of advanced) before anything loads.",
    )
    memory_preset: MemoryPreset | None = Field(
        None,
        description="Sets the memory options together; any of them you set yourself wins. 'fast': no gradient "
        "checkpointing, latents and (where no text encoder trains) text-encoder outputs cached. 'balanced': the "
        "same with gradient checkpointing (less memory, ~30% slower; training is unchanged). 'low_memory': also, on "
        "an NVIDIA GPU, 8-bit AdamW and, for FLUX.1, the frozen transformer in nf4 (else float8): what an 8 GB card "
        "trains an SDXL LoRA with. What this machine cannot run keeps its default (one warning at the start). null: "
        "the options as set. README: 'Memory presets'.",
    )
    output_dir: str = Field("runs", description="Folder that holds run folders.", json_schema_extra={"path": "output"})
    run_name: str | None = Field(
        None,
        description="Name of this run's folder inside output_dir (a plain folder name); default: the method and "
        "a timestamp. An existing non-empty run folder is never overwritten: a numbered suffix is added.",
    )
    seed: int = Field(
        42, ge=0, le=SEED_MAX, description="Seed for data order, augmentation, noise and timesteps."
    )
    max_train_steps: int | None = Field(
        1000, ge=1, description="Optimizer steps to train. Set to null to use max_train_epochs instead."
    )
    max_train_epochs: int | None = Field(
        None, ge=1, description="Epochs to train (a pass over the data set); only when max_train_steps is null."
    )
    save_every_n_steps: int = Field(100, ge=1, description="Write a checkpoint every N steps (and at the end).")
    validate_every_n_steps: int | None = Field(
        100, ge=1, description="Make validation images every N steps (and at the end); null: only at the end."
    )
    keep_last_n_checkpoints: int | None = Field(
        None, ge=1, description="Delete older checkpoints beyond the newest N; null keeps them all."
    )
    resume: str | None = Field(
        None,
        description="Continue a stopped run: 'latest' (the newest checkpoint of this config's run folder), "
        "a run folder, or a checkpoint folder.",
        json_schema_extra={"path": "run"},
    )

    @field_validator("run_name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        # The run folder must stay inside output_dir; a leading '.' would hide it, or clash with the
        # folders conjure keeps there itself (.cache).
        if value is not None and (not value.strip() or value.startswith(".") or any(c in value for c in "/\\\0")):
            raise ValueError(f"a plain folder name (no '/', '\\' or leading '.'), not {value!r}")
        return value

    @model_validator(mode="after")
    def _one_length(self) -> BasicConfig:
        if (self.max_train_steps is None) == (self.max_train_epochs is None):
            raise FieldProblem(
                "basic", "set exactly one of basic.max_train_steps and basic.max_train_epochs (the other to null)"
            )
        return self


class SourceConfig(Section):
    """One source of images among several, with how often it is seen and how much its loss counts."""

    path: str = Field(
        description="A folder of images (with optional same-name .txt captions), a .jsonl file, or a Hugging "
        "Face data set (a save_to_disk or imagefolder-with-metadata folder, or 'hf:owner/name[:split]').",
        json_schema_extra={"example": "path/to/images", "path": "data"},
    )
    repeats: int = Field(1, ge=1, description="How many times each image is seen per epoch.")
    loss_weight: float = Field(1.0, gt=0, description="Multiplies the loss of this source's images.")
    class_images: bool = Field(
        False,
        description="Class (regularisation) images, DreamBooth-style prior preservation: their captions are "
        "used as they are (no caption prefix, token or trigger word), so they keep the model's idea of the class.",
    )
    caption: str | None = Field(
        None, description="One caption for every image of this source (e.g. 'a photo of a dog'), replacing theirs."
    )


class DataConfig(Section):
    """Where the images and captions come from and how they are prepared."""

    source: str | None = Field(
        None,
        description="A folder of images (with optional same-name .txt captions), a .jsonl file of "
        '{"image": ..., "text": ...} lines (paths relative to the file), or a Hugging Face data set (folder or '
        "'hf:owner/name[:split]'). Or use `sources` for several.",
        json_schema_extra={"example": "path/to/images", "starter": "path/to/images", "note": "required (or sources)",
                           "path": "data"},
    )
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Several sources instead of `source`, each with its own repeats, loss weight and role, e.g. "
        "[{path: my-dog, repeats: 10}, {path: dogs, class_images: true, caption: 'a photo of a dog'}].",
    )
    caption_prefix: str = Field("", description="Text put before every caption, e.g. a trigger word.")
    caption_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Share of captions replaced by an empty one (trains the unconditional case that "
        "classifier-free guidance uses; 0.05-0.1 is common for LoRAs).",
    )
    shuffle_caption_delimiter: str | None = Field(
        None, description="Shuffle caption parts split by this delimiter (e.g. ','); null: no shuffling."
    )
    keep_tokens: int = Field(0, ge=0, description="With shuffling: keep the first N caption parts in place.")
    max_token_length: int = Field(
        75,
        ge=75,
        le=225,
        multiple_of=75,  # a number, not a choice of three: the web form's selects send strings
        description="Caption tokens the text encoders read: 75 (one window, as the base models were trained), or "
        "150 / 225: a longer caption is cut in 75-token chunks, each encoded on its own and joined, as kohya's "
        "--max_token_length and A1111/ComfyUI prompts do (SDXL's pooled embedding comes from the first chunk). "
        "Tokens past it are cut off (the run warns how many captions are).",
    )
    keep_in_memory: bool = Field(
        True,
        description="Keep decoded images in memory after the first epoch (with loader workers, each worker keeps "
        "its own copy of the images it has loaded; data.cache_latents avoids decoding altogether).",
    )
    resolution: int | None = Field(
        None, ge=64, multiple_of=64, description="Training resolution in pixels; null: the family's default."
    )
    center_crop: bool = Field(True, description="Crop the centre (true) or a random square (false).")
    random_flip: bool = Field(False, description="Flip images horizontally at random (half of the time).")
    aspect_ratio_buckets: bool = Field(
        False,
        description="Train each image at the size (within the resolution's pixel budget, sides in steps of "
        "bucket_step) closest to its aspect ratio, instead of a square crop: wide and tall images keep their "
        "subject. A batch holds images of one size.",
    )
    bucket_step: int = Field(64, ge=8, multiple_of=8, description="Bucket sides are multiples of this (pixels).")
    bucket_min_side: int | None = Field(
        None, ge=8, description="Shortest bucket side in pixels; null: half the resolution."
    )
    bucket_max_side: int | None = Field(
        None, ge=8, description="Longest bucket side in pixels; null: twice the resolution."
    )
    bucket_max_area: int | None = Field(
        None, ge=64, description="Most pixels a bucket may have; null: resolution x resolution (the square's)."
    )
    cache_latents: Literal["off", "memory", "disk"] = Field(
        "off",
        description="Keep each image's VAE encoding instead of encoding it every step: 'memory' (this run), "
        "'disk' (also later runs; keyed by image content, size, crop, flip and VAE). Needs center_crop: true.",
    )
    cache_text_encoder_outputs: bool = Field(
        False,
        description="Keep the text encoders' output per caption (in memory); only when no text encoder trains "
        "(not for textual inversion, pivotal tuning or lora.train_text_encoder) and captions are not shuffled. On a "
        "GPU every caption and validation prompt is then encoded before training and the text encoders move to the "
        "CPU, leaving the GPU's memory to the denoiser (FLUX.1's T5-XXL alone is 9.5 GB in bf16).",
    )
    cache_dir: str | None = Field(
        None, description="Folder of the disk caches; null: '.cache' inside basic.output_dir.",
        json_schema_extra={"path": "output"},
    )
    batch_size: int = Field(4, ge=1, description="Images per step on each device.")
    dataloader_num_workers: int = Field(0, ge=0, description="Background processes that load images.")

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DataConfig:
        if self.source is None and not self.sources:
            raise FieldProblem("data.source", "required: a folder of images or a .jsonl file (or list data.sources)")
        if self.source is not None and self.sources:
            raise FieldProblem("data", "set data.source or data.sources, not both")
        if self.cache_latents != "off" and not self.center_crop:
            raise FieldProblem(
                "data.cache_latents", "a random crop (center_crop: false) differs every epoch, so its encoding "
                "cannot be kept; set center_crop: true or cache_latents: off"
            )
        if self.cache_text_encoder_outputs and self.shuffle_caption_delimiter is not None:
            # Every shuffled order is a new caption text, so the cache would grow all run long (kohya refuses the
            # same: train_util.py is_text_encoder_output_cacheable). Dropout only adds "" and is fine.
            raise FieldProblem(
                "data.cache_text_encoder_outputs", "shuffled captions (data.shuffle_caption_delimiter) give a new text "
                "almost every step, which the cache would keep without end; set one of them to false/null"
            )
        return self

    def all_sources(self) -> list[SourceConfig]:
        """The sources to read: `sources`, or `source` as one source with the defaults."""
        return list(self.sources) if self.sources else [SourceConfig(path=self.source)]


class ExportConfig(Section):
    """What the files a run writes for sharing say in their headers (README "Files ready to share")."""

    metadata: Literal["full", "minimal", "none"] = Field(
        "full", description="'full': kohya's training record (settings, image counts, tags, data-set folder names, "
        "base model name and hash) as model sites and app info panels show it; 'minimal': no training record, "
        "only the file's kind, title, trigger, description and hashes; 'none': only what apps need to load it.",
    )
    description: str | None = Field(
        None, description="modelspec.description of the files; null: one line of the method, family, images, "
        "steps and trigger.",
    )


class ValidationConfig(Section):
    """Images made during training so you can pick the best step."""

    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts to render at each validation; empty: defaults that use the placeholder/trigger.",
    )
    negative_prompt: str = Field("", description="Negative prompt for every validation image.")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1],
        min_length=1,
        description="One image per seed for each prompt; fixed, so a prompt/seed is comparable across steps.",
    )
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps per validation image.")
    guidance_scale: float | None = Field(
        None, ge=0,
        description="Guidance scale of the validation images; null: the family's usual value (SD/SDXL: 7.5, "
        "classifier-free guidance; FLUX.1-dev: 3.5, the distilled guidance it takes as an input; schnell ignores it).",
    )
    at_start: bool = Field(True, description="Also render before training (step 0), as the baseline.")
    image_scores: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Score each validation's images with validation.score_model: fidelity (similarity to the "
        "training images) and alignment (to the prompt with the token or trigger replaced by its class word), for "
        "`conjure runs score`. 'auto': when the model is on this machine already (never downloads; else one line "
        "says scoring is off); 'on': always (downloads the model if needed; a failure stops the run); 'off'.",
    )
    score_model: str = Field(
        # torchmetrics' CLIPScore default, the CLIP of most papers' CLIP-I/CLIP-T scores
        "openai/clip-vit-large-patch14",
        description="The image-text model (a CLIP: Hugging Face id or folder) of validation.image_scores.",
        json_schema_extra={"path": "model"},
    )
    class_word: str | None = Field(
        None,
        description="The word put in place of the placeholder token or trigger word in the prompts that "
        "alignment scores; null: the textual-inversion initializer, or for a LoRA the trigger word left out.",
    )
    holdout: float = Field(
        0.0, ge=0, lt=1,
        description="Share of the training images kept out of training to measure a held-out loss at every "
        "validation (spread evenly over the sources' order, the same images every run; at least one); 0: none. "
        "`conjure runs score` suggests a step from it.",
    )
    loss_images: str | None = Field(
        None,
        description="A source of images (and captions) for the held-out loss, never trained on: a folder, a .jsonl "
        "file or a Hugging Face data set, as data.source. Used with validation.holdout's images, if any.",
        json_schema_extra={"example": "path/to/held-out", "path": "data"},
    )


class OptimizerConfig(Section):
    """The optimizer (AdamW, 8-bit AdamW, Adafactor or Prodigy) and the learning-rate schedule."""

    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = Field(
        "adamw",
        description="'adamw': PyTorch AdamW. 'adamw8bit': AdamW with 8-bit state from bitsandbytes (less memory; "
        "NVIDIA GPU only; pip install 'conjure[bnb]'). 'adafactor': transformers' Adafactor at learning_rate (its "
        "factored second moment holds a row and a column per matrix, no first moment: far less memory than AdamW, "
        "for full fine-tunes). 'prodigy': finds its own step size; learning_rate then multiplies it (use 1.0).",
    )
    learning_rate: float = Field(
        4e-3, gt=0, description="Peak learning rate. With prodigy: a multiplier of its own step size (1.0 is usual)."
    )
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to learning_rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW-style) weight decay, for every optimizer.")
    fused_backward_pass: bool = Field(
        False,
        description="Full fine-tunes: step each weight as soon as its gradient is complete, during the backward "
        "pass, and free that gradient (kohya's and OneTrainer's fused_backward_pass): the gradients of the whole "
        "model never exist at once (SDXL's UNet: 10 GB less in float32). Needs advanced.max_grad_norm: null and "
        "gradient_accumulation_steps: 1 (both need every gradient at once) and not prodigy or fp16. A step whose "
        "loss is not finite is still counted as skipped, but its weights have already moved.",
    )
    prodigy_d_coef: float = Field(
        1.0, gt=0, description="Prodigy only: scales its step-size estimate (0.5-2 are common); the preferred knob."
    )
    prodigy_safeguard_warmup: bool = Field(
        True, description="Prodigy only: keep the learning rate out of its estimate, which warmup would upset."
    )
    prodigy_use_bias_correction: bool = Field(
        True, description="Prodigy only: Adam's bias correction (smaller first steps)."
    )


class AdvancedConfig(Section):
    """Memory against speed, numerical safety, and the loss: prediction type, min-SNR and noise offset for the
    DDPM (SD) families, timestep sampling, loss weighting and guidance for the flow-matching ones (FLUX.1)."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="'auto': bf16 on GPUs with bf16 hardware (compute capability 8.0+: Ampere and newer), else "
        "fp16 on GPU (T4, V100, RTX 20xx only emulate bf16), and full precision on CPU. "
        "Frozen weights are stored in this precision; trained parameters stay float32.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches summed per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations: less memory, ~30% slower.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm; null: no clipping.")
    max_consecutive_skipped_steps: int = Field(
        25, ge=1,
        description="A step whose loss or gradients are not finite (inf/nan) is skipped: no update, the "
        "learning-rate schedule waits, and the step events count it (skipped_steps). After this many in a row the "
        "run stops, keeping its last checkpoint. fp16's loss scale starts at 2^16 and halves at each overflow, so "
        "its first steps may skip a few times by design; 1: stop at the first.",
    )
    cpu: bool = Field(False, description="Train on the CPU even when a GPU is present.")
    distributed_timeout_s: int = Field(
        1800, ge=10,
        description="Several processes (train --num-processes, accelerate launch): how long a process waits for "
        "the others at a gradient exchange before the run fails instead of hanging. It must outlast the main "
        "process's longest checkpoint and validation, which the others wait through (torch's own default).",
    )
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="Several processes: 'ddp': every process holds the whole model, its gradients and optimizer "
        "state, and the gradients are averaged each step. 'fsdp' (torch's FSDP2; a full fine-tune's UNet, without "
        "EMA or text encoders): "
        "parameters, gradients and optimizer state are sharded, each process holding ~1/N of the trained state, "
        "at the cost of gathering each block's weights in every forward and backward and the whole model at "
        "checkpoints and validation; for a model whose training state does not fit one device (a LoRA's or an "
        "embedding's trained state is small: ddp). 'deepspeed' is refused: use fsdp. One process: no difference.",
    )
    clip_skip: int = Field(
        1,
        ge=1,
        description="SD 1.x/2.x: condition on the text encoder's N-th layer from the end (with its final layer "
        "norm), as kohya's --clip_skip and A1111's 'Clip skip' do; 2 for models made that way (many anime SD 1.5 "
        "models); generate with the same value. 1: the last layer. SDXL reads fixed layers: leave it at 1.",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto",
        description="SD families: what the UNet predicts. 'auto' reads the model's scheduler config, or for a "
        "single file its 'v_pred' marker (SD 2.x files without one: basic.base_model_config or ComfyUI's weight "
        "test); set it when that is wrong. Applies to training and validation. FLUX.1 trains with flow matching: "
        "leave it at auto.",
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="SD families: Min-SNR loss weighting (Hang et al. 2023), down-weights easy low-noise "
        "timesteps; 5.0 is the usual value; null: off. FLUX.1: see loss_weighting.",
    )
    noise_offset: float = Field(
        0.0,
        ge=0,
        le=1,
        description="SD families: offset noise, 0.05-0.1 helps the model learn very dark or very bright images; "
        "0: off. (Not for FLUX.1: flow matching does not have the DDPM schedule's brightness bias it corrects.)",
    )
    timestep_sampling: Literal["logit_normal", "sigmoid", "uniform", "shift"] = Field(
        "logit_normal",
        description="FLUX.1 (flow matching): how each sample's noise level sigma in [0, 1] is drawn. 'logit_normal': "
        "the sigmoid of a normal draw with logit_mean and logit_std (SD3's default; favours the middle noise "
        "levels); 'sigmoid': the sigmoid of a standard normal draw (kohya's sigmoid); 'uniform': every level "
        "alike; 'shift': the sigmoid draw moved toward more noise by the shift FLUX.1 samples with at the "
        "image's size (from the scheduler's base_shift/max_shift: bigger images, more noise; kohya's flux_shift).",
    )
    logit_mean: float = Field(
        0.0, description="FLUX.1 with timestep_sampling logit_normal: the normal draw's mean (> 0: more noise)."
    )
    logit_std: float = Field(
        1.0, gt=0,
        description="FLUX.1 with timestep_sampling logit_normal: the normal draw's spread (larger: more of the "
        "very low and very high noise levels).",
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="FLUX.1: weight each sample's loss by its noise level, as SD3's training scripts can: 'none' "
        "(plain mean squared error, what FLUX.1 LoRA trainers use by default), 'sigma_sqrt' (1/sigma^2), "
        "'cosmap' (the cosine-map weighting of the SD3 paper).",
    )
    guidance: float = Field(
        1.0, ge=0,
        description="FLUX.1-dev: the guidance value fed to the transformer's guidance input while training. dev "
        "is guidance-distilled: instead of classifier-free guidance it takes the guidance scale as an input (3.5 "
        "is typical for generating). 1.0 trains the adapter on dev's unguided prediction, which is also what "
        "de-distilled bases (dev retrained to use real classifier-free guidance) were trained with and expect; "
        "other values train it for one guidance scale. schnell has no guidance input: leave it at 1.0.",
    )
    base_weights_dtype: Literal["auto", "float8", "nf4"] = Field(
        "auto",
        description="How the frozen FLUX.1 transformer is stored: 'auto' in mixed_precision's dtype "
        "(bf16: 2 bytes a weight, ~24 GB for FLUX.1-dev); 'float8' (1 byte: torchao's weight-only float8, "
        "computed in bf16, quantised as it loads so RAM never holds it in bf16; a CUDA GPU or the CPU, slow "
        "there; pip install 'conjure[float8]'); 'nf4' (about half a byte: bitsandbytes' 4-bit NormalFloat, as "
        "QLoRA; needs a CUDA GPU and pip install 'conjure[bnb]'). Only the base weights shrink: the LoRA trains "
        "in float32 either way, slightly less exact under nf4.",
    )


    def misplaced(self, objective: str, title: str) -> tuple[str, str] | None:
        """The first setting changed from its default that belongs to another training objective than
        `objective` (the family's: "ddpm" or "flow"), as (field, why); `title` names the family."""
        for other, fields in OBJECTIVE_SETTINGS.items():
            changed = [(name, default) for name, default in fields.items() if getattr(self, name) != default]
            if other != objective and changed:
                name, default = changed[0]
                models, kind = OBJECTIVES[other]
                return f"advanced.{name}", (f"is for {models} ({kind}), and {title} trains with "
                                            f"{OBJECTIVES[objective][1]}; set it to {json.dumps(default)}")
        return None


# Settings of one training objective only ("ddpm": the SD families' epsilon / v-prediction on the DDPM schedule;
# "flow": FLUX.1's rectified flow), with their defaults. Changed on a family of the other objective they would do
# nothing, silently (min-SNR has no SNR to read under flow matching; a UNet has no guidance input), so they are
# refused. base_weights_dtype quantises the frozen FLUX.1 transformer only.
OBJECTIVE_SETTINGS: dict[str, dict[str, object]] = {
    "ddpm": {"prediction_type": "auto", "min_snr_gamma": None, "noise_offset": 0.0},
    "flow": {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "loss_weighting": "none",
             "guidance": 1.0, "base_weights_dtype": "auto"},
}
OBJECTIVES = {"ddpm": ("SD 1.x, 2.x and SDXL", "the DDPM objective"), "flow": ("FLUX.1", "flow matching")}
