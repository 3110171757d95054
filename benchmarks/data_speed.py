"""Data-layer speed: images/s through conjure's loader, and the speed-up from the latent cache.

1. Loader: a folder of photo-sized JPEGs (random content, a mix of portrait/landscape/square sizes) through
   `TrainDataset` + the training DataLoader's collate, as training reads it: first epoch (decode + resize +
   crop) and second epoch (with `keep_in_memory`, the resized copy), square crops and aspect-ratio buckets,
   with 0 and 2 loader workers.
2. Latent cache: LoRA training steps through the real `train()` on a model folder (the tiny test model by
   default) with `data.cache_latents` off and `memory` (and `cache_text_encoder_outputs`); median step time
   after warm-up, from the run's own events.

Prints markdown tables and, with --write, appends them to docs/benchmarks.md with the machine that made them.
Not a test: the figures depend on the machine.

    python benchmarks/data_speed.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_common import machine, median_step_seconds, publish  # benchmarks/bench_common.py (this script's folder)

MODELS = {"tiny": "tiny sd1 test model", "toy": "toy sd1 model (a trained 8x VAE of 1.0 M parameters, UNet 1.5 M)"}
SIZES = [(3024, 4032), (4032, 3024), (2048, 2048), (1080, 1920), (1920, 1080), (1600, 1200)]  # (height, width)


def make_photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        # smooth random content compresses like a photo (pure noise would make huge, slow JPEGs)
        small = rng.integers(0, 255, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.jpg", quality=90)
        (folder / f"{i:03d}.txt").write_text("zwx a photo")
    return folder


def loader_images_per_second(folder: Path, *, resolution: int, buckets: bool, workers: int, epoch: int) -> float:
    from conjure.data.buckets import make_buckets
    from conjure.data.captions import CaptionTransform
    from conjure.data.dataset import TrainDataset, collate, epoch_batches
    from conjure.data.sources import scan_source

    examples = scan_source(folder, check_images=False).examples
    dataset = TrainDataset(examples, resolution=resolution, center_crop=True, random_flip=True, keep_in_memory=True,
                           caption_transform=CaptionTransform(), seed=0,
                           buckets=make_buckets(resolution) if buckets else None)
    batches = [[(e, i) for i in b] for e in range(epoch + 1) for b in epoch_batches(dataset.sizes, 4, 0, e)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0)
    per_epoch = len(batches) // (epoch + 1)
    times, count = [], 0
    started = time.perf_counter()
    for n, batch in enumerate(loader):
        if n == per_epoch * epoch:
            started, count = time.perf_counter(), 0  # time only the last epoch
        count += len(batch["index"])
        times.append(time.perf_counter())
    return count / (time.perf_counter() - started)


def step_time(model: Path, images: Path, out: Path, *, resolution: int, cache: str, steps: int) -> tuple[float, float]:
    from conjure.config import parse_config
    from conjure.train.loop import train

    raw = {
        "type": "lora",
        "basic": {"base_model": str(model), "output_dir": str(out), "max_train_steps": steps,
                  "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(images), "resolution": resolution, "batch_size": 4, "random_flip": True,
                 "cache_latents": cache, "cache_text_encoder_outputs": cache != "off"},
        "lora": {"trigger_word": "zwx", "rank": 4},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
    }
    started = time.perf_counter()
    result = train(parse_config(raw))
    wall = time.perf_counter() - started
    # after two epochs every (image, flip) pair has been seen: the steady state of a cached run
    return median_step_seconds(result.run_dir, warm_up=10), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (the sd1 test model), 'toy' (the toy sd1 model: a real 8x VAE) or a diffusers "
                        "SD 1.x folder")
    parser.add_argument("--train-resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # 2 threads are erratic on the 2-core CI machines (docs/architecture.md)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="conjure-data-bench-"))
    photos = make_photos(work / "photos", args.images)
    loader_images_per_second(photos, resolution=args.resolution, buckets=False, workers=0, epoch=0)  # warm-up
    rows = []
    for buckets in (False, True):
        for workers in (0, 2):
            first = loader_images_per_second(photos, resolution=args.resolution, buckets=buckets, workers=workers,
                                             epoch=0)
            second = loader_images_per_second(photos, resolution=args.resolution, buckets=buckets,
                                              workers=workers, epoch=1)
            rows.append((buckets, workers, first, second))
            print(f"buckets={buckets!s:5} workers={workers}: epoch 1 {first:6.1f} img/s, epoch 2 {second:7.1f} img/s",
                  flush=True)
    if args.model == "tiny":
        from conjure.models.tiny import write_tiny_model

        model = write_tiny_model("sd1", work / "tiny-sd1")
    elif args.model == "toy":
        from conjure.toy.models import toy_model

        model = toy_model("sd1")
    else:
        model = Path(args.model)
    small = make_photos(work / "small", 8)
    cache_rows = []
    for cache in ("off", "memory"):
        step_s, wall = step_time(model, small, work / "runs", resolution=args.train_resolution, cache=cache,
                                 steps=args.steps)
        cache_rows.append((cache, step_s, wall))
        print(f"cache_latents={cache}: {step_s * 1000:.1f} ms/step ({wall:.1f} s run)", flush=True)
    today = dt.date.today().isoformat()
    text = "\n".join([
        f"### Data loader: {machine()} ({today})",
        "",
        f"`python benchmarks/data_speed.py --images {args.images} --resolution {args.resolution}`: "
        f"{args.images} JPEGs of 2-12 megapixels (portrait, landscape, square), batch 4, center crop + random flip, "
        "`keep_in_memory`; epoch 1 decodes and resizes, epoch 2 reads the resized copy (with loader workers, each "
        "worker keeps its own copy of the images it has seen, so epoch 2 decodes again whatever lands elsewhere).",
        "",
        "| crop | loader workers | epoch 1 images/s | epoch 2 images/s |",
        "|---|---|---|---|",
        *[f"| {'aspect-ratio buckets' if b else 'square'} | {w} | {f:.1f} | {s:.1f} |" for b, w, f, s in rows],
        "",
        f"### Latent cache: {machine()} ({today})",
        "",
        f"LoRA (rank 4) on the {MODELS.get(args.model, args.model)} at "
        f"{args.train_resolution} px, batch 4, {args.steps} steps, 8 images with random flip; median step time after "
        "warm-up (a cached run's steady state: every image and flip already encoded).",
        "",
        "| data.cache_latents (+ text-encoder outputs) | ms/step | speed-up |",
        "|---|---|---|",
        *[f"| {c} | {s * 1000:.1f} | {cache_rows[0][1] / s:.2f}x |" for c, s, _ in cache_rows],
    ]) + "\n"
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main())
