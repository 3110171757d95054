"""The training loop, shared by every method: `train(config)` and the `TrainingSession` it runs.

`train(config)` is the one entry point (CLI, demo, tests and benchmarks call it): `conjure.train.setup` builds
what the run needs from the config, and a `TrainingSession` runs the steps, checkpoints and validations.
Methods plug in through the `conjure.methods.Recipe` interface; the loop never branches on a method or family.
Exact resume: data order comes from (seed, epoch), augmentation from (seed, epoch, index), noise and
timesteps from one CPU generator, dropout from torch's global CPU/CUDA RNG (seeded from basic.seed); both
RNG states are checkpointed with the optimizer and LR scheduler (the global one of every process: train/launch.py).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conjure.config import dump_config
from conjure.errors import ConjureError
from conjure.files import atomic_write_text
from conjure.runs.checkpoints import STATE_FILE, load_state, prune_checkpoints, step_dir_name, write_checkpoint
from conjure.runs.events import EVENTS_FILE, Event, EventLog, memory_peaks
from conjure.runs.folder import VALIDATION_DIR, lock_run, resume_changes
from conjure.scoring.hook import image_scoring
from conjure.train.control import RunResult, TrainControl, say, stop_on_signals
from conjure.train.heldout import HeldOutLoss
from conjure.train.objectives import build_conditioning, build_objective
from conjure.train.setup import (
    WEIGHT_DTYPES, SessionParts, assemble, chosen_facts, completed_at, data_loader, describe, disk_full_as_one_line,
    global_rng_state, load_model, machine_preset, make_accelerator, open_run_dir, place_model, resolved_config,
    scan_data, set_global_rng, start_warnings, text_reading,
)
from conjure.train.launch import agree_stop, batch_line, every_rank, global_batch, own_rng
from conjure.train.loss import BatchGenerator
from conjure.train.sharding import (
    full_optimizer_state, gathered, shard, shard_optimizer_state, sharded, sync_gradients, whole_weights,
)
from conjure.train.skips import SkippedSteps, TooManySkipped, read_step
from conjure.train.text_ahead import (
    EncodedAhead, captions_ahead, encode_ahead, free_encoders, frees_for_a_quantised_read, offloads, prompt_inputs,
    still_needed,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline
    from tqdm import tqdm

    from conjure.config import RunConfig
    from conjure.methods import Recipe
    from conjure.models.loading import LoadedModel
    from conjure.train.objectives import Conditioning, Predict


def train(config: RunConfig, *, resume: str | None = None, control: TrainControl | None = None) -> RunResult:
    """Train `config` (a validated config model) in a new run folder, or continue one (`resume`)."""
    from conjure.methods import method_spec

    spec = method_spec(config.type)
    examples, skipped, probe, held = scan_data(config, spec)  # first: a bad data folder fails before model loading
    model = load_model(config, spec)
    reading = text_reading(config, model)
    accelerator, precision = make_accelerator(config.advanced)
    config = machine_preset(config, model, accelerator.device)  # basic.memory_preset's machine-dependent options
    chosen = chosen_facts(model, config.data.resolution, precision, config.preset_choices)
    resolution = chosen["resolution"].value
    conditioning = build_conditioning(model, reading, resolution=resolution, guidance=config.advanced.guidance)
    ahead = None
    if config.data.cache_text_encoder_outputs and (offloads(accelerator.device) or frees_for_a_quantised_read(
            model, config.advanced.base_weights_dtype)):
        prompts = [(p, config.validation.negative_prompt) for p in config.validation.prompts]
        ahead = encode_ahead(model, conditioning, captions_ahead(config, spec, examples), prompts, accelerator,
                             WEIGHT_DTYPES[precision.value])
        if still_needed(spec, bool(held)) is None:
            free_encoders(model, ahead)
    model.load_pending()  # a transformer family's weights, once the text encoders they would have met are gone
    place_model(model, accelerator.device, precision.value, config.advanced.base_weights_dtype,
                on_cpu=ahead.on_cpu if ahead else ())
    recipe = spec.build(config, model)
    if config.advanced.distributed == "fsdp" and accelerator.num_processes > 1:
        shard(recipe.trainable_modules().values(), accelerator.device)  # before the optimizer is built on them
    checkpoint, run_dir = open_run_dir(config, resume or config.basic.resume, accelerator)
    # The main process holds the run (under DDP every rank resumes the same folder; only the main one writes it).
    with disk_full_as_one_line(run_dir), lock_run(run_dir) if accelerator.is_main_process else nullcontext():
        # A resume checks everything (settings, training state) before it writes: a refused one leaves the
        # run folder as it was, still resumable with its own config.
        resolved = resolved_config(config, run_dir, resolution)
        changed = resume_changes(run_dir / "config.yaml", resolved) if checkpoint else {}
        parts = assemble(config, spec, model, recipe, accelerator, examples, resolution=resolution,
                         mixed_precision=precision.value, text_cache=ahead.cache if ahead else None, held=held)
        session = TrainingSession(parts, model, recipe, accelerator, run_dir, conditioning, ahead)
        too_long, limit = session.conditioning.long_captions(model.text_encoders(),
                                                             [recipe.expand_caption(c) for c in probe])
        if checkpoint is not None:
            session.restore(checkpoint)
        for warning in start_warnings(config, skipped, changed, too_long, limit):
            say(f"warning: {warning}")
        say(describe(chosen))
        batch = global_batch(config.data.batch_size, accelerator.num_processes, config.advanced.gradient_accumulation_steps)
        say(batch_line(batch))
        if accelerator.is_main_process:
            atomic_write_text(run_dir / "config.yaml", dump_config(resolved))  # a resume rewrites the one it reads
        session.start(checkpoint, **batch, skipped=[str(p) for p, _ in skipped], changed_settings=list(changed),
                      long_captions=too_long, migrated=config.migration_notes,
                      chosen={name: {"value": fact.value, "from": fact.source} for name, fact in chosen.items()})
        return session.run(control or TrainControl())


class TrainingSession:
    """One run's moving parts (data loader, optimizer, schedule, noise generator, events) and its phases:

    - `restore(checkpoint)`, on a resume only: the recipe's tensors, the optimizer, the schedule, the noise
      generator and the global RNG as the checkpoint saved them, with this config's learning rates;
    - `start(checkpoint, **facts)`: the events log and its "start" line (what was chosen, skipped, changed);
    - `run(control)`: the baseline validation, then steps until `max_steps` or a stop, and the "end" line;
      a run that fails saves its unsaved steps first;
    - `step(batch)`: one micro-batch forward and backward, an optimizer step when accumulation completes;
    - `save()`: a checkpoint folder (training state and the recipe's files), older ones pruned;
    - `validate(at)`: images at fixed prompts and seeds, in eval mode, on a forked RNG.

    It reads no config: `conjure.train.setup.assemble` unpacked the settings and built the parts."""

    def __init__(self, parts: SessionParts, model: LoadedModel, recipe: Recipe, accelerator: Accelerator,
                 run_dir: Path, conditioning: Conditioning, ahead: EncodedAhead | None = None):
        self.settings, self.dataset, self.params = parts.settings, parts.dataset, parts.params
        self.latent_cache, self.text_cache = parts.latent_cache, parts.text_cache
        self.held_out = HeldOutLoss(parts.held_out) if parts.held_out is not None else None
        self.record = parts.record
        self.model, self.recipe, self.accelerator = model, recipe, accelerator
        self.run_dir = run_dir
        self.max_steps = self.settings.max_steps
        self.accum = self.settings.gradient_accumulation_steps
        self.lr_scheduler = parts.lr_scheduler
        self.base_lrs = list(self.lr_scheduler.base_lrs)  # this config's rates: a resume keeps them
        trainable = recipe.trainable_modules()
        # (a sharded module is not wrapped in DDP: FSDP already reduces its gradients)
        prepared = [module if sharded([module]) else accelerator.prepare(module) for module in trainable.values()]
        self.trainable: list[torch.nn.Module] = prepared
        self.optimizer = accelerator.prepare(parts.optimizer)
        for module in self.trainable:
            module.train()  # CLIP has no dropout; train mode turns gradient checkpointing on in transformers
        # What the step calls: the prepared (possibly DDP-wrapped) module where it trains, else the frozen one.
        forward = dict(zip(trainable, prepared))
        self.denoiser = forward.get(model.family.denoiser, model.denoiser)
        self.text_encoders = [
            (model.components[slot.tokenizer], forward.get(slot.encoder, model.components[slot.encoder]))
            for slot in model.family.text_encoders
        ]
        # What the family's denoiser reads and how it trains (conjure.train.objectives); text encoded ahead, and
        # where the text encoders are (the CPU once they were moved off the GPU: train/text_ahead.py)
        self.conditioning, self.ahead = conditioning, ahead
        self.objective = build_objective(model, self.settings)
        self.text_device = torch.device("cpu") if ahead and ahead.on_cpu else accelerator.device
        seed = self.settings.seed
        # One noise stream for the whole run, each process keeping its rows (conjure.train.loss.BatchGenerator)
        self.generator = BatchGenerator("cpu").manual_seed(seed * 7919)
        self.generator.rank, self.generator.world = accelerator.process_index, accelerator.num_processes
        # Dropout (PEFT's lora_dropout, InputColumnDora's) draws from the global CPU/CUDA RNG; seeding and
        # checkpointing it is what makes such runs repeat and resume exactly (accelerate's save_state does the same).
        torch.manual_seed(seed + accelerator.process_index)
        self.result = RunResult(run_dir=run_dir, status="completed", step=0)
        self.global_step = self.last_saved = 0  # optimizer steps taken, skipped ones included (a skip uses its batch)
        self.finite = True  # whether the current step's loss and gradients are finite
        self.skips = SkippedSteps(self.settings.max_consecutive_skipped_steps)
        self._pipe: DiffusionPipeline | None = None  # built at the first validation

    def start(self, checkpoint: Path | None, **facts: Any) -> None:
        """Open the events log (TensorBoard on the main process only) with the run's "start" line."""
        main = self.accelerator.is_main_process
        # The other processes' events are the main one's (the same steps, losses averaged across processes)
        self.events = EventLog(self.run_dir / EVENTS_FILE if main else Path(os.devnull),
                               self.run_dir / "logs" if main else None)
        self.events.emit(
            Event.START, run_dir=str(self.run_dir), type=self.settings.config_type, family=self.model.family.name,
            device=str(self.accelerator.device), mixed_precision=self.settings.mixed_precision,
            images=len(self.dataset), max_train_steps=self.max_steps, start_step=self.global_step,
            resumed_from=str(checkpoint) if checkpoint else None, **memory_peaks(self.accelerator.device), **facts,
        )
        # Loaded before the first step, so validation.image_scores: on fails before any training
        self.image_scoring = image_scoring(self.settings.validation, self.dataset.examples, say) if main else None

    def restore(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`; refuses (ConjureError) a state that does not fit or a finished run."""
        state = load_state(checkpoint)
        try:
            self.recipe.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            shard_optimizer_state(self.optimizer)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.generator.set_state(state["generator"])
            set_global_rng(own_rng(state, self.accelerator), self.accelerator.device)
            if self.accelerator.scaler is not None and state.get("scaler"):
                self.accelerator.scaler.load_state_dict(state["scaler"])
            self.global_step = self.last_saved = self.result.step = int(state["step"])
            self.skips.load(state.get("skipped"))
        except (AttributeError, KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConjureError(f"training state {checkpoint / STATE_FILE} does not fit this run: {why}") from None
        self._set_learning_rates()
        at, last = self.global_step, self.max_steps
        if at > last or (at == last and completed_at(self.run_dir, at)):
            raise ConjureError(f"{self.run_dir} already reached step {at} of {last}; raise basic.max_train_steps")
        if at == last:
            say(f"finishing {self.run_dir}: step {at} was saved, its final validation and end were not")
        else:
            say(f"resuming {self.run_dir} from step {at}")

    def _set_learning_rates(self) -> None:
        """This config's learning rates take effect on resume (the checkpoint holds the rates it ran with):
        each group's and the schedule's base rate; the schedule keeps its position (diffusers' schedules are
        LambdaLR: lr = base * lambda(step))."""
        schedule = self.lr_scheduler
        schedule.base_lrs = list(self.base_lrs)
        schedule._last_lr = [base * f(schedule.last_epoch) for base, f in zip(self.base_lrs, schedule.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, schedule._last_lr):
            group["initial_lr"], group["lr"] = base, lr

    def run(self, control: TrainControl) -> RunResult:
        from tqdm import tqdm

        main = self.accelerator.is_main_process
        with stop_on_signals(control):
            bar = tqdm(total=self.max_steps, initial=self.global_step, unit="step", disable=not main,
                       dynamic_ncols=True)
            try:
                # at the start, or a run killed after its last checkpoint: finish it
                if (self.global_step == 0 and self.settings.validation.at_start) or self.global_step == self.max_steps:
                    with gathered(self.trainable):
                        if main:
                            self.validate(self.global_step)
                self._steps(bar, control)
                self.events.emit(Event.END, status=self.result.status, step=self.global_step,
                                 skipped_steps=self.skips.total, **memory_peaks(self.accelerator.device))
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                bar.close()
                self.events.close()
        return self.result

    def _steps(self, bar: tqdm, control: TrainControl) -> None:
        """Micro-batches until the last step or a requested stop; the loss of a step is its micro-batches' mean."""
        losses: list[float] = []
        acc, first = self.accelerator, self.global_step * self.accum
        loader, sampler = data_loader(self.dataset, self.settings, first=first, end=self.max_steps * self.accum,
                                      rank=acc.process_index, world=acc.num_processes)
        for m, batch in enumerate(loader, start=first):
            self.generator.rows = sampler.rows(m)
            losses.append(self.step(batch))
            if not self.accelerator.sync_gradients:
                continue
            loss, losses = sum(losses) / len(losses), []
            if self._after_step(loss, bar, control) and self.global_step < self.max_steps:
                self.result.status = "interrupted"
                self.events.emit(Event.STOPPED, step=self.global_step, reason=control.stop_reason)
                break

    def _fail(self, exc: BaseException) -> None:
        # Keep the work: a step that completed after the last checkpoint is saved before the error surfaces
        # (skips in a row moved nothing since the last good step: the kept checkpoint is already that state).
        # A sharded model can be gathered only by every process together: its last checkpoint is what is kept.
        rescue = not isinstance(exc, TooManySkipped) and not sharded(self.trainable)
        if rescue and self.global_step > self.last_saved and self.accelerator.is_main_process:
            try:
                self.save()
            except Exception:  # noqa: BLE001 - the original error matters more than a failed rescue
                pass
        try:
            self.events.emit(Event.END, status="failed", step=self.global_step, skipped_steps=self.skips.total,
                             error=str(exc) or type(exc).__name__, **memory_peaks(self.accelerator.device))
        except OSError:  # the disk that failed the run may not take this line either
            pass

    def step(self, batch: dict[str, Any]) -> float:
        """One micro-batch: its loss (averaged over processes), with an optimizer step where accumulation
        completes (accelerate's `sync_gradients`)."""
        acc, settings = self.accelerator, self.settings
        with acc.accumulate(*self.trainable):
            sync_gradients(self.trainable, acc.sync_gradients)  # accelerate's no_sync is DDP's only
            with torch.no_grad():
                latents = self._latents(batch).to(WEIGHT_DTYPES[settings.mixed_precision])
            with acc.autocast():
                predict = self._predictor(batch, self.denoiser, self.text_encoders)
                loss = self.objective.loss(
                    predict, latents, self.generator, weights=batch.get("loss_weight"), mask=batch.get("mask")
                ) * self.generator.share()
            acc.backward(loss)
            for param in self.recipe.frozen_parameters(self.global_step, self.max_steps):
                param.grad = None  # the optimizers skip a parameter without a gradient: no update, no decay
            loss_value, finite = read_step(acc, loss, self.params, settings.max_grad_norm)
            if acc.sync_gradients:
                self.finite = finite
            if self.finite or acc.scaler is not None:  # the GradScaler skips a non-finite step itself (and backs off)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def _predictor(self, batch: dict[str, Any], denoiser: Any, text_encoders: list[tuple[Any, Any]]) -> Predict:
        """The denoiser's call for `batch`, its captions encoded now or taken from the text cache."""
        texts, device = [self.recipe.expand_caption(c) for c in batch["caption"]], self.accelerator.device
        text = None
        if self.text_cache is not None:
            with torch.no_grad():
                text = self.text_cache.get(
                    texts, lambda new: self.conditioning.encode(self.text_encoders, new, self.text_device), device)
        return self.conditioning.predictor(denoiser, text_encoders, texts, device, batch, text)

    def _held_out_loss(self, at: int) -> None:
        """The held-out loss of step `at` (conjure.train.heldout), with the frozen modules rather than the
        prepared ones: only the main process validates, and a DDP module's forward would wait for the others."""
        if self.held_out is None:
            return
        loss, bands = self.held_out.measure(
            self.objective, self.model.vae, WEIGHT_DTYPES[self.settings.mixed_precision],
            lambda batch: self._predictor(batch, self.model.denoiser, self.model.text_encoders()))
        self.events.emit(Event.VALIDATION_LOSS, step=at, loss=loss, bands=bands, images=len(self.held_out.dataset))
        self.events.scalars(at, **{"validation/loss": loss}, **{f"validation/loss_{k}": v for k, v in bands.items()})

    def _prompt_inputs(self, prompt: str, negative: str) -> dict[str, Any]:
        """A validation prompt's pipeline inputs, encoded as training encodes captions (clip skip, long captions,
        the T5 length): encoded ahead, or now where the text encoders are."""
        device = self.accelerator.device
        kept = prompt_inputs(self.ahead, prompt, negative, device)
        if kept is not None:
            return kept
        embeds = self.conditioning.prompt_embeds(self.model.text_encoders(), prompt, negative, self.text_device)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in embeds.items()}

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        from conjure.train.loss import encode_latents, placed, sample_latents, vae_posterior

        vae = self.model.vae
        if self.latent_cache is None:
            return encode_latents(vae, batch["pixel_values"], self.generator)
        keys = [
            self.latent_cache.key(self.dataset.examples[i].image, size, crop, flipped)
            for i, size, crop, flipped in zip(batch["index"], batch["target_size"], batch["crop_top_left"],
                                              batch["flipped"])
        ]
        mean, std = self.latent_cache.posteriors(keys, batch["pixel_values"], lambda px: vae_posterior(vae, px))
        device = placed(vae).device
        return sample_latents(vae, mean.to(device), std.to(device), self.generator)

    def _after_step(self, loss: float, bar: tqdm, control: TrainControl) -> bool:
        """The step's bookkeeping, checkpoint and validation; whether the processes agreed to stop after it."""
        # A skipped step (non-finite loss or gradients; under fp16 the GradScaler's own skips) moved nothing; the
        # schedule waits for it, as accelerate's AcceleratedScheduler does (accelerate/scheduler.py), so warmup is
        # not cut short. It still counts as a step: its batch and noise were drawn, so the data order and a resume
        # stay those of a run without the skip.
        skipped = not self.finite or self.optimizer.step_was_skipped
        if not skipped:
            self.lr_scheduler.step()
        self.global_step += 1
        if not skipped:
            self.recipe.after_step(self.global_step)
        self.result.step = self.global_step
        lr = float(self.lr_scheduler.get_last_lr()[0])
        self.skips.count(skipped, loss, self.global_step, self.run_dir)
        self.events.emit(Event.STEP, step=self.global_step, loss=loss if math.isfinite(loss) else None, lr=lr,
                         skipped_steps=self.skips.total, **({"skipped": True} if skipped else {}))
        self.events.scalars(self.global_step, **{"train/loss": loss, "train/lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)  # drawn at tqdm's own interval
        if control.on_step:
            control.on_step(self.global_step, loss)
        stopping = agree_stop(self.accelerator, control)  # every process saves and stops at the same step
        final = self.global_step == self.max_steps
        due = self.global_step % self.settings.save_every_n_steps == 0 or final or stopping
        rngs = every_rank(self.accelerator, global_rng_state(self.accelerator.device)) if due else None
        every, main = self.settings.validation.every, self.accelerator.is_main_process
        validating = (every and self.global_step % every == 0) or final
        with whole_weights(self.trainable, keep=main) if due else nullcontext():  # a sharded model's, on the main one
            optimizer = full_optimizer_state(self.optimizer, keep=main) if due else None
            if main and due:
                self.save(rngs, optimizer)
        with gathered(self.trainable) if validating else nullcontext():
            if main and validating:
                self.validate(self.global_step)
        return stopping

    def save(self, rngs: list[dict[str, Any]] | None = None, optimizer: dict[str, Any] | None = None) -> None:
        """A checkpoint of the current step: the training state for an exact resume and the recipe's files.
        `rngs`: every process's global RNG state (`launch.every_rank`); a rescue save has only its own.
        `optimizer`: the optimizer's state gathered whole (`sharding.full_optimizer_state`), else read here."""
        at, settings = self.global_step, self.settings
        target = self.model.facts["prediction_type"].value  # what loading settled (a setting or the model's)
        state = {
            "step": at,
            "method": self.recipe.state_dict(),
            "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": global_rng_state(self.accelerator.device),
            **({"rank_rngs": rngs} if rngs and len(rngs) > 1 else {}), "processes": self.accelerator.num_processes,
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "skipped": self.skips.state(),
        }
        folder = write_checkpoint(
            self.run_dir, at, state,
            lambda tmp: self.record.finish(self.recipe.save(
                tmp, step=at, resolution=settings.resolution, base_model=settings.base_model,
                run_name=self.run_dir.name, prediction_type=target,
            ), at),
        )
        self.last_saved = at
        files = sorted(p.name for p in folder.iterdir() if p.name != "training_state.pt")
        self.events.emit(Event.CHECKPOINT, step=at, path=str(folder), files=files)
        self.result.checkpoints.append(folder)
        for old in prune_checkpoints(self.run_dir, settings.keep_last_n_checkpoints):
            self.events.emit(Event.CHECKPOINT_REMOVED, path=str(old))

    def validate(self, at: int) -> None:
        """The validation images of step `at` and their grid, as the files saved at that step render them."""
        from conjure.train.validation import as_array, build_pipeline, render

        val = self.settings.validation
        self._pipe = self._pipe or build_pipeline(self.model.family.pipeline_class, dict(self.model.components),
                                                 self.objective.sampler)
        started = time.perf_counter()
        device = self.accelerator.device
        # Eval mode: the images show what the saved files do, without dropout. A forked RNG: whether and how
        # often a run validates never changes the dropout masks of its training steps.
        for module in self.trainable:
            module.eval()
        try:
            with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.accelerator.autocast(),
                  self.recipe.validation_weights()):
                self._held_out_loss(at)
                images, grid_path = render(
                    self._pipe, self.run_dir / VALIDATION_DIR / step_dir_name(at), prompts=list(val.prompts),
                    seeds=list(val.seeds), negative_prompt=val.negative_prompt,
                    num_inference_steps=val.num_inference_steps, guidance_scale=val.guidance_scale,
                    resolution=self.settings.resolution,
                    embed=lambda prompt, negative: self._prompt_inputs(
                        self.recipe.expand_caption(prompt), self.recipe.expand_caption(negative)),
                )
        finally:
            for module in self.trainable:
                module.train()
        self.events.emit(
            Event.VALIDATION, step=at, grid=str(grid_path), images=[str(p) for p in images],
            prompts=list(val.prompts), seeds=list(val.seeds), seconds=round(time.perf_counter() - started, 3),
        )
        self.events.image("validation/grid", at, as_array(grid_path))
        self.result.validations.append(grid_path)
        if self.image_scoring:
            self.image_scoring.log(at, images, self.events)
