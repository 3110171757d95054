"""The training loop, shared by every method: setup, steps, checkpoints, validation, resume.

`train(config)` is the one entry point (CLI, demo and tests call it). Methods plug in through
`conjure.methods` and never see the loop's internals; the loop never branches on a method or family.
Exact resume: data order comes from (seed, epoch), augmentation from (seed, epoch, index), noise and
timesteps from one CPU generator whose state is checkpointed with the optimizer and LR scheduler.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from conjure.config import dump_config
from conjure.errors import ConjureError
from conjure.train.checkpoints import load_state, prune_checkpoints, step_dir_name, write_checkpoint
from conjure.train.events import EventLog


@dataclass
class TrainControl:
    """Commands into a run (stop) and callbacks out of it (after each step). Signals set `stop`."""

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


def _resolve_precision(requested: str, *, cpu: bool) -> str:
    if requested != "auto":
        return requested
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class _MicroBatches:
    """Batch sampler over (epoch, index) keys for micro-batches [start, end); this process's share."""

    def __init__(self, n: int, batch: int, seed: int, start: int, end: int, rank: int, world: int):
        from conjure.data.dataset import epoch_order

        self.n, self.batch, self.seed, self.start, self.end = n, batch, seed, start, end
        self.rank, self.world, self._order, self._epoch = rank, world, epoch_order, -1
        self.per_epoch = math.ceil(n / (batch * world))

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for m in range(self.start, self.end):
            epoch, b = divmod(m, self.per_epoch)
            if epoch != self._epoch:
                order, self._epoch = self._order(self.n, self.seed, epoch), epoch
            chunk = order[b * self.batch * self.world : (b + 1) * self.batch * self.world]
            yield [(epoch, i) for i in chunk[self.rank :: self.world]] or [(epoch, chunk[0])]


