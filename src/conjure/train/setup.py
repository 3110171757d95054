"""Everything a run needs before its first step: the data scan, the model, the accelerator and precision,
the model's placement, the run folder, the data set, buckets and caches, the optimizer and its schedule.

This is the only part of training that reads the config. `assemble` unpacks what the training session needs
into one frozen `LoopSettings`, once, and hands the session plain values and built objects: torchtune's
recipes do the same ("we tend not to pass cfg objects to utilities"), so a setting is read in one place and
nothing below the recipe depends on the config's shape.
"""

from __future__ import annotations

import errno
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conjure.config.presets import summary as preset_summary
from conjure.errors import ConjureError
from conjure.models.loading import Fact, LoadedModel
from conjure.runs.checkpoints import kept_checkpoint
from conjure.runs.folder import with_absolute_paths
from conjure.train.control import say
from conjure.train.launch import refuse_sharding
from conjure.train.heldout import SEED as HELD_OUT_SEED
from conjure.train.optimizers import build_optimizer, optimizer_warnings
from conjure.train.kohya_record import RunRecord, run_record
from conjure.train.settings import LoopSettings

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import PreTrainedTokenizerBase

    from conjure.config import RunConfig
    from conjure.config.sections import AdvancedConfig, DataConfig
    from conjure.data.dataset import MicroBatchSampler, TrainDataset
    from conjure.data.example import Example
    from conjure.methods import MethodSpec, Recipe
    from conjure.families import Family
    from conjure.train.caches import LatentCache, TextCache
    from conjure.train.conditioning import TextReading

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class SessionParts:
    """What setup hands the training session: its settings and what it built from the config."""

    settings: LoopSettings
    dataset: TrainDataset
    params: list[torch.nn.Parameter]  # every trained parameter, in the optimizer's group order
    optimizer: torch.optim.Optimizer
    lr_scheduler: LambdaLR
    latent_cache: LatentCache | None
    text_cache: TextCache | None
    record: RunRecord  # what the files it writes say of the run (train/kohya_record.py)
    held_out: TrainDataset | None = None  # the held-out loss's images (conjure.train.heldout)


