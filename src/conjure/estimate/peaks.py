"""The whole estimate: each term where the run holds it, in each phase, and the assumptions behind it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conjure.estimate.model import CUDA_CONTEXT, PROCESS_BASELINE, Estimate, Term

if TYPE_CHECKING:
    from conjure.config import RunConfig
    from conjure.models.loading import LoadedModel

def estimate(config: RunConfig, *, assume_gpu: bool = False) -> Estimate:
    """The run's peaks and their breakdown; `assume_gpu`: as on a CUDA GPU, on a machine without one."""
    from conjure.config.presets import apply_to_machine
    from conjure.config.sections import OBJECTIVE_SETTINGS
    from conjure.estimate.activations import trace_activations, vae_encode_working_set
    from conjure.estimate.data import data_terms, native_resolution, where
    from conjure.estimate.model import ema_terms, meta_model, trained_parameters, training_terms, weight_terms
    from conjure.methods import method_spec
    from conjure.train.objectives import build_conditioning
    from conjure.train.setup import WEIGHT_DTYPES, text_reading

    spec = method_spec(config.type)
    place = where(config, assume_gpu=assume_gpu)
    model = meta_model(config, spec)
    # basic.memory_preset's machine options, as the run sets them at its start (train/setup.py machine_preset)
    config, preset_warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS[model.family.objective],
                                              device=torch.device("cuda" if place.cuda else "cpu"))
    adv, data = config.advanced, config.data
    resolution = data.resolution or native_resolution(model)
    frozen = WEIGHT_DTYPES[place.precision]
    weights = weight_terms(model, place.precision, adv.base_weights_dtype)
    for name, part in model.components.items():  # as place_model leaves them, for the trace
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).to(torch.float32 if name == "vae" and place.precision == "fp16" else frozen)
    base_parameters = {n: sum(p.numel() for p in m.parameters()) for n, m in model.components.items()
                       if isinstance(m, torch.nn.Module)}  # before the recipe adds its own
    recipe = spec.build(config, model)
    trainable = trained_parameters(recipe)
    trained = [p for g in recipe.parameter_groups(1.0) for p in g["params"]]
    largest = max(p.numel() for p in trained) if config.optimizer.fused_backward_pass else None
    training = training_terms(trainable, config.optimizer.optimizer, config.optimizer.adam_beta1, largest,
                              trained[0].dtype)
    ema_device, ema_ram = ema_terms(recipe, place.cuda)
    for part in recipe.trainable_modules().values():
        # The trace has no autocast; in the run, autocast computes the float32 trained parts (a full fine-tune's
        # UNet, a LoRA's adapters) in the run's precision, so they are traced in it.
        part.to(frozen)
    traced = trace_activations(config, model, resolution=resolution, dtype=frozen)
    activations = Term("activations" + (" (gradient checkpointing)" if adv.gradient_checkpointing else ""),
                       traced.saved + 2 * traced.largest + traced.recomputed, "modelled")
    # The step encodes its batch (each step without a latent cache, the first epoch with one) under no_grad before
    # the denoiser's forward (train/loop.py _latents): the peak holds its working set or the activations.
    encode = vae_encode_working_set(model, batch=data.batch_size, resolution=resolution)
    step = [activations] + ([Term(f"VAE encode, beyond the activations ({encode / 2**20:.0f} MiB in all)",
                                  encode - activations.bytes, "modelled")] if encode > activations.bytes else [])
    conditioning = build_conditioning(model, text_reading(config, model), resolution=resolution, guidance=adv.guidance)
    cached, notes = data_terms(config, model, conditioning, resolution, frozen)
    # train/text_ahead.py: the encoders leave the GPU first; on the CPU, text is encoded ahead and the encoders
    # freed before a float8 transformer streams in (frees_for_a_quantised_read)
    quantised_read = model.family.denoiser == "transformer" and adv.base_weights_dtype != "auto"
    ahead = data.cache_text_encoder_outputs and (place.cuda or quantised_read)
    loaded = _as_loaded(config, model, frozen, ahead)
    encoders = {s.encoder for s in model.family.text_encoders}
    on_device = [t for name, t in weights.items() if not (ahead and name in encoders)]
    result = Estimate(
        family=model.family.name, method=config.type, device="cuda" if place.cuda else "cpu",
        precision=place.precision, resolution=resolution, batch_size=data.batch_size,
        parameters=base_parameters,
        trainable=trainable,
    )
    baseline = Term("python, torch and libraries", PROCESS_BASELINE, "measured")
    if place.cuda:
        result.accelerator = [*on_device, *training, *ema_device, *step]
        if ahead:
            result.encoding = [t for name, t in weights.items() if name in encoders]
        # the parts as loaded leave RAM for the GPU before the recipe makes its EMA there
        result.ram = [baseline, *_larger(loaded, ema_ram), *cached]
    else:
        kept = [t for name, t in weights.items() if not (ahead and name in encoders and not _keeps_encoders(config))]
        result.ram = [baseline, *_larger(loaded, kept), *training, *ema_ram, *step, *cached]
    result.assumptions = (_assumptions(config, place.source, place.precision, resolution, ahead, place.cuda)
                          + [_encode_line(encode, len(step) > 1)] + notes + _preset_lines(config, preset_warning))
    return result


