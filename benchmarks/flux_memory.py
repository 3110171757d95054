"""FLUX.1 LoRA memory and speed: peak GPU memory and steps/s of a LoRA on the full-size FLUX.1-dev transformer.

What is measured, per `advanced.base_weights_dtype` ("bf16" = auto, the bf16 weights of bf16 mixed precision;
"float8", torchao weight-only; "nf4", bitsandbytes), each in a fresh copy of the transformer:
- a random-weight FLUX.1-dev transformer (11.9B parameters, the published config: `conjure.models.reference`;
  speed and memory do not depend on the weights' values), LoRA rank 16 with FLUX's default preset
  (attention_mlp, kohya's default set), 1024 px (128x128x16 latents, 4096 image tokens + 512 T5 tokens),
  batch 1, gradient checkpointing, AdamW, bf16 mixed precision, gradient clipping at the default 1.0;
- through conjure's own code for everything that decides memory: `train.setup.place_model` (the bf16 cast and
  the float8/nf4 conversion of `models/quantize.py`), `methods.lora.Lora`, `enable_gradient_checkpointing`,
  `train.optimizers.build_optimizer`, the run's Accelerator (`make_accelerator`, `prepare`, autocast,
  backward, clipping), `FluxConditioning.predictor` and `FlowObjective.loss`, as `TrainingSession.step` calls them;
- peak GPU memory of the training steps (`torch.cuda.max_memory_allocated` and `max_memory_reserved`, reset
  after the weights are placed), the memory the placed weights hold, the peak while placing them (float8/nf4
  convert each layer as it moves, so this stays near the converted size), and the median step time after warm-up.

What is not: the text encoders (CLIP-L, T5-XXL) and the VAE are NOT on the GPU here: the step gets cached text
tensors of the real shapes (T5 hidden states [1, 512, 4096], CLIP-L pooled [1, 768]) and cached latents, as a
run with `data.cache_latents` and `data.cache_text_encoder_outputs` reads them. Such a run keeps its text encoders
on the CPU too (`train/text_ahead.py`), but its VAE stays on the GPU (0.2 GiB in bf16); the output says what each
would add there. No data loading, no validation, no checkpoint saving.

    python benchmarks/flux_memory.py --size tiny --steps 4                 # CPU, seconds: checks the harness
    python benchmarks/flux_memory.py --size full --write docs/benchmarks.md  # a CUDA GPU (scripts/gpu_flux_bench.sh)

Never run `--size full` without a GPU machine's memory: the transformer's master copy is ~24 GB of CPU RAM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench_common import machine, publish  # benchmarks/bench_common.py (this script's folder)

GIB = 2**30
MODES = {"bf16": "auto", "float8": "float8", "nf4": "nf4"}  # the column's name -> advanced.base_weights_dtype
TARGETS = {"bf16": 24, "float8": 12, "nf4": 12}  # issue 15: peak GiB a 24 GB / 12 GB card must hold
KEPT = ("transformer", "scheduler", "tokenizer", "tokenizer_2")  # what the run keeps; the rest is cached


def components(size: str) -> dict[str, Any]:
    """FluxPipeline components: the full-size FLUX.1-dev on the meta device, or the tiny random-weight one."""
    if size == "full":
        from conjure.models.reference import build_reference_components

        return build_reference_components("flux", device="meta")
    from conjure.models.tiny import build_tiny_components

    return build_tiny_components("flux")


def master_weights(transformer: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The transformer's weights in bf16 on the CPU, one tensor at a time, never two copies of the model: a meta
    model's get normal(0, 0.02) drawn on the GPU where there is one (seconds, against ~100 s a CPU core), a
    materialised one's are cast."""
    where = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(where).manual_seed(seed)
    master = {}
    for name, param in transformer.state_dict().items():
        if param.is_meta:
            drawn = torch.empty(param.shape, dtype=torch.bfloat16, device=where)
            master[name] = drawn.normal_(0.0, 0.02, generator=generator).cpu()
        else:
            master[name] = param.detach().to(torch.bfloat16).clone()
    return master


def loaded_model(parts: dict[str, Any], master: dict[str, torch.Tensor]) -> Any:
    """A fresh `LoadedModel` whose transformer holds `master`'s tensors (assigned, not copied), with the facts
    loading settles for a FLUX model (`models/transformer_loading.py` `_settle`)."""
    from diffusers import FluxTransformer2DModel

    from conjure import families
    from conjure.models.loading import Fact, LoadedModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(parts["transformer"].config)
    transformer.load_state_dict(master, assign=True)
    fam = families.get("flux")
    kept = {name: parts[name] for name in KEPT}
    kept["transformer"] = transformer
    variant = families.detect_variant(fam, transformer.config)
    return LoadedModel(family=fam, source="random weights", components=kept, facts={
        "variant": Fact(variant.name, "the transformer config (guidance_embeds)"),
        "prediction_type": Fact("flow_matching", f"the family ({fam.title})"),
    })


