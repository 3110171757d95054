"""Peak GPU memory and step time of a FLUX.1-dev LoRA with each `advanced.base_weights_dtype`.

Rank 16 on the default preset (attention_mlp), 1024 px (4096 image tokens), batch 1, 512 T5 tokens, gradient
checkpointing, AdamW on the adapters, bf16 autocast: a run with cached latents and text-encoder outputs, so only
the transformer and the adapters are on the device (the VAE, CLIP and T5 are not). The transformer is FLUX.1-dev's
architecture (models/reference.py) with random weights, made once on the CPU in bf16; each setting places a copy
with the loop's own `place_model` (float8/nf4 convert each layer on its way to the device) and adds the LoRA with
the recipe (`methods.lora.Lora`); a step is FluxConditioning's transformer call under the flow objective's loss,
as training runs them. Peak = torch.cuda.max_memory_allocated over placing and stepping. Not a test.

    python benchmarks/flux_memory.py --size tiny                               # CPU: the tiny FLUX, a smoke run
    python benchmarks/flux_memory.py --size full --write docs/benchmarks.md    # a CUDA GPU (bf16 needs ~30 GB)

float8 needs torchao, nf4 bitsandbytes (pip install 'conjure[float8]' / 'conjure[bnb]'); a setting whose library
is missing, or nf4 on the CPU, is reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from bench_common import machine, publish  # benchmarks/bench_common.py (this script's folder)


def reference_transformer(size: str) -> torch.nn.Module:
    """FLUX.1-dev's transformer in bf16 on the CPU with random weights (or the tiny FLUX's)."""
    if size == "tiny":
        from conjure.models.tiny import build_tiny_components

        return build_tiny_components("flux")["transformer"].to(torch.bfloat16)
    from diffusers import FluxTransformer2DModel

    from conjure.families import FLUX
    from conjure.models.reference import transformer_config

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # so that to_empty allocates 23.8 GB, not float32's 47.6 GB
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**transformer_config(FLUX.reference, guidance=True))
        transformer.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0.0, 0.02)
    return transformer.eval()


def run_one(base: torch.nn.Module, choice: str, device: torch.device, *, resolution: int, tokens: int,
            steps: int, warm_up: int) -> dict:
    from conjure.config.lora import LoraSection
    from conjure.families import FLUX
    from conjure.methods.lora import Lora
    from conjure.models.loading import LoadedModel
    from conjure.train.flow import FlowObjective
    from conjure.train.flux import FluxConditioning
    from conjure.train.setup import place_model

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = LoadedModel(FLUX, "reference", {"transformer": copy.deepcopy(base)})
    place_model(model, device, "bf16", choice)
    recipe = Lora(model, LoraSection(rank=16))
    transformer = model.denoiser
    transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(recipe.parameters(), lr=1e-4)
    placed = time.perf_counter() - started
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    config = transformer.config
    channels, side = config.in_channels // 4, resolution // 8
    latents = torch.randn(1, channels, side, side, device=device, dtype=torch.bfloat16)
    text = {"encoder_hidden_states": torch.randn(1, tokens, config.joint_attention_dim, device=device),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, device=device)}
    predict = FluxConditioning(t5_tokens=tokens).predictor(transformer, [], [], device, {}, text=text)
    objective, generator = FlowObjective(), torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(warm_up + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = objective.loss(predict, latents, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    step_s = sorted(times[warm_up:])[len(times[warm_up:]) // 2]
    del model, recipe, transformer, optimizer, predict
    gc.collect()
    return {"placed_s": placed, "resident_gib": resident, "peak_gib": peak, "step_s": step_s,
            "finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def gib(value: float) -> str:
    return f"{value:.1f} GiB" if value == value else "n/a (CPU)"  # NaN: no CUDA memory to count


def available(choice: str, device: torch.device) -> str:
    """Why `choice` cannot run here ("" when it can)."""
    library = {"float8": "torchao", "nf4": "bitsandbytes"}.get(choice)
    if library and importlib.util.find_spec(library) is None:
        return f"{library} not installed"
    if choice == "nf4" and device.type != "cuda":
        return "nf4 needs a CUDA GPU"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--choices", default="auto,float8,nf4", help="comma list of auto, float8, nf4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warm-up", type=int, default=2)
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolution, tokens = (1024, 512) if args.size == "full" else (64, 16)
    t0 = time.perf_counter()
    base = reference_transformer(args.size)
    print(f"transformer built in {time.perf_counter() - t0:.0f} s ({sum(p.numel() for p in base.parameters()):,} "
          "weights)", flush=True)
    rows = []
    for choice in args.choices.split(","):
        why = available(choice, device)
        r = None if why else run_one(base, choice, device, resolution=resolution, tokens=tokens, steps=args.steps,
                                     warm_up=args.warm_up)
        rows.append((choice, why, r))
        print(f"  {choice:>6}: {why or r}", flush=True)
    table = [
        f"### FLUX.1-dev LoRA memory by base_weights_dtype, {args.size} transformer: {machine()} "
        f"({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/flux_memory.py --size {args.size} --steps {args.steps}`: rank 16 (attention_mlp), "
        f"{resolution} px, batch 1, {tokens} T5 tokens, gradient checkpointing, AdamW, bf16 autocast, random "
        "weights; text and latents as cached (VAE, CLIP and T5 not on the device). Peak = "
        "torch.cuda.max_memory_allocated over placing and training; median step after warm-up.",
        "",
        "| base_weights_dtype | resident after placing + LoRA | peak GPU memory | s/step | steps/s | placing | loss finite |",
        "|---|---|---|---|---|---|---|",
    ]
    for choice, why, r in rows:
        if r is None:
            table.append(f"| {choice} | skipped: {why} | | | | | |")
            continue
        table.append(f"| {choice} | {gib(r['resident_gib'])} | {gib(r['peak_gib'])} | {r['step_s']:.3f} | "
                     f"{1 / r['step_s']:.2f} | {r['placed_s']:.0f} s | {'yes' if r['finite'] else 'NO'} |")
    publish("\n".join(table) + "\n", args.write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
