"""The training loop, shared by every method: setup, steps, checkpoints, validation, resume.

`train(config)` is the one entry point (CLI, demo, tests and benchmarks call it). Methods plug in through
`conjure.methods` and never see the loop's internals; the loop never branches on a method or family.
Exact resume: data order comes from (seed, epoch), augmentation from (seed, epoch, index), noise and
timesteps from one CPU generator, dropout from torch's global CPU/CUDA RNG (seeded from basic.seed); both
RNG states are checkpointed with the optimizer and LR scheduler.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conjure.config import dump_config
from conjure.errors import ConjureError
from conjure.models.loading import Fact
from conjure.runs.checkpoints import (
    STATE_FILE,
    kept_checkpoint,
    load_state,
    prune_checkpoints,
    step_dir_name,
    write_checkpoint,
)
from conjure.runs.events import EventLog
from conjure.train.optimizers import build_optimizer, optimizer_warnings
from conjure.runs.folder import lock_run, resume_changes, with_absolute_paths

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class TrainControl:
    """Commands into a run (stop) and callbacks out of it (after each step). Signals set `stop_reason`."""

    on_step: Callable[[int, float], None] | None = None
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    checkpoints: list[Path] = field(default_factory=list)
    validations: list[Path] = field(default_factory=list)


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def train(config: Any, *, resume: str | None = None, control: TrainControl | None = None) -> RunResult:
    """Train `config` (a validated config model) in a new run folder, or continue one (`resume`)."""
    from conjure.methods import method_spec

    spec = method_spec(config.type)
    examples, skipped, probe = _scan_data(config, spec)  # first: a bad data folder fails before model loading
    model = _load_model(config, spec)
    reading = _text_reading(config, model)
    accelerator, precision = _make_accelerator(config.advanced)
    _place_model(model, accelerator.device, precision.value)
    method = spec.build(config, model)
    chosen = _chosen(model, config.data.resolution, precision)
    resolution = chosen["resolution"].value
    checkpoint, run_dir = _open_run_dir(config, resume or config.basic.resume)
    # The main process holds the run (under DDP every rank resumes the same folder; only the main one writes it).
    with _disk_full_as_one_line(run_dir), lock_run(run_dir) if accelerator.is_main_process else nullcontext():
        # A resume checks everything (settings, training state) before it writes: a refused one leaves the
        # run folder as it was, still resumable with its own config.
        resolved = _resolved_config(config, run_dir, resolution)
        changed = resume_changes(run_dir / "config.yaml", resolved) if checkpoint else {}
        too_long = _count_long_captions(model.text_encoders()[0][0], [method.expand_caption(c) for c in probe],
                                        reading.max_tokens)
        session = _Session(config, spec, model, method, accelerator, precision.value, examples, resolution, run_dir,
                           reading)
        if checkpoint is not None:
            session.restore(checkpoint)
        for warning in ([f"skipping {p}: {why}" for p, why in skipped]
                        + (["resuming with changed settings: "
                            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())] if changed else [])
                        + ([f"{too_long} caption(s) are longer than the text encoder's limit (data.max_token_length: "
                            f"{reading.max_tokens} tokens) and will be cut off"]
                           if too_long else [])):
            _say(f"warning: {warning}")
        _say(_describe(chosen))
        (run_dir / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
        session.start(checkpoint, skipped=[str(p) for p, _ in skipped], changed_settings=list(changed),
                      long_captions=too_long,
                      chosen={name: {"value": fact.value, "from": fact.source} for name, fact in chosen.items()})
        return session.run(control or TrainControl())


@contextmanager
def _disk_full_as_one_line(run_dir: Path) -> Iterator[None]:
    """A full disk anywhere in the run (config, events, logs, validation images) becomes one line naming the
    file and the checkpoint that is left (checkpoint writes say so themselves, conjure.runs.checkpoints)."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ConjureError(f"disk full while writing {exc.filename or run_dir}; {kept_checkpoint(run_dir)}") from exc


# --- setup -------------------------------------------------------------------------------------------