def run_config(mode: str, resolution: int, steps: int) -> Any:
    """The LoRA config a user would write for this measurement (its defaults are the product's)."""
    from conjure.config import parse_config

    return parse_config({
        "type": "lora",
        "basic": {"base_model": "random-weights", "family": "flux", "max_train_steps": steps, "seed": 0},
        "data": {"source": "unused", "resolution": resolution, "batch_size": 1, "cache_latents": "memory",
                 "cache_text_encoder_outputs": True},
        "lora": {"rank": 16},  # unet_targets auto: FLUX's attention_mlp
        "advanced": {"mixed_precision": "bf16", "gradient_checkpointing": True, "base_weights_dtype": MODES[mode]},
    })


def measure(mode: str, parts: dict[str, Any], master: dict[str, torch.Tensor], *, resolution: int,
            steps: int) -> dict[str, Any]:
    """One mode in a fresh model: place, add the LoRA, train `steps` steps; the figures, or why it cannot run."""
    from conjure.errors import ConjureError
    from conjure.methods.lora import Lora
    from conjure.models.quantize import check_base_weights_dtype
    from conjure.train.objectives import build_conditioning, build_objective
    from conjure.train.optimizers import build_optimizer
    from conjure.train.settings import LoopSettings
    from conjure.train.setup import make_accelerator, place_model

    config = run_config(mode, resolution, steps)
    try:
        check_base_weights_dtype(config.advanced.base_weights_dtype, cpu=config.advanced.cpu)
    except ConjureError as exc:
        return {"refused": str(exc)}
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    accelerator, _ = make_accelerator(config.advanced)
    model = loaded_model(parts, master)
    # what an earlier mode left on the GPU (should be 0: each mode's peak is its own)
    figures: dict[str, Any] = {"left_gib": torch.cuda.memory_allocated() / GIB if cuda else 0.0}
    started = time.perf_counter()
    place_model(model, accelerator.device, "bf16", config.advanced.base_weights_dtype)
    if cuda:
        torch.cuda.synchronize()
    figures["place_s"] = time.perf_counter() - started
    if cuda:
        figures.update(placed_gib=torch.cuda.memory_allocated() / GIB,
                       placing_peak_gib=torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.reset_peak_memory_stats()
    recipe = Lora(model, config.lora, seed=config.basic.seed)
    model.denoiser.enable_gradient_checkpointing()  # as setup.assemble does for advanced.gradient_checkpointing
    groups = recipe.parameter_groups(config.optimizer.learning_rate)
    params = [p for g in groups for p in g["params"]]
    optimizer = accelerator.prepare(build_optimizer(groups, config.optimizer, device=accelerator.device))
    denoiser = accelerator.prepare(model.denoiser)
    denoiser.train()
    settings = LoopSettings.of(config, resolution=resolution, mixed_precision="bf16", max_steps=steps)
    # FLUX's conditioning reads no TextReading (CLIP's clip skip and token limit): None stands for it
    conditioning = build_conditioning(model, None, resolution=resolution, guidance=config.advanced.guidance)
    objective = build_objective(model, settings)
    text, latents = cached_inputs(model, conditioning.t5_tokens, resolution, accelerator.device)
    generator = torch.Generator("cpu").manual_seed(config.basic.seed)
    times, losses = [], []
    for _ in range(steps):  # TrainingSession.step with cached latents and text
        tick = time.perf_counter()
        with accelerator.autocast():
            predict = conditioning.predictor(denoiser, [], [""], accelerator.device, {}, text)
            loss = objective.loss(predict, latents, generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, config.advanced.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises, as the loop's .item() does
        times.append(time.perf_counter() - tick)
    warm = min(2, len(times) // 2)
    figures.update(step_s=statistics.median(times[warm:]), finite=bool(torch.isfinite(torch.tensor(losses)).all()),
                   trained=sum(p.numel() for p in params), targets=len(recipe.targets["transformer"]))
    if cuda:
        figures.update(peak_gib=torch.cuda.max_memory_allocated() / GIB,
                       reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return figures


def cached_inputs(model: Any, t5_tokens: int, resolution: int, device: torch.device
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What the text and latent caches hand a step, in the real shapes: T5 hidden states [1, t5_tokens, T5 width],
    CLIP-L pooled [1, CLIP width], and bf16 latents [1, C, resolution / 8, resolution / 8] (the VAE's 8x; C packs
    2x2 into the transformer's input channels)."""
    config = model.denoiser.config
    g = torch.Generator("cpu").manual_seed(1)
    text = {"encoder_hidden_states": torch.randn(1, t5_tokens, config.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g)}
    side = resolution // 8
    latents = torch.randn(1, config.in_channels // 4, side, side, generator=g)
    return ({k: v.to(device, torch.bfloat16) for k, v in text.items()}, latents.to(device, torch.bfloat16))


def size(count: float, unit: str = "") -> str:
    """A parameter count (or a byte count, with unit "B") in readable units."""
    if unit == "B":
        return f"{count / GIB:.1f} GiB" if count >= GIB / 10 else f"{count / 2**20:.1f} MiB"
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def off_device(parts: dict[str, Any]) -> str:
    """What the parts left off the GPU would hold there in bf16, by name."""
    return ", ".join(f"{name} {size(sum(p.numel() for p in part.parameters()) * 2, 'B')}"
                     for name, part in parts.items() if isinstance(part, torch.nn.Module) and name not in KEPT)


def table(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, parts: dict[str, Any],
          build_s: float) -> str:
    count = sum(p.numel() for p in parts["transformer"].parameters())
    lines = [
        f"### FLUX.1 LoRA memory and speed, {args.size} transformer: {machine()} ({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/flux_memory.py --size {args.size} --modes {args.modes} --steps {args.steps} "
        f"--resolution {args.resolution}`: random-weight FLUX.1-dev transformer ({size(count)} parameters, "
        f"built and initialised in {build_s:.0f} s), LoRA rank 16 (attention_mlp), {args.resolution} px, batch 1, "
        "gradient checkpointing, AdamW, bf16 mixed precision; median step time after 2 warm-up steps; peak = "
        "torch.cuda.max_memory_allocated (reserved: max_memory_reserved) over the training steps. The text "
        "encoders and the VAE are not on the GPU (cached text and latents of the real shapes; a run with "
        "data.cache_text_encoder_outputs keeps its text encoders on the CPU too, its VAE on the GPU); in bf16 they "
        f"would add: {off_device(parts)}.",
        "",
        "| base weights | peak GPU memory (allocated / reserved) | target | weights placed | peak while placing "
        "| s/step | steps/s | LoRA parameters | loss finite |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in rows:
        target = f"<= {TARGETS[mode]} GiB" + ("" if args.size == "full" else " (full size)")
        if "refused" in r or "failed" in r:
            why = r.get("failed") or (r["refused"] if torch.cuda.is_available() else "needs a CUDA GPU")
            lines.append(f"| {mode} | {'failed' if 'failed' in r else 'not run'}: {why} | {target} | | | | | | |")
            continue
        if "peak_gib" in r:
            memory = f"{r['peak_gib']:.1f} / {r['reserved_gib']:.1f} GiB"
            placed = f"{r['placed_gib']:.1f} GiB", f"{r['placing_peak_gib']:.1f} GiB"
            if args.size == "full":
                target += " (met)" if r["peak_gib"] <= TARGETS[mode] else " (NOT met)"
        else:
            memory, placed = "n/a (CPU)", ("n/a (CPU)", "n/a (CPU)")
        lines.append(f"| {mode} | {memory} | {target} | {placed[0]} | {placed[1]} | {r['step_s']:.3f} | "
                     f"{1 / r['step_s']:.2f} | {r['trained']:,} in {r['targets']} layers | "
                     f"{'yes' if r['finite'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--modes", default="bf16,float8,nf4", help="comma list of bf16 (auto), float8, nf4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="default: 1024 full, 64 tiny")
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (1024 if args.size == "full" else 64)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        parser.error(f"--modes: {', '.join(sorted(set(modes) - set(MODES)))} is not one of {', '.join(MODES)}")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as benchmarks/train_speed.py: 2 threads are erratic on the 2-core machines
    started = time.perf_counter()
    parts = components(args.size)
    master = master_weights(parts["transformer"])
    build_s = time.perf_counter() - started
    print(f"transformer built and initialised in {build_s:.1f} s", flush=True)
    rows = []
    for mode in modes:
        try:
            result = measure(mode, parts, master, resolution=args.resolution, steps=args.steps)
        except Exception as exc:  # noqa: BLE001 - one mode's failure (out of memory, a library's) is its row
            traceback.print_exc()
            first = str(exc).strip().splitlines()[0].replace("|", "/") if str(exc).strip() else ""
            result = {"failed": f"{type(exc).__name__}: {first}"}
        print(f"  {mode}: {result}", flush=True)
        rows.append((mode, result))
    publish(table(rows, args, parts, build_s), args.write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    sys.exit(main())