def _loaded_terms(model: object, frozen: torch.dtype, base_weights: str, without: set[str] | None = None
                  ) -> list[Term]:
    """The parts (but those `without`) as loading reads them into RAM (`models/loading.py`: in the run's frozen
    dtype, the VAE in float32; a float8 transformer as it streams in), before they move to the accelerator."""
    from conjure.estimate.model import loaded_bytes

    return [Term(f"{name} as loaded ({dtype})", size, "counted")
            for name, dtype, size in loaded_bytes(model, frozen, base_weights) if name not in (without or set())]


def _as_loaded(config: RunConfig, model: LoadedModel, frozen: torch.dtype, ahead: bool) -> list[Term]:
    """The parts in RAM while the run loads: all at once, or the larger of two phases where a transformer family's
    weights are read after text encoded ahead freed the encoders (Wanted.defer_denoiser; train/text_ahead.py
    still_needed: no held-out loss, a method that does not save the whole model)."""
    base = config.advanced.base_weights_dtype
    if not ahead or _keeps_encoders(config) or model.family.denoiser != "transformer":
        return _loaded_terms(model, frozen, base)
    encoders = {slot.encoder for slot in model.family.text_encoders}
    return _larger(_loaded_terms(model, frozen, base, {model.family.denoiser}),
                   _loaded_terms(model, frozen, base, encoders))


def _keeps_encoders(config: RunConfig) -> bool:
    """Whether text encoded ahead still keeps the encoders: train/text_ahead.py still_needed, asked of the config's
    held-out loss."""
    from conjure.methods import method_spec
    from conjure.train.text_ahead import still_needed

    held_out = config.validation.holdout > 0 or config.validation.loss_images is not None
    return still_needed(method_spec(config.type), held_out) is not None


def _preset_lines(config: RunConfig, warning: str | None) -> list[str]:
    """basic.memory_preset's choices (`config.preset_choices`, as the run's start line says them) and what this
    machine cannot run of it."""
    from conjure.config.presets import summary

    choices = config.preset_choices
    return ([f"{summary(choices)} (from basic.memory_preset {config.basic.memory_preset})"] if choices else []) + (
        [warning] if warning else [])


def _larger(first: list[Term], second: list[Term]) -> list[Term]:
    return first if sum(t.bytes for t in first) >= sum(t.bytes for t in second) else second


def _assumptions(config: RunConfig, precision_source: str, precision: str, resolution: int, ahead: bool,
                 cuda: bool) -> list[str]:
    adv, data = config.advanced, config.data
    lines = [
        f"precision {precision} (from {precision_source}); trained parameters and their gradients in the dtype "
        "named (float32 masters, or a full fine-tune's bf16 weights), optimizer state in float32",
        f"{data.batch_size} image(s) of {resolution} x {resolution} px per step"
        + ("; aspect-ratio buckets hold about as many pixels" if data.aspect_ratio_buckets else ""),
        "activations: modelled from the tensors autograd saves in one forward, traced on the meta device with "
        "memory-efficient attention, plus twice the largest for backward's working set"
        + ("; checkpointed blocks' inputs plus one block recomputed" if adv.gradient_checkpointing else ""),
        f"the process baseline ({PROCESS_BASELINE / 2**30:.2f} GiB) is measured on this project's CPU runs",
    ]
    if cuda:
        lines.append(f"accelerator figures are what torch allocates (max_memory_allocated); the CUDA context and "
                     f"allocator slack need about {CUDA_CONTEXT / 2**30:.1f} GiB more")
    else:
        # Measured on the tiny SD 1.x at 256-512 px (docs/benchmarks.md, "Where that gap is"): the tensors a CPU
        # step holds meet the trace; glibc's dynamic mmap threshold keeps the freed ones resident.
        lines.append("RAM figures are the tensors alive at the peak; glibc's heap keeps freed tensors resident, "
                     "which measured 15-50% more peak RSS at 256-512 px; MALLOC_MMAP_THRESHOLD_=131072 set before "
                     "`conjure train` returns them, for 4-9% more CPU time")
    if ahead:
        lines.append("data.cache_text_encoder_outputs on a GPU (on the CPU: before a float8 transformer streams "
                     "in): the text encoders are used and leave before the denoiser arrives (train/text_ahead.py); "
                     "the peak is the larger of the two phases; without a held-out loss they are freed, and a FLUX.1 "
                     "transformer's weights are read only then")
    return lines


def _encode_line(size: float, peak: bool) -> str:
    what = ("is the step's peak, above the activations" if peak
            else "comes before the denoiser's forward, so it is not on top of the activations")
    return (f"the VAE encode of a batch (each step without a latent cache, the first epoch with one) needs "
            f"{size / 2**20:.0f} MiB while it runs, traced on the meta device; it {what}")
