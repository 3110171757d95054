"""CUDA checks of the textual-inversion path on tiny models (run on a GPU machine; see docs/benchmarks.md).

For each family and precision: train, check the loss stays finite, load the embedding with diffusers on
the GPU and check the token is recognised and changes the image; then stop-and-resume against an
uninterrupted run (exact equality is required on CPU only; here the largest difference is reported).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conjure.config import parse_config
from conjure.export.embeddings import load_embedding
from conjure.models.tiny import write_tiny_model
from conjure.train.control import TrainControl
from conjure.train.loop import train


def config(model: Path, images: Path, out: Path, name: str, precision: str, steps: int = 20) -> dict:
    return {
        "type": "textual_inversion",
        "basic": {"base_model": str(model), "output_dir": str(out), "run_name": name, "max_train_steps": steps,
                  "save_every_n_steps": 100, "validate_every_n_steps": None, "seed": 1},
        "data": {"source": str(images), "resolution": 64, "batch_size": 2, "random_flip": True},
        "textual_inversion": {"placeholder_token": "<gpu-thing>", "initializer": "dog", "num_vectors": 2},
        "validation": {"at_start": False, "num_inference_steps": 4},
        "optimizer": {"learning_rate": 0.05, "scheduler": "cosine", "warmup_steps": 2},
        "advanced": {"mixed_precision": precision},
    }


def main() -> None:
    from diffusers import StableDiffusionPipeline

    assert torch.cuda.is_available(), "needs a GPU"
    work = Path(tempfile.mkdtemp())
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    for family in ("sd1", "sd2"):
        model = write_tiny_model(family, work / family)
        for precision in ("bf16", "fp16", "no"):
            result = train(parse_config(config(model, images, work / "runs", f"{family}-{precision}", precision)))
            path = result.checkpoints[-1] / "gpu-thing.safetensors"
            rows = load_embedding(path)[0]["emb_params"]
            pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None).to("cuda")
            pipe.set_progress_bar_config(disable=True)
            g = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
            before = pipe("a <gpu-thing>", num_inference_steps=4, generator=g(), output_type="np").images[0]
            pipe.load_textual_inversion(str(path), token="<gpu-thing>")
            after = pipe("a <gpu-thing>", num_inference_steps=4, generator=g(), output_type="np").images[0]
            print(f"{family} {precision}: rows {tuple(rows.shape)} finite={bool(torch.isfinite(rows).all())} "
                  f"image change {float(np.abs(after - before).mean()):.4f} "
                  f"token id {pipe.tokenizer.convert_tokens_to_ids('<gpu-thing>')}", flush=True)
        full = train(parse_config(config(model, images, work / "runs", f"{family}-full", "bf16", 10)))
        control = TrainControl()
        control.on_step = lambda step, loss: control.request_stop("check") if step == 4 else None
        raw = config(model, images, work / "runs", f"{family}-resumed", "bf16", 10)
        stopped = train(parse_config(raw), control=control)
        resumed = train(parse_config(raw), resume=str(stopped.run_dir))
        a = load_embedding(full.checkpoints[-1] / "gpu-thing.safetensors")[0]["emb_params"]
        b = load_embedding(resumed.checkpoints[-1] / "gpu-thing.safetensors")[0]["emb_params"]
        print(f"{family} resume on CUDA (bf16): stopped at {stopped.step}, resumed to {resumed.step}, "
              f"max |difference| vs uninterrupted {float((a - b).abs().max()):.3e}", flush=True)


if __name__ == "__main__":
    main()
