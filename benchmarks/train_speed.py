"""Training speed and memory of each method, through the real `train()` entry point.

Builds a model folder (full-size random-weight SD 1.5 / 2.1 / SDXL architectures, or the tiny test models; FLUX.1
as `--families flux`, LoRA and DoRA only) or takes the shipped toy model (`--size toy`), makes a small image set,
and times training steps from the run's own events (median step time after warm-up); on CUDA it also reports peak
GPU memory. Methods: textual inversion (`ti`), LoRA, DoRA and pivotal tuning (rank 16, the family's default
preset: kohya's attention + feed-forward, FLUX.1's attention_mlp), and the full fine-tune (`finetune`: the whole
UNet, an EMA on the CPU). Prints a markdown table and, with --write,
appends it to docs/benchmarks.md with the machine that produced it. Not a test: figures depend on the machine.

    python benchmarks/train_speed.py --size tiny --families sd1 --write docs/benchmarks.md          # CPU, seconds
    python benchmarks/train_speed.py --size toy --families sd1,flux --methods lora                  # CPU, the toys
    python benchmarks/train_speed.py --size full --families sd1,sd2 --write docs/benchmarks.md      # GPU (TI)
    python benchmarks/train_speed.py --size full --families sd1,sdxl --methods lora,pivotal --optimizers adamw,adamw8bit
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conjure.config import parse_config
from conjure.runs.events import read_events
from conjure.train.loop import train

from bench_common import machine, median_step_seconds, publish  # benchmarks/bench_common.py (this script's folder)


def make_model(family: str, size: str, folder: Path) -> Path:
    """The model folder to train: a tiny random-weight model written to `folder`, the shipped toy model (trained
    weights, read in place), or a full-size random-weight architecture written to `folder`."""
    from conjure.models.tiny import save_model_folder, write_tiny_model

    if size == "tiny":
        return write_tiny_model(family, folder)
    if size == "toy":
        from conjure.toy.models import toy_model

        return toy_model(family)
    from conjure.models.reference import build_reference_components

    return save_model_folder(family, build_reference_components(family), folder)


def make_images(folder: Path, resolution: int, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def method_sections(method: str) -> dict:
    """The config type and method sections of a benchmark run of `method`."""
    token = {"placeholder_token": "<bench-token>", "initializer": "dog"}
    lora = {"rank": 16, "dora": method == "dora"}
    if method == "ti":
        return {"type": "textual_inversion", "textual_inversion": token}
    if method == "pivotal":
        return {"type": "pivotal", "textual_inversion": token, "lora": lora}
    if method == "finetune":  # the UNet whole, with an EMA kept on the CPU (what a 24 GB card trains SDXL with)
        return {"type": "finetune", "finetune": {"ema": {"enabled": True, "on_cpu": True}}}
    return {"type": "lora", "lora": {**lora, "trigger_word": "zwx"}, "data": {"caption_prefix": "zwx"}}


def run_one(model: Path, images: Path, out: Path, *, method="ti", family="sd1", resolution, batch, precision, ckpt,
            steps, validate, optimizer="adamw") -> dict:
    sections = method_sections(method)
    raw = {
        "type": sections.pop("type"),
        "basic": {
            "base_model": str(model), "family": family, "output_dir": str(out), "max_train_steps": steps,
            "save_every_n_steps": steps, "validate_every_n_steps": None if not validate else steps, "seed": 0,
        },
        "data": {"source": str(images), "resolution": resolution, "batch_size": batch, **sections.pop("data", {})},
        **sections,
        "validation": {"at_start": False, "seeds": [0, 1], "num_inference_steps": 25},
        "optimizer": {"optimizer": optimizer, **({"learning_rate": 1e-4} if method != "ti" else {})},
        "advanced": {"mixed_precision": precision, "gradient_checkpointing": ckpt},
    }
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(parse_config(raw))
    wall = time.perf_counter() - started
    events = read_events(result.run_dir / "events.jsonl").events
    step_s = median_step_seconds(result.run_dir, warm_up=5)
    losses = [e["loss"] for e in events if e["event"] == "step"]
    val = [e["seconds"] for e in events if e["event"] == "validation"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    if method == "finetune":  # its checkpoint is a whole model, twice, and its training state (SDXL: ~35 GB)
        shutil.rmtree(result.run_dir, ignore_errors=True)
    gc.collect()
    return {
        "step_s": step_s, "img_s": batch / step_s, "peak_gib": peak, "wall_s": wall,
        "finite": all(np.isfinite(losses)), "val_s": val[-1] if val else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "toy", "full"], default="tiny")
    parser.add_argument("--families", default="sd1")
    parser.add_argument("--methods", default="ti", help="comma list of ti, lora, dora, pivotal, finetune (default: ti)")
    parser.add_argument("--optimizers", default="adamw", help="comma list of adamw, adamw8bit (CUDA), adafactor, prodigy")
    parser.add_argument("--precisions", default=None, help="comma list of no/fp16/bf16 (default: device's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # 2 threads are erratic on the 2-core CI machines (docs/architecture.md)
    precisions = (args.precisions or ("bf16,fp16,no" if torch.cuda.is_available() else "no")).split(",")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="conjure-bench-"))
    rows = []
    for family in args.families.split(","):
        t0 = time.perf_counter()
        model = make_model(family, args.size, work / f"model-{family}")
        from diffusers import AutoencoderKL

        # the native size: the VAE's sample_size (a UNet's sample_size is in latents; FLUX.1 has none)
        res = AutoencoderKL.load_config(model, subfolder="vae")["sample_size"]
        print(f"[{family}] model written in {time.perf_counter() - t0:.0f} s; resolution {res}", flush=True)
        images = make_images(work / f"images-{res}", res)
        settings = [(p, False) for p in precisions] + [(precisions[0], True)]
        first = True
        for method in args.methods.split(","):
            for optimizer in args.optimizers.split(","):
                for precision, ckpt in settings:
                    r = run_one(model, images, work / "runs", method=method, family=family, resolution=res,
                                batch=args.batch, precision=precision, ckpt=ckpt, steps=args.steps, validate=first,
                                optimizer=optimizer)
                    first = False
                    rows.append((family, method, optimizer, args.size, res, args.batch, precision,
                                 "yes" if ckpt else "no", r))
                    print(f"  {method:>7} {optimizer:>9} {precision:>4} ckpt={ckpt!s:5} {r['step_s'] * 1000:8.1f} "
                          f"ms/step {r['img_s']:6.2f} img/s peak {r['peak_gib']:.2f} GiB finite={r['finite']} "
                          f"val={r['val_s']}", flush=True)
    table = [
        f"### Training speed, {args.size} models: {machine()} ({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/train_speed.py --size {args.size} --families {args.families} --methods {args.methods} "
        f"--optimizers {args.optimizers} --batch {args.batch} --steps {args.steps}`; median step time after 5 warm-up "
        "steps; peak = torch.cuda.max_memory_allocated; LoRA/DoRA/pivotal at rank 16 on the family's default "
        "preset (attention + feed-forward; FLUX.1: attention_mlp).",
        "",
        "| family | method | optimizer | model | resolution | batch | precision | grad. checkpointing | ms/step | images/s | peak GPU memory | loss finite | validation (2 prompts x 2 seeds, 25 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, method, optimizer, size, res, batch, precision, ckpt, r in rows:
        peak = f"{r['peak_gib']:.1f} GiB" if np.isfinite(r["peak_gib"]) else "n/a (CPU)"
        val = f"{r['val_s']:.1f} s" if r["val_s"] else ""
        table.append(
            f"| {family} | {method} | {optimizer} | {size} | {res} | {batch} | {precision} | {ckpt} | "
            f"{r['step_s'] * 1000:.1f} | {r['img_s']:.2f} | {peak} | {'yes' if r['finite'] else 'NO'} | {val} |"
        )
    text = "\n".join(table) + "\n"
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