@contextmanager
def disk_full_as_one_line(run_dir: Path) -> Iterator[None]:
    """A full disk anywhere in the run (config, events, logs, validation images) becomes one line naming the
    file and the checkpoint that is left (checkpoint writes say so themselves, conjure.runs.checkpoints)."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ConjureError(f"disk full while writing {exc.filename or run_dir}; {kept_checkpoint(run_dir)}") from exc


def scan_data(config: RunConfig, spec: MethodSpec
              ) -> tuple[list[Example], list[tuple[Path, str]], list[str], list[Example]]:
    """Examples to train on, skipped files, each example's caption as training would first see it, and the
    held-out examples (conjure.train.heldout.split)."""
    from conjure.data.captions import caption_transform
    from conjure.data.sources import scan_sources
    from conjure.train.heldout import split

    scan = scan_sources(config.data.all_sources())
    examples, held, unreadable = split(scan.examples, config.validation.holdout, config.validation.loss_images)
    captions = caption_transform(config.data, spec.token(config), dropout=False)  # what a caption is, undropped
    probe = [captions(ex.caption, random.Random(0)) for ex in examples if not ex.is_class]
    trigger = spec.trigger(config)
    if not probe:
        raise ConjureError("every data source is marked class_images: add one with the images to learn from")
    if trigger and not any(trigger in c for c in probe):
        hint = spec.trigger_hint(config) or f"add it to the captions, or set data.caption_prefix: '{trigger}'"
        raise ConjureError(f"no training caption contains {trigger!r}: {hint}")
    return examples, scan.skipped + unreadable, probe, held


def load_model(config: RunConfig, spec: MethodSpec) -> LoadedModel:
    from conjure.models.loading import load_base_model
    from conjure.models.quantize import check_base_weights_dtype

    basic, adv = config.basic, config.advanced
    check_base_weights_dtype(adv.base_weights_dtype, cpu=adv.cpu)
    return load_base_model(
        basic.base_model, family=basic.family, revision=basic.revision, variant=basic.variant,
        base_model_config=basic.base_model_config, allowed_families=spec.families, method=config.type,
        prediction_type=adv.prediction_type, vae=basic.vae, advanced=adv,
        frozen_dtype=WEIGHT_DTYPES[resolve_precision(adv.mixed_precision, cpu=adv.cpu).value], defer_denoiser=True,
    )


def text_reading(config: RunConfig, model: LoadedModel) -> TextReading:
    from conjure.train.conditioning import TextReading

    encoders = [encoder for _, encoder in model.text_encoders()]
    return TextReading.of(model.family, encoders, clip_skip=config.advanced.clip_skip,
                          max_tokens=config.data.max_token_length)


def resolve_precision(requested: str, *, cpu: bool) -> Fact:
    if requested != "auto":
        return Fact(requested, "advanced.mixed_precision")
    if cpu:
        return Fact("no", "advanced.cpu")
    if not torch.cuda.is_available():
        return Fact("no", "no CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    card = f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"
    # Not torch.cuda.is_bf16_supported(): by default it also says True where bf16 is only emulated (before
    # Ampere: T4, V100, RTX 20xx), where cuDNN has no bf16 convolutions (pytorch#148322; diffusers#14129 made
    # the same change).
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return Fact("bf16", f"auto: {card} has bf16")
    return Fact("fp16", f"auto: {card} has no bf16 hardware")


def machine_preset(config: RunConfig, model: LoadedModel, device: torch.device) -> RunConfig:
    """`config` with basic.memory_preset's options that depend on this machine and model set where they can
    apply (conjure.config.presets); what cannot is said in one warning."""
    from conjure.config.presets import apply_to_machine
    from conjure.config.sections import OBJECTIVE_SETTINGS

    resolved, warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS[model.family.objective],
                                         device=device)
    if warning:
        say(f"warning: {warning}")
    return resolved  # type: ignore[return-value]  # a copy of `config`, of its type


def chosen_facts(model: LoadedModel, resolution: int | None, precision: Fact,
                 preset: dict[str, tuple[Any, str]] | None = None) -> dict[str, Fact]:
    """What this run trains with and why: the model's facts, the resolution, the precision, and the options
    basic.memory_preset set or left (`preset`: option -> (value, why))."""
    facts = dict(model.facts)
    if resolution:
        facts["resolution"] = Fact(resolution, "data.resolution")
    return {**facts, "mixed_precision": precision, **{name: Fact(*choice) for name, choice in (preset or {}).items()}}


def describe(chosen: dict[str, Fact]) -> str:
    prediction, resolution = chosen["prediction_type"], chosen["resolution"]
    precision = chosen["mixed_precision"]
    vae = chosen["vae"]
    if "zero_terminal_snr" in chosen:  # a DDPM family
        zero_snr = chosen["zero_terminal_snr"]
        schedule = "zero-terminal-SNR" if zero_snr.value else "standard"
        target = (f"training target: {prediction.value} (from {prediction.source}), {schedule} noise schedule "
                  f"(from {zero_snr.source})")
    else:  # a flow family: its variant instead of a noise schedule
        variant = chosen["variant"]
        target = (f"training objective: flow matching (from {prediction.source}), variant {variant.value} "
                  f"(from {variant.source})")
    preset = {name: (fact.value, fact.source) for name, fact in chosen.items()
              if fact.source.startswith("basic.memory_preset")}
    return (f"{target}, {resolution.value} px (from {resolution.source}), "
            f"precision {precision.value} (from {precision.source}), VAE {vae.value} (from {vae.source})"
            + (f"; {preset_summary(preset)} (from basic.memory_preset)" if preset else ""))


def make_accelerator(adv: AdvancedConfig) -> tuple[Accelerator, Fact]:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    refuse_sharding()
    precision = resolve_precision(adv.mixed_precision, cpu=adv.cpu)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # precision; train() is called repeatedly in one process (tests, benchmarks), so start each run afresh.
    # (The distributed PartialState is kept.)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=precision.value, gradient_accumulation_steps=adv.gradient_accumulation_steps, cpu=adv.cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=adv.distributed_timeout_s))],
    )
    if precision.value == "fp16" and accelerator.device.type == "cpu":
        # accelerate gives fp16 autocast and its gradient scaler to GPUs only; on the CPU the fp16 weights
        # would meet fp32 activations at the first layer ("mat1 and mat2 must have the same dtype").
        raise ConjureError("advanced.mixed_precision: fp16 needs a GPU, and this run is on the CPU; use bf16 or no")
    return accelerator, precision


def place_model(model: LoadedModel, device: torch.device, precision: str, base_weights: str = "auto",
                on_cpu: tuple[str, ...] = ()) -> None:
    """Freeze every part and cast it to the training precision (methods then add trainable fp32 parts);
    `base_weights` (advanced.base_weights_dtype) "float8" or "nf4" then stores the denoiser's Linear weights so.
    `on_cpu`: parts that stay on the CPU (text encoders whose outputs were encoded ahead: train/text_ahead.py)."""
    from conjure.models.quantize import quantize_frozen

    for name, part in model.components.items():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
            # fp16 VAEs overflow on some models (SDXL's is the known case); fp32 costs little here.
            keep_fp32 = name == "vae" and precision == "fp16"
            dtype = torch.float32 if keep_fp32 else WEIGHT_DTYPES[precision]
            if base_weights != "auto" and part is model.denoiser:
                # Cast where it is, then each layer moves to the device as it is converted: the device never
                # holds the whole transformer at full precision (FLUX.1-dev: 23.8 GB in bf16). Before the method
                # adds its adapters, so only base layers convert.
                quantize_frozen(part.to(dtype), base_weights, device)
                part.to(device)  # the rest (norms, embedders); converted weights keep their form
            else:
                part.to("cpu" if name in on_cpu else device, dtype)


def open_run_dir(config: RunConfig, resume: str | None, accelerator: Accelerator) -> tuple[Path | None, Path]:
    """The checkpoint to resume from (None for a new run) and the run folder, created for a new run by the main
    process, whose choice of name (`create_run_dir` adds a suffix to a taken one) the other processes receive."""
    from accelerate.utils import broadcast_object_list

    from conjure.runs.folder import create_run_dir, default_run_name, find_resume_checkpoint

    basic = config.basic
    if resume:
        checkpoint = find_resume_checkpoint(
            resume, output_dir=basic.output_dir, run_name=basic.run_name, config_type=config.type
        )
        return checkpoint, checkpoint.parent.parent
    folder = [create_run_dir(basic.output_dir, basic.run_name or default_run_name(config.type))
              if accelerator.is_main_process else None]
    broadcast_object_list(folder)
    assert folder[0] is not None  # the main process's, received
    return None, folder[0]


def completed_at(run_dir: Path, step: int) -> bool:
    """Whether the run's events say it ended, completed, at `step` (a kill during the final validation leaves
    the last checkpoint without that end)."""
    from conjure.runs.events import EVENTS_FILE, Event, read_events

    events = read_events(run_dir / EVENTS_FILE).events
    return any(e.get("event") == Event.END and e.get("status") == "completed" and e.get("step") == step for e in events)


def resolved_config(config: RunConfig, run_dir: Path, resolution: int) -> RunConfig:
    """What runs, as the run's `config.yaml` records it: its own folder and name, the resolution, and
    absolute paths (so `--resume RUN` works from any folder)."""
    resolved = with_absolute_paths(config)
    resolved.basic.run_name, resolved.basic.resume, resolved.data.resolution = run_dir.name, None, resolution
    resolved.basic.output_dir = str(run_dir.parent.absolute())
    return resolved


def count_long_captions(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_tokens: int) -> int:
    """Captions with more than `max_tokens` tokens besides the start and end tokens."""
    return sum(len(ids) > max_tokens + 2 for ids in tokenizer(captions).input_ids) if captions else 0


def start_warnings(config: RunConfig, skipped: list[tuple[Path, str]], changed: dict[str, tuple[Any, Any]],
                   long_captions: int, limit: str) -> list[str]:
    """What the person starting the run should know: what a config migration changed, files skipped, settings a
    resume changed, long captions."""
    return (config.migration_notes + [f"skipping {p}: {why}" for p, why in skipped]
            + (["resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())]
               if changed else [])
            + ([f"{long_captions} caption(s) are longer than the text encoder's limit ({limit}) and will be cut off"]
               if long_captions else []))


def assemble(config: RunConfig, spec: MethodSpec, model: LoadedModel, recipe: Recipe, accelerator: Accelerator,
             examples: list[Example], *, resolution: int, mixed_precision: str,
             text_cache: TextCache | None = None, held: list[Example] | None = None) -> SessionParts:
    """The data set, the settings, the optimizer and its schedule, and the caches (none of it draws a random
    number: what a run trains does not depend on where they are built); `text_cache`: one filled ahead."""
    from diffusers.optimization import get_scheduler

    from conjure.data.dataset import batches_per_epoch

    basic, data, adv, opt = config.basic, config.data, config.advanced, config.optimizer
    if adv.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
        for name, module in recipe.trainable_modules().items():
            if name != model.family.denoiser:  # a transformers model: 5.x renamed the call (the old name warns
                # FutureWarning until v6 removes it: modeling_utils.py, 5.25.0); earlier 5.x have only the old one
                enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
                enable()
    dataset = _dataset(config, spec, examples, resolution, model.family)
    per_epoch = batches_per_epoch(dataset.sizes, data.batch_size * accelerator.num_processes)
    accum = adv.gradient_accumulation_steps
    if basic.max_train_steps:
        max_steps = basic.max_train_steps
    else:
        assert basic.max_train_epochs is not None  # BasicConfig sets exactly one of the two
        max_steps = math.ceil(basic.max_train_epochs * per_epoch / accum)
    settings = LoopSettings.of(config, resolution=resolution, mixed_precision=mixed_precision, max_steps=max_steps,
                               guidance_scale=model.family.guidance_scale)
    if opt.fused_backward_pass and (mixed_precision == "fp16" or accelerator.num_processes > 1):
        # What the config could not know: the precision "auto" chose, the processes. DDP reduces gradients in
        # buckets after the hooks that would already have stepped on each process's own.
        why = "fp16's gradient scaler needs every gradient" if mixed_precision == "fp16" else "several processes"
        raise ConjureError(f"optimizer.fused_backward_pass cannot run with {why}; set it to false")
    groups = recipe.parameter_groups(opt.learning_rate)
    optimizer = build_optimizer(groups, opt, device=accelerator.device)
    for warning in optimizer_warnings(opt, groups):
        say(f"warning: {warning}")
    lr_scheduler = get_scheduler(
        SCHEDULES[opt.scheduler], optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=max_steps
    )
    latent_cache, fresh_text_cache = _caches(config, model, recipe.trainable_modules())
    held_out = _dataset(config, spec, held, resolution, model.family, held_out=True) if held else None
    record = run_record(config, spec, model.family, sizes=dataset.sizes, per_epoch=per_epoch, max_steps=max_steps,
                        class_images=sum(e.is_class for e in examples), mixed_precision=mixed_precision,
                        num_processes=accelerator.num_processes, validation_images=len(held or []),
                        optimizer=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
                        main=accelerator.is_main_process)
    return SessionParts(settings, dataset, [p for g in groups for p in g["params"]], optimizer, lr_scheduler,
                        latent_cache, text_cache or fresh_text_cache, record, held_out)


def data_loader(dataset: TrainDataset, settings: LoopSettings, *, first: int, end: int, rank: int,
                world: int) -> tuple[torch.utils.data.DataLoader, MicroBatchSampler]:
    """The loader of micro-batches `first` to `end` (exclusive) of the run, this process's share, and its
    sampler (which knows each micro-batch's size across the processes)."""
    from conjure.data.dataset import MicroBatchSampler, collate

    sampler = MicroBatchSampler(dataset.sizes, settings.batch_size, settings.seed, first, end, rank, world)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=settings.dataloader_num_workers,
        generator=torch.Generator().manual_seed(settings.seed),  # its worker seed, not a global draw
    ), sampler