def _scan_data(config: Any, spec: Any) -> tuple[list[Any], list[tuple[Path, str]], list[str]]:
    """Examples, skipped files, and each example's caption as training would first see it."""
    from conjure.data.sources import scan_sources

    scan = scan_sources(config.data.all_sources())
    captions = dataclasses.replace(spec.caption_transform(config), dropout=0.0)  # what a caption is, undropped
    probe = [captions(ex.caption, random.Random(0)) for ex in scan.examples if not ex.is_class]
    trigger = spec.trigger(config)
    if not probe:
        raise ConjureError("every data source is marked class_images: add one with the images to learn from")
    if trigger and not any(trigger in c for c in probe):
        hint = spec.trigger_hint(config) or f"add it to the captions, or set data.caption_prefix: '{trigger}'"
        raise ConjureError(f"no training caption contains {trigger!r}: {hint}")
    return scan.examples, scan.skipped, probe


def _load_model(config: Any, spec: Any) -> Any:
    from conjure.models.loading import load_base_model

    basic = config.basic
    model = load_base_model(
        basic.base_model, family=basic.family, revision=basic.revision, variant=basic.variant,
        base_model_config=basic.base_model_config, allowed_families=spec.families, method=config.type,
        prediction_type=config.advanced.prediction_type, vae=basic.vae,
    )
    return model


def _text_reading(config: Any, model: Any) -> Any:
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


def _chosen(model: Any, resolution: int | None, precision: Fact) -> dict[str, Fact]:
    """What this run trains with and why: the model's facts, the resolution and the precision."""
    facts = dict(model.facts)
    if resolution:
        facts["resolution"] = Fact(resolution, "data.resolution")
    return {**facts, "mixed_precision": precision}


def _describe(chosen: dict[str, Fact]) -> str:
    prediction, zero_snr, resolution = chosen["prediction_type"], chosen["zero_terminal_snr"], chosen["resolution"]
    precision = chosen["mixed_precision"]
    schedule = "zero-terminal-SNR" if zero_snr.value else "standard"
    vae = chosen["vae"]
    return (f"training target: {prediction.value} (from {prediction.source}), {schedule} noise schedule "
            f"(from {zero_snr.source}), {resolution.value} px (from {resolution.source}), "
            f"precision {precision.value} (from {precision.source}), VAE {vae.value} (from {vae.source})")


def _make_accelerator(adv: Any) -> tuple[Any, Fact]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = resolve_precision(adv.mixed_precision, cpu=adv.cpu)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # precision; train() is called repeatedly in one process (tests, benchmarks), so start each run afresh.
    # (The distributed PartialState is kept.)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=precision.value, gradient_accumulation_steps=adv.gradient_accumulation_steps, cpu=adv.cpu
    )
    if precision.value == "fp16" and accelerator.device.type == "cpu":
        # accelerate gives fp16 autocast and its gradient scaler to GPUs only; on the CPU the fp16 weights
        # would meet fp32 activations at the first layer ("mat1 and mat2 must have the same dtype").
        raise ConjureError("advanced.mixed_precision: fp16 needs a GPU, and this run is on the CPU; use bf16 or no")
    return accelerator, precision


def _place_model(model: Any, device: torch.device, precision: str) -> None:
    """Freeze every part and cast it to the training precision (methods then add trainable fp32 parts)."""
    for name, part in model.components.items():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
            # fp16 VAEs overflow on some models (SDXL's is the known case); fp32 costs little here.
            keep_fp32 = name == "vae" and precision == "fp16"
            part.to(device, torch.float32 if keep_fp32 else WEIGHT_DTYPES[precision])


def _open_run_dir(config: Any, resume: str | None) -> tuple[Path | None, Path]:
    from conjure.runs.folder import create_run_dir, default_run_name, find_resume_checkpoint

    basic = config.basic
    if resume:
        checkpoint = find_resume_checkpoint(
            resume, output_dir=basic.output_dir, run_name=basic.run_name, config_type=config.type
        )
        return checkpoint, checkpoint.parent.parent
    return None, create_run_dir(basic.output_dir, basic.run_name or default_run_name(config.type))


def _resolved_config(config: Any, run_dir: Path, resolution: int) -> Any:
    """What runs, as the run's `config.yaml` records it: its own folder and name, the resolution, and
    absolute paths (so `--resume RUN` works from any folder)."""
    resolved = with_absolute_paths(config)
    resolved.basic.run_name, resolved.basic.resume, resolved.data.resolution = run_dir.name, None, resolution
    resolved.basic.output_dir = str(run_dir.parent.absolute())
    return resolved


