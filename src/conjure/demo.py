"""`conjure demo`: a complete run on the CPU in about a minute, to see what conjure does.

It builds a tiny model (or uses `--model`), trains the bundled example (12 images of a yellow star, made
by scripts/make_demo_images.py) with the same `train()` as any config, and prints where everything is.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from conjure.errors import ConjureError

DEMO_METHODS = {"ti": "sd_textual_inversion"}


def demo_images() -> Path:
    return Path(str(resources.files("conjure") / "assets" / "demo" / "ti"))


def demo_config(model: str, out: Path, *, config_type: str, steps: int, resolution: int | None) -> dict:
    return {
        "type": config_type,
        "basic": {
            "base_model": model,
            "output_dir": str(out / "runs"),
            "run_name": "demo",
            "seed": 0,
            "max_train_steps": steps,
            "save_every_n_steps": max(steps // 4, 1),
            "validate_every_n_steps": max(steps // 4, 1),
        },
        "data": {"source": str(demo_images()), "resolution": resolution, "batch_size": 4, "random_flip": True},
        "textual_inversion": {"placeholder_token": "<yellow-star>", "initializer": "star", "num_vectors": 2},
        "validation": {"seeds": [0, 1, 2], "num_inference_steps": 10, "guidance_scale": 4.0},
        "optimizer": {"learning_rate": 2e-2, "scheduler": "cosine", "warmup_steps": 10},
        "advanced": {"max_grad_norm": None},
    }


def run_demo(*, method: str, family: str, model: str | None, out: Path, steps: int | None) -> int:
    from conjure.config import parse_config
    from conjure.train.loop import train

    if method not in DEMO_METHODS:
        raise ConjureError(f"demo --method {method!r} is not available yet (available: {', '.join(DEMO_METHODS)})")
    started = time.perf_counter()
    resolution = None
    if model is None:
        from conjure.models.tiny import write_tiny_model

        if family not in ("sd1", "sd2"):
            raise ConjureError(f"demo --family {family!r} is not available for textual inversion yet (sd1, sd2)")
        model_dir = out / f"tiny-{family}"
        if not (model_dir / "model_index.json").is_file():
            print(f"building a tiny {family} model in {model_dir}")
            write_tiny_model(family, model_dir)
        model, resolution = str(model_dir), 64
        import torch

        if not torch.cuda.is_available():
            # Tiny models gain nothing from threads, and two threads made tiny runs erratic (0.25-55 s for
            # the same 20 steps) on 2-core machines; one thread is steady.
            torch.set_num_threads(1)
    config = parse_config(
        demo_config(model, out, config_type=DEMO_METHODS[method], steps=steps or 200, resolution=resolution),
        source="demo config",
    )
    run_root = Path(config.basic.output_dir) / config.basic.run_name
    if run_root.exists():
        import shutil

        shutil.rmtree(run_root)  # the demo's own folder: a re-run starts fresh
    result = train(config)
    seconds = time.perf_counter() - started
    print(f"\ndemo finished in {seconds:.0f} s ({result.step} steps)")
    print(f"  run folder:      {result.run_dir}")
    files = [p for p in sorted(result.checkpoints[-1].iterdir()) if p.suffix == ".safetensors"]
    print(f"  embedding:       {files[0] if files else result.checkpoints[-1]}")
    print(f"  validation grid: {result.validations[-1]}  (rows: prompts, columns: seeds)")
    print(f"  TensorBoard:     tensorboard --logdir {result.run_dir / 'logs'}")
    print(f"  config to edit:  {result.run_dir / 'config.yaml'}  (conjure train {result.run_dir / 'config.yaml'})")
    if resolution == 64:
        print("  note: the tiny model has random weights, so its images are noise: the demo shows the workflow "
              "(files, grids, logs, resume, export); use --model with a real model to see a concept appear")
    return 0