def global_rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG states a checkpoint keeps: dropout (PEFT's lora_dropout, InputColumnDora's) draws from them."""
    return {"cpu": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {})}


def set_global_rng(states: dict[str, Any] | None, device: torch.device) -> None:
    """Restore the global RNG a checkpoint saved (checkpoints written before it was saved have none)."""
    if not states:
        return
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def _dataset(config: RunConfig, spec: MethodSpec, examples: list[Example], resolution: int,
             family: Family, *, held_out: bool = False) -> TrainDataset:
    """The training data set, or (`held_out`) the held-out loss's: the same in every run (centred, unflipped,
    captions undropped, any shuffle from a fixed seed)."""
    from conjure.data.captions import caption_transform
    from conjure.data.dataset import TrainDataset

    data = config.data
    dataset = TrainDataset(
        examples, resolution=resolution, center_crop=data.center_crop or held_out,
        random_flip=data.random_flip and not held_out, keep_in_memory=data.keep_in_memory,
        caption_transform=caption_transform(data, spec.token(config), dropout=not held_out),
        class_caption_transform=caption_transform(data, None, class_images=True, dropout=not held_out),
        seed=HELD_OUT_SEED if held_out else config.basic.seed,
        buckets=_buckets(data, resolution, family),
    )
    small = dataset.upscaled()
    if small:
        say(f"warning: {len(small)} image(s) are smaller than their training size ({resolution} px) and will be "
            f"scaled up, which blurs them (first: {small[0]}); `conjure dataset check` lists them")
    return dataset


def _caches(config: RunConfig, model: LoadedModel, trainable: dict[str, torch.nn.Module]
            ) -> tuple[LatentCache | None, TextCache | None]:
    """The latent and text-encoder caches the data section asks for (None where it does not)."""
    from conjure.train.caches import LatentCache, TextCache, vae_identity

    data = config.data
    latent, text = None, None
    if data.cache_latents != "off":
        folder = Path(data.cache_dir or Path(config.basic.output_dir) / ".cache").expanduser()
        latent = LatentCache(data.cache_latents, vae_id=vae_identity(model.vae, model.source), folder=folder)
    if data.cache_text_encoder_outputs:
        training = [slot.encoder for slot in model.family.text_encoders if slot.encoder in trainable]
        if training:
            raise ConjureError(
                f"data.cache_text_encoder_outputs: this run trains the text encoder(s) ({', '.join(training)}), "
                "so their outputs change every step; set it to false"
            )
        text = TextCache()
    return latent, text


def _buckets(data: DataConfig, resolution: int, family: Family) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets `data` asks for at `resolution`, or None; bad settings name their field."""
    if not data.aspect_ratio_buckets:
        return None
    if data.bucket_step % family.pixel_multiple:
        raise ConjureError(f"data.bucket_step: {family.title} needs image sides in multiples of "
                           f"{family.pixel_multiple} px, not {data.bucket_step}")
    from conjure.data.buckets import make_buckets

    try:
        return make_buckets(resolution, step=data.bucket_step, min_side=data.bucket_min_side,
                            max_side=data.bucket_max_side, max_area=data.bucket_max_area)
    except ValueError as exc:
        raise ConjureError(f"data.aspect_ratio_buckets at {resolution} px: {exc}") from None