def _caches(config: Any, model: Any, trainable: dict[str, Any]) -> tuple[Any, Any]:
    """The latent and text-encoder caches the data section asks for (None where it does not)."""
    from conjure.train.caches import LatentCache, TextCache, vae_identity

    data, latent, text = config.data, None, None
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


def _buckets(data: Any, resolution: int) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets `data` asks for at `resolution`, or None; bad settings name their field."""
    if not data.aspect_ratio_buckets:
        return None
    from conjure.data.buckets import make_buckets

    try:
        return make_buckets(resolution, step=data.bucket_step, min_side=data.bucket_min_side,
                            max_side=data.bucket_max_side, max_area=data.bucket_max_area)
    except ValueError as exc:
        raise ConjureError(f"data.aspect_ratio_buckets at {resolution} px: {exc}") from None


def _count_long_captions(tokenizer: Any, captions: list[str], max_tokens: int) -> int:
    """Captions with more than `max_tokens` tokens besides the start and end tokens."""
    return sum(len(ids) > max_tokens + 2 for ids in tokenizer(captions).input_ids) if captions else 0


class _MicroBatches:
    """Batch sampler over (epoch, index) keys for micro-batches [start, end); this process's share.
    `sizes`: each example's training size; a batch never mixes sizes (`conjure.data.dataset.epoch_batches`)."""

    def __init__(self, sizes: list[tuple[int, int]], batch: int, seed: int, start: int, end: int, rank: int,
                 world: int):
        from conjure.data.dataset import batches_per_epoch

        self.sizes, self.batch, self.seed, self.start, self.end = sizes, batch, seed, start, end
        self.rank, self.world = rank, world
        self.per_epoch = batches_per_epoch(sizes, batch * world)

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        from conjure.data.dataset import epoch_batches

        chunks, current = [], -1
        for m in range(self.start, self.end):
            epoch, b = divmod(m, self.per_epoch)
            if epoch != current:
                chunks, current = epoch_batches(self.sizes, self.batch * self.world, self.seed, epoch), epoch
            chunk = chunks[b]
            yield [(epoch, i) for i in chunk[self.rank :: self.world]] or [(epoch, chunk[0])]


# --- the run -----------------------------------------------------------------------------------------