def train(config: Any, *, resume: str | None = None, control: TrainControl | None = None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    from conjure.data.dataset import TrainDataset, collate
    from conjure.data.sources import scan_source
    from conjure.methods import method_spec
    from conjure.models.loading import load_base_model
    from conjure.train.conditioning import encode_captions
    from conjure.train.loss import denoising_loss, encode_latents
    from conjure.train.run_dir import create_run_dir, default_run_name, find_resume_checkpoint
    from conjure.train.validation import as_array, build_pipeline, render

    control = control or TrainControl()
    spec = method_spec(config.type)
    basic, data, adv, opt, val = config.basic, config.data, config.advanced, config.optimizer, config.validation
    resume = resume or basic.resume

    # --- data first: a bad data folder should fail before minutes of model loading -----------------
    scan = scan_source(Path(data.source).expanduser())
    for path, reason in scan.skipped:
        _say(f"warning: skipping {path}: {reason}")
    captions = spec.caption_transform(config)
    trigger = spec.trigger(config)
    probe = [captions(ex.caption, random.Random(0)) for ex in scan.examples]
    if not any(trigger in c for c in probe):
        raise ConjureError(
            f"no training caption contains {trigger!r}: add it to the captions, or set data.caption_prefix: "
            f"'{trigger}'"
        )

    # --- model and method --------------------------------------------------------------------------
    model = load_base_model(
        basic.base_model,
        family=basic.family,
        revision=basic.revision,
        variant=basic.variant,
        base_model_config=basic.base_model_config,
    )
    if model.family.name not in spec.families:
        raise ConjureError(
            f"{config.type} trains {', '.join(spec.families)} models, but {basic.base_model!r} is "
            f"{model.family.name} ({model.family.title})"
        )
    precision = _resolve_precision(adv.mixed_precision, cpu=adv.cpu)
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # precision; train() is called repeatedly in one process (tests, benchmarks), so start each run afresh.
    # (The distributed PartialState is kept.)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=precision, gradient_accumulation_steps=adv.gradient_accumulation_steps, cpu=adv.cpu
    )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for name, part in model.components.items():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
            # fp16 VAEs overflow on some models (SDXL's is the known case); fp32 costs little here.
            part.to(accelerator.device, torch.float32 if (name == "vae" and precision == "fp16") else weight_dtype)
    method = spec.build(config, model)
    resolution = data.resolution or model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)
    if adv.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for module in method.trainable_modules():
            module.gradient_checkpointing_enable()

    # --- run folder, resolved config, events ---------------------------------------------------------
    checkpoint = None
    if resume:
        checkpoint = find_resume_checkpoint(
            resume, output_dir=basic.output_dir, run_name=basic.run_name, config_type=config.type
        )
        run_dir = checkpoint.parent.parent
    else:
        run_dir = create_run_dir(basic.output_dir, basic.run_name or default_run_name(config.type))
    resolved = config.model_copy(deep=True)
    resolved.basic.run_name, resolved.basic.resume, resolved.data.resolution = run_dir.name, None, resolution
    resolved.basic.output_dir = str(run_dir.parent)
    changed = _changed_settings(run_dir / "config.yaml", resolved) if checkpoint is not None else []
    if changed:
        _say(f"warning: resuming with changed settings: {', '.join(changed)}")
    (run_dir / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
    events = EventLog(run_dir / "events.jsonl", run_dir / "logs" if accelerator.is_main_process else None)
    too_long = _count_long_captions(model.text_encoders()[0][0], [method.expand_caption(c) for c in probe])
    if too_long:
        _say(f"warning: {too_long} caption(s) are longer than the text encoder's limit and will be cut off")

    # --- data loading, optimizer, schedule -----------------------------------------------------------
    dataset = TrainDataset(
        scan.examples,
        resolution=resolution,
        center_crop=data.center_crop,
        random_flip=data.random_flip,
        keep_in_memory=data.keep_in_memory,
        caption_transform=captions,
        seed=basic.seed,
    )
    world, accum = accelerator.num_processes, adv.gradient_accumulation_steps
    per_epoch = math.ceil(len(dataset) / (data.batch_size * world))
    max_steps = basic.max_train_steps or math.ceil(basic.max_train_epochs * per_epoch / accum)
    groups = method.parameter_groups(opt.learning_rate)
    optimizer = torch.optim.AdamW(
        groups, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_epsilon, weight_decay=opt.weight_decay
    )
    schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[opt.scheduler]
    lr_scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=max_steps
    )
    trainable = accelerator.prepare(*method.trainable_modules())
    trainable = list(trainable) if isinstance(trainable, (list, tuple)) else [trainable]
    optimizer = accelerator.prepare(optimizer)
    for module in trainable:
        module.train()  # CLIP has no dropout; train mode turns gradient checkpointing on in transformers
    generator = torch.Generator("cpu").manual_seed(basic.seed * 7919 + accelerator.process_index)

    step = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        generator.set_state(state["generator"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step = state["step"]
        _say(f"resuming {run_dir} from step {step}")
    if step >= max_steps:
        raise ConjureError(f"{run_dir} already reached step {step} of {max_steps}; raise basic.max_train_steps")

    pairs = [(tok, enc) for (tok, _), enc in zip(model.text_encoders(), trainable)]
    params = [p for g in groups for p in g["params"]]
    sampler = _MicroBatches(
        len(dataset), data.batch_size, basic.seed, step * accum, max_steps * accum,
        accelerator.process_index, world,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data.dataloader_num_workers
    )
    events.emit(
        "start", run_dir=str(run_dir), type=config.type, family=model.family.name, device=str(accelerator.device),
        mixed_precision=precision, images=len(dataset), skipped=[str(p) for p, _ in scan.skipped],
        max_train_steps=max_steps, start_step=step, resumed_from=str(checkpoint) if checkpoint else None,
        changed_settings=changed, long_captions=too_long,
    )

    result = RunResult(run_dir=run_dir, status="completed", step=step)
    pipe = None

    def save(at: int) -> None:
        state = {
            "step": at,
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "generator": generator.get_state(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        folder = write_checkpoint(
            run_dir, at, state,
            lambda tmp: method.save(tmp, step=at, resolution=resolution, base_model=basic.base_model),
        )
        files = sorted(p.name for p in folder.iterdir() if p.name != "training_state.pt")
        events.emit("checkpoint", step=at, path=str(folder), files=files)
        result.checkpoints.append(folder)
        for old in prune_checkpoints(run_dir, basic.keep_last_n_checkpoints):
            events.emit("checkpoint_removed", path=str(old))

    def validate(at: int) -> None:
        nonlocal pipe
        pipe = pipe or build_pipeline(model.family.pipeline_class, dict(model.components))
        started = time.perf_counter()
        with accelerator.autocast():
            images, grid_path = render(
                pipe, run_dir / "validation" / step_dir_name(at), prompts=val.prompts, seeds=val.seeds,
                negative_prompt=val.negative_prompt, num_inference_steps=val.num_inference_steps,
                guidance_scale=val.guidance_scale, resolution=resolution,
            )
        events.emit(
            "validation", step=at, grid=str(grid_path), images=[str(p) for p in images], prompts=val.prompts,
            seeds=val.seeds, seconds=round(time.perf_counter() - started, 3),
        )
        events.image("validation/grid", at, as_array(grid_path))
        result.validations.append(grid_path)

    previous_handlers = _install_signal_handlers(control)
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_saved = step
    try:
        if step == 0 and val.at_start and accelerator.is_main_process:
            validate(0)
        losses: list[float] = []
        for batch in loader:
            with accelerator.accumulate(*trainable):
                with torch.no_grad():
                    latents = encode_latents(model.vae, batch["pixel_values"], generator).to(weight_dtype)
                texts = [method.expand_caption(c) for c in batch["caption"]]
                with accelerator.autocast():
                    cond = encode_captions(pairs, texts, accelerator.device)
                    loss = denoising_loss(model.unet, model.noise_scheduler, latents, cond, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and adv.max_grad_norm:
                    accelerator.clip_grad_norm_(params, adv.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            step += 1
            loss_value, losses = sum(losses) / len(losses), []
            lr = lr_scheduler.get_last_lr()[0]
            if not math.isfinite(loss_value):
                raise ConjureError(
                    f"loss became {loss_value} at step {step}; lower optimizer.learning_rate or use "
                    "advanced.mixed_precision: bf16/no (last good checkpoint kept)"
                )
            events.emit("step", step=step, loss=loss_value, lr=lr)
            events.scalars(step, **{"train/loss": loss_value, "train/lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            result.step = step
            if control.on_step:
                control.on_step(step, loss_value)
            final = step == max_steps
            if accelerator.is_main_process and (step % basic.save_every_n_steps == 0 or final or control.stop_reason):
                save(step)
                last_saved = step
            every = basic.validate_every_n_steps
            if accelerator.is_main_process and ((every and step % every == 0) or final):
                validate(step)
            if control.stop_reason and not final:
                result.status = "interrupted"
                events.emit("stopped", step=step, reason=control.stop_reason)
                break
    except BaseException as exc:
        # Keep the work: a step that completed after the last checkpoint is saved before the error surfaces.
        if step > last_saved and accelerator.is_main_process:
            try:
                save(step)
            except Exception:  # noqa: BLE001 - the original error matters more than a failed rescue
                pass
        events.emit("end", status="failed", step=step, error=str(exc) or type(exc).__name__)
        events.close()
        raise
    finally:
        bar.close()
        _restore_signal_handlers(previous_handlers)
    events.emit("end", status=result.status, step=step)
    events.close()
    return result


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _changed_settings(saved_config: Path, resolved: Any) -> list[str]:
    """Dotted keys whose value differs from the run's saved config (a resume should say so)."""
    import yaml

    try:
        before = _flatten(yaml.safe_load(saved_config.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return []
    after = _flatten(resolved.model_dump(mode="json"))
    return sorted(k for k in after if k in before and before[k] != after[k])


def _count_long_captions(tokenizer: Any, captions: list[str]) -> int:
    limit = tokenizer.model_max_length
    return sum(len(ids) > limit for ids in tokenizer(captions).input_ids) if captions else 0


def _install_signal_handlers(control: TrainControl) -> dict[int, Any]:
    """First Ctrl-C / SIGTERM: finish the step, save, stop. A second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if control.stop_reason:
            raise KeyboardInterrupt
        control.request_stop(signal.Signals(signum).name)
        _say("stopping after this step (saving a checkpoint); press Ctrl-C again to abort at once")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
