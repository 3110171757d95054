"""Textual-inversion training speed and memory, through the real `train()` entry point.

Builds a model folder (full-size random-weight SD 1.5 / 2.1 architectures, or the tiny test models), a small
image set, and times training steps from the run's own events (median step time after warm-up); on CUDA it
also reports peak GPU memory. Prints a markdown table and, with --write, appends it to docs/benchmarks.md
with the machine that produced it. Not a test: figures depend on the machine.

    python benchmarks/ti_speed.py --size tiny --families sd1 --write docs/benchmarks.md   # CPU, seconds
    python benchmarks/ti_speed.py --size full --families sd1,sd2 --write docs/benchmarks.md  # GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conjure.config import parse_config
from conjure.train.events import read_events
from conjure.train.loop import train


def make_model(family: str, size: str, folder: Path) -> Path:
    from conjure.models.tiny import save_model_folder, write_tiny_model

    if size == "tiny":
        return write_tiny_model(family, folder)
    from conjure.models.reference import build_reference_components

    return save_model_folder(family, build_reference_components(family), folder)


def make_images(folder: Path, resolution: int, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def run_one(model: Path, images: Path, out: Path, *, resolution, batch, precision, ckpt, steps, validate) -> dict:
    raw = {
        "type": "sd_textual_inversion",
        "basic": {
            "base_model": str(model), "output_dir": str(out), "max_train_steps": steps,
            "save_every_n_steps": steps, "validate_every_n_steps": None if not validate else steps, "seed": 0,
        },
        "data": {"source": str(images), "resolution": resolution, "batch_size": batch},
        "textual_inversion": {"placeholder_token": "<bench-token>", "initializer": "dog"},
        "validation": {"at_start": False, "seeds": [0, 1], "num_inference_steps": 25},
        "advanced": {"mixed_precision": precision, "gradient_checkpointing": ckpt},
    }
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(parse_config(raw))
    wall = time.perf_counter() - started
    events = read_events(result.run_dir / "events.jsonl")
    times = [e["time"] for e in events if e["event"] == "step"]
    warm = min(5, len(times) // 2)
    step_s = statistics.median(np.diff(times[warm:])) if len(times) - warm > 2 else float("nan")
    losses = [e["loss"] for e in events if e["event"] == "step"]
    val = [e["seconds"] for e in events if e["event"] == "validation"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    gc.collect()
    return {
        "step_s": step_s, "img_s": batch / step_s, "peak_gib": peak, "wall_s": wall,
        "finite": all(np.isfinite(losses)), "val_s": val[-1] if val else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--families", default="sd1")
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
        from diffusers import UNet2DConditionModel

        res = UNet2DConditionModel.load_config(model, subfolder="unet")["sample_size"] * 8
        print(f"[{family}] model written in {time.perf_counter() - t0:.0f} s; resolution {res}", flush=True)
        images = make_images(work / f"images-{res}", res)
        settings = [(p, False) for p in precisions] + [(precisions[0], True)]
        for i, (precision, ckpt) in enumerate(settings):
            r = run_one(model, images, work / "runs", resolution=res, batch=args.batch, precision=precision,
                        ckpt=ckpt, steps=args.steps, validate=i == 0)
            row = (family, args.size, res, args.batch, precision, "yes" if ckpt else "no", r)
            rows.append(row)
            print(f"  {precision:>4} ckpt={ckpt!s:5} {r['step_s'] * 1000:8.1f} ms/step {r['img_s']:6.2f} img/s "
                  f"peak {r['peak_gib']:.2f} GiB finite={r['finite']} val={r['val_s']}", flush=True)
    table = [
        f"### Textual inversion, {args.size} models: {machine()} ({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/ti_speed.py --size {args.size} --families {args.families} --batch {args.batch} "
        f"--steps {args.steps}`; median step time after 5 warm-up steps; peak = torch.cuda.max_memory_allocated.",
        "",
        "| family | model | resolution | batch | precision | grad. checkpointing | ms/step | images/s | peak GPU memory | loss finite | validation (2 prompts x 2 seeds, 25 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for family, size, res, batch, precision, ckpt, r in rows:
        peak = f"{r['peak_gib']:.1f} GiB" if np.isfinite(r["peak_gib"]) else "n/a (CPU)"
        val = f"{r['val_s']:.1f} s" if r["val_s"] else ""
        table.append(
            f"| {family} | {size} | {res} | {batch} | {precision} | {ckpt} | {r['step_s'] * 1000:.1f} | "
            f"{r['img_s']:.2f} | {peak} | {'yes' if r['finite'] else 'NO'} | {val} |"
        )
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if args.write:
        with args.write.open("a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