class _Session:
    """One run's moving parts: data loader, optimizer, schedule, noise generator, events."""

    def __init__(self, config, spec, model, method, accelerator, precision, examples, resolution, run_dir, reading):
        from diffusers.optimization import get_scheduler

        from conjure.data.captions import CaptionTransform
        from conjure.data.dataset import TrainDataset, batches_per_epoch

        self.config, self.model, self.method, self.accelerator = config, model, method, accelerator
        self.precision, self.resolution, self.run_dir, self.reading = precision, resolution, run_dir, reading
        basic, data, adv, opt = config.basic, config.data, config.advanced, config.optimizer
        if adv.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            for name, module in method.trainable_modules().items():
                if name != "unet":
                    module.gradient_checkpointing_enable()
        self.dataset = TrainDataset(
            examples, resolution=resolution, center_crop=data.center_crop, random_flip=data.random_flip,
            keep_in_memory=data.keep_in_memory, caption_transform=spec.caption_transform(config), seed=basic.seed,
            class_caption_transform=CaptionTransform(dropout=data.caption_dropout), buckets=_buckets(data, resolution),
        )
        small = self.dataset.upscaled()
        if small:
            _say(f"warning: {len(small)} image(s) are smaller than their training size ({resolution} px) and will be "
                 f"scaled up, which blurs them (first: {small[0]}); `conjure dataset check` lists them")
        self.accum = adv.gradient_accumulation_steps
        per_epoch = batches_per_epoch(self.dataset.sizes, data.batch_size * accelerator.num_processes)
        self.max_steps = basic.max_train_steps or math.ceil(basic.max_train_epochs * per_epoch / self.accum)
        groups = method.parameter_groups(opt.learning_rate)
        self.params = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(groups, opt, device=accelerator.device)
        for warning in optimizer_warnings(opt, groups):
            _say(f"warning: {warning}")
        self.lr_scheduler = get_scheduler(
            SCHEDULES[opt.scheduler], optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=self.max_steps
        )
        self.base_lrs = list(self.lr_scheduler.base_lrs)  # this config's rates: a resume keeps them
        trainable = method.trainable_modules()
        prepared = accelerator.prepare(*trainable.values())
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        self.trainable = prepared
        self.optimizer = accelerator.prepare(optimizer)
        for module in self.trainable:
            module.train()  # CLIP has no dropout; train mode turns gradient checkpointing on in transformers
        # What the step calls: the prepared (possibly DDP-wrapped) module where it trains, else the frozen one.
        forward = dict(zip(trainable, prepared))
        self.unet = forward.get("unet", model.unet)
        self.text_encoders = [
            (model.components[slot.tokenizer], forward.get(slot.encoder, model.components[slot.encoder]))
            for slot in model.family.text_encoders
        ]
        self.generator = torch.Generator("cpu").manual_seed(basic.seed * 7919 + accelerator.process_index)
        # Dropout (PEFT's lora_dropout, InputColumnDora's) draws from the global CPU/CUDA RNG; seeding and
        # checkpointing it is what makes such runs repeat and resume exactly (accelerate's save_state does the same).
        torch.manual_seed(basic.seed + accelerator.process_index)
        self.latent_cache, self.text_cache = _caches(config, model, trainable)
        self.result = RunResult(run_dir=run_dir, status="completed", step=0)
        self.step = self.last_saved = 0
        self.rescue = True  # whether a failing run may save its unsaved steps
        self._pipe = None

    def start(self, checkpoint: Path | None, **facts: Any) -> None:
        main = self.accelerator.is_main_process
        self.events = EventLog(self.run_dir / "events.jsonl", self.run_dir / "logs" if main else None)
        self.events.emit(
            "start", run_dir=str(self.run_dir), type=self.config.type, family=self.model.family.name,
            device=str(self.accelerator.device), mixed_precision=self.precision, images=len(self.dataset),
            max_train_steps=self.max_steps, start_step=self.step,
            resumed_from=str(checkpoint) if checkpoint else None, **facts,
        )

    def restore(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`; refuses (ConjureError) a state that does not fit or a finished run."""
        state = load_state(checkpoint)
        try:
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.generator.set_state(state["generator"])
            _set_global_rng(state.get("rng"), self.accelerator.device)
            if self.accelerator.scaler is not None and state.get("scaler"):
                self.accelerator.scaler.load_state_dict(state["scaler"])
            self.step = self.last_saved = self.result.step = int(state["step"])
        except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConjureError(f"training state {checkpoint / STATE_FILE} does not fit this run: {why}") from None
        self._set_learning_rates()
        if self.step > self.max_steps or (self.step == self.max_steps and _completed(self.run_dir, self.step)):
            raise ConjureError(
                f"{self.run_dir} already reached step {self.step} of {self.max_steps}; raise basic.max_train_steps"
            )
        if self.step == self.max_steps:
            _say(f"finishing {self.run_dir}: step {self.step} was saved, its final validation and end were not")
        else:
            _say(f"resuming {self.run_dir} from step {self.step}")

    def _set_learning_rates(self) -> None:
        """This config's learning rates take effect on resume (the checkpoint holds the rates it ran with):
        each group's and the schedule's base rate; the schedule keeps its position (diffusers' schedules are
        LambdaLR: lr = base * lambda(step))."""
        schedule = self.lr_scheduler
        schedule.base_lrs = list(self.base_lrs)
        schedule._last_lr = [base * f(schedule.last_epoch) for base, f in zip(self.base_lrs, schedule.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, schedule._last_lr):
            group["initial_lr"], group["lr"] = base, lr

    def _loader(self) -> Any:
        from conjure.data.dataset import collate

        data, acc = self.config.data, self.accelerator
        sampler = _MicroBatches(
            self.dataset.sizes, data.batch_size, self.config.basic.seed, self.step * self.accum,
            self.max_steps * self.accum, acc.process_index, acc.num_processes,
        )
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data.dataloader_num_workers,
            generator=torch.Generator().manual_seed(self.config.basic.seed),  # its worker seed, not a global draw
        )

    def run(self, control: TrainControl) -> RunResult:
        from tqdm import tqdm

        main = self.accelerator.is_main_process
        previous_handlers = _install_signal_handlers(control)
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", disable=not main, dynamic_ncols=True)
        try:
            if self.step == 0 and self.config.validation.at_start and main:
                self.validate(0)
            if self.step == self.max_steps and main:  # a run killed after its last checkpoint: finish it
                self.validate(self.step)
            losses: list[float] = []
            for batch in self._loader():
                losses.append(self._micro_step(batch))
                if not self.accelerator.sync_gradients:
                    continue
                loss, losses = sum(losses) / len(losses), []
                self._after_step(loss, bar, control)
                if control.stop_reason and self.step < self.max_steps:
                    self.result.status = "interrupted"
                    self.events.emit("stopped", step=self.step, reason=control.stop_reason)
                    break
            self.events.emit("end", status=self.result.status, step=self.step)
        except BaseException as exc:
            # Keep the work: a step that completed after the last checkpoint is saved before the error surfaces.
            if self.rescue and self.step > self.last_saved and main:
                try:
                    self.save()
                except Exception:  # noqa: BLE001 - the original error matters more than a failed rescue
                    pass
            try:
                self.events.emit("end", status="failed", step=self.step, error=str(exc) or type(exc).__name__)
            except OSError:  # the disk that failed the run may not take this line either
                pass
            raise
        finally:
            bar.close()
            _restore_signal_handlers(previous_handlers)
            self.events.close()
        return self.result

    def _micro_step(self, batch: dict[str, Any]) -> float:
        from conjure.train.conditioning import encode_captions, encode_text
        from conjure.train.loss import denoising_loss

        acc, model = self.accelerator, self.model
        with acc.accumulate(*self.trainable):
            with torch.no_grad():
                latents = self._latents(batch).to(WEIGHT_DTYPES[self.precision])
            texts = [self.method.expand_caption(c) for c in batch["caption"]]
            adv = self.config.advanced
            with acc.autocast():
                text = None
                if self.text_cache is not None:
                    with torch.no_grad():
                        text = self.text_cache.get(
                            texts, lambda new: encode_text(self.text_encoders, new, acc.device, zero_empty=True,
                                                           reading=self.reading)
                        )
                cond = encode_captions(
                    self.text_encoders, texts, acc.device, resolution=self.resolution, zero_empty=True,
                    original_sizes=batch.get("original_size"), crops_top_left=batch.get("crop_top_left"),
                    target_sizes=batch.get("target_size"), text=text, reading=self.reading,
                )
                loss = denoising_loss(
                    self.unet, model.noise_scheduler, latents, cond, self.generator,
                    prediction_type=adv.prediction_type, min_snr_gamma=adv.min_snr_gamma, noise_offset=adv.noise_offset,
                    weights=batch.get("loss_weight"), mask=batch.get("mask"),
                )
            acc.backward(loss)
            for param in self.method.frozen_parameters(self.step, self.max_steps):
                param.grad = None  # the optimizers skip a parameter without a gradient: no update, no decay
            if acc.sync_gradients and self.config.advanced.max_grad_norm:
                acc.clip_grad_norm_(self.params, self.config.advanced.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(loss.detach(), "mean").item()

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        from conjure.train.loss import encode_latents, sample_latents, vae_posterior

        vae = self.model.vae
        if self.latent_cache is None:
            return encode_latents(vae, batch["pixel_values"], self.generator)
        keys = [
            self.latent_cache.key(self.dataset.examples[i].image, size, crop, flipped)
            for i, size, crop, flipped in zip(batch["index"], batch["target_size"], batch["crop_top_left"],
                                              batch["flipped"])
        ]
        mean, std = self.latent_cache.posteriors(keys, batch["pixel_values"], lambda px: vae_posterior(vae, px))
        return sample_latents(vae, mean.to(vae.device), std.to(vae.device), self.generator)

    def _after_step(self, loss: float, bar: Any, control: TrainControl) -> None:
        # A step the fp16 GradScaler skipped (inf/nan gradients) moved nothing; the schedule waits for it, as
        # accelerate's AcceleratedScheduler does (accelerate/scheduler.py), so warmup is not cut short.
        if not self.optimizer.step_was_skipped:
            self.lr_scheduler.step()
        self.step += 1
        self.result.step = self.step
        lr = self.lr_scheduler.get_last_lr()[0]
        if not math.isfinite(loss):
            self.rescue = False  # the step's update is not finite either: nothing worth saving
            raise ConjureError(
                f"loss became {loss} at step {self.step}; lower optimizer.learning_rate or use "
                f"advanced.mixed_precision: bf16/no ({kept_checkpoint(self.run_dir)})"
            )
        self.events.emit("step", step=self.step, loss=loss, lr=lr)
        self.events.scalars(self.step, **{"train/loss": loss, "train/lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if control.on_step:
            control.on_step(self.step, loss)
        if not self.accelerator.is_main_process:
            return
        basic, final = self.config.basic, self.step == self.max_steps
        if self.step % basic.save_every_n_steps == 0 or final or control.stop_reason:
            self.save()
        every = basic.validate_every_n_steps
        if (every and self.step % every == 0) or final:
            self.validate(self.step)

    def save(self) -> None:
        from conjure.train.loss import resolve_prediction_type

        at, basic = self.step, self.config.basic
        target = resolve_prediction_type(self.model.noise_scheduler, self.config.advanced.prediction_type)
        state = {
            "step": at,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": {"cpu": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state_all()} if self.accelerator.device.type == "cuda" else {})},
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
        }
        folder = write_checkpoint(
            self.run_dir, at, state,
            lambda tmp: self.method.save(
                tmp, step=at, resolution=self.resolution, base_model=basic.base_model, run_name=self.run_dir.name,
                prediction_type=target,
            ),
        )
        self.last_saved = at
        files = sorted(p.name for p in folder.iterdir() if p.name != "training_state.pt")
        self.events.emit("checkpoint", step=at, path=str(folder), files=files)
        self.result.checkpoints.append(folder)
        for old in prune_checkpoints(self.run_dir, basic.keep_last_n_checkpoints):
            self.events.emit("checkpoint_removed", path=str(old))

    def validate(self, at: int) -> None:
        from conjure.train.conditioning import prompt_embeds
        from conjure.train.validation import as_array, build_pipeline, render

        val = self.config.validation
        self._pipe = self._pipe or build_pipeline(self.model.family.pipeline_class, dict(self.model.components))
        started = time.perf_counter()
        device = self.accelerator.device
        # Eval mode: the images show what the saved files do, without dropout. A forked RNG: whether and how
        # often a run validates never changes the dropout masks of its training steps.
        for module in self.trainable:
            module.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.accelerator.autocast():
                images, grid_path = render(
                    self._pipe, self.run_dir / "validation" / step_dir_name(at), prompts=val.prompts,
                    seeds=val.seeds, negative_prompt=val.negative_prompt,
                    num_inference_steps=val.num_inference_steps, guidance_scale=val.guidance_scale,
                    resolution=self.resolution,
                    embed=lambda prompt, negative: prompt_embeds(  # as training encodes (clip skip, long captions)
                        self.model.text_encoders(), self.method.expand_caption(prompt),
                        self.method.expand_caption(negative), device, reading=self.reading),
                )
        finally:
            for module in self.trainable:
                module.train()
        self.events.emit(
            "validation", step=at, grid=str(grid_path), images=[str(p) for p in images], prompts=val.prompts,
            seeds=val.seeds, seconds=round(time.perf_counter() - started, 3),
        )
        self.events.image("validation/grid", at, as_array(grid_path))
        self.result.validations.append(grid_path)


def _completed(run_dir: Path, step: int) -> bool:
    """Whether the run's events say it ended, completed, at `step` (a kill during the final validation leaves
    the last checkpoint without that end)."""
    from conjure.runs.events import read_events

    try:
        events = read_events(run_dir / "events.jsonl")
    except (OSError, UnicodeDecodeError):
        return False
    return any(e.get("event") == "end" and e.get("status") == "completed" and e.get("step") == step for e in events)


def _set_global_rng(states: dict[str, Any] | None, device: torch.device) -> None:
    """Restore the global RNG a checkpoint saved (checkpoints written before it was saved have none)."""
    if not states:
        return
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def _install_signal_handlers(control: TrainControl) -> dict[int, Any]:
    """First Ctrl-C / SIGTERM / SIGHUP (the terminal closed): finish the step, save, stop. A second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]

    def handler(signum: int, frame: Any) -> None:
        if control.stop_reason:
            raise KeyboardInterrupt
        if signum == getattr(signal, "SIGHUP", None):
            # The terminal closed: writes to it fail (EIO) from now on, and the progress bar's next one would
            # end the run as failed. What went there goes nowhere instead, as under nohup.
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in terminals:
                os.dup2(null, fd)
            os.close(null)
        control.request_stop(signal.Signals(signum).name)
        _say("stopping after this step (saving a checkpoint); press Ctrl-C again to abort at once")

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # Windows has no SIGHUP
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
