"""How close `conjure estimate` comes to what a run really takes: for each method x family, a real `conjure train`
on the tiny model (or `--model`) in a fresh process, its peak RSS (`ru_maxrss`) and, with `--gpu`, its
`torch.cuda.max_memory_allocated`, both read in the run's own process at exit, against `conjure estimate --json`
of the same config.

    python benchmarks/estimate_accuracy.py                               # CPU: RAM, every method x family
    python benchmarks/estimate_accuracy.py --write docs/benchmarks.md    # append the table
    python benchmarks/estimate_accuracy.py --only lora:sd1 --resolution 512 --batch 1   # one cell
    python benchmarks/estimate_accuracy.py --gpu --model FOLDER --only lora:sd1 --resolution 512  # on a GPU

The tiny models are a few MB, so on the CPU the figure checks the process baseline and what the estimate adds on
top (weights, training state, activations, caches), not full-size weights; the GPU check (scripts/
gpu_estimate_check.sh) compares the accelerator figure on full-size layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, publish  # noqa: E402

METHODS = ("textual_inversion", "lora", "dora", "pivotal", "finetune", "finetune-ema")
FAMILIES = ("sd1", "sd2", "sdxl", "flux")
# methods that train FLUX.1 (conjure.config.*.FAMILIES)
FLUX_METHODS = ("lora", "dora")


def write_images(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zwx photo {i}")
    return folder


def config_for(method: str, model: Path, images: Path, out: Path, *, resolution: int, batch: int,
               steps: int, gpu: bool = False, checkpointing: bool = False) -> dict:
    kind = {"dora": "lora", "finetune-ema": "finetune"}.get(method, method)
    config: dict = {
        "type": kind,
        "basic": {"base_model": str(model), "output_dir": str(out), "run_name": method, "max_train_steps": steps,
                  "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(images), "resolution": resolution, "batch_size": batch},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        "advanced": {"cpu": not gpu, "gradient_checkpointing": checkpointing},
    }
    if kind in ("lora", "pivotal"):
        config["lora"] = {"rank": 4, "dora": method == "dora"}
    if kind == "lora":
        config["lora"]["trigger_word"] = "zwx"
    if kind == "finetune":  # finetune-ema: with finetune.ema, its float32 copy of the trained weights
        config["finetune"] = {"ema": {"enabled": method == "finetune-ema"}}
    if kind in ("textual_inversion", "pivotal"):
        config["textual_inversion"] = {"placeholder_token": "<zq-thing>", "initializer": "dog"}
        config["data"]["caption_prefix"] = "<zq-thing>"
    return config


# `conjure train` in this process, then its peak accelerator memory (0 without CUDA) and peak RSS (KiB on Linux)
RUN = ("import atexit, resource, sys, torch\n"
       "def report():\n"
       "    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
       "    print('PEAKS', cuda, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)\n"
       "atexit.register(report)\n"
       "from conjure.cli import main\n"
       "main(['train', sys.argv[1]])\n")


def measure(config_path: Path) -> tuple[int, int]:
    """(peak accelerator bytes, peak RSS bytes) of `conjure train CONFIG` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", RUN, str(config_path)], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    line = next(line for line in out.splitlines() if line.startswith("PEAKS"))
    cuda, rss = (int(x) for x in line.split()[1:])
    return cuda, rss


def estimated(config_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "conjure", "estimate", str(config_path), "--json"], check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True).stdout
    return json.loads(out)


def cell(method: str, family: str, work: Path, args: argparse.Namespace) -> str:
    from conjure.models.tiny import write_tiny_model

    model = Path(args.model) if args.model else work / f"tiny-{family}"
    if not model.exists():
        write_tiny_model(family, model)
    images = write_images(work / "images")
    config = config_for(method, model, images, work / "runs", resolution=args.resolution, batch=args.batch,
                        steps=args.steps, gpu=args.gpu, checkpointing=args.gradient_checkpointing)
    path = work / f"{method}-{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    est = estimated(path)
    cuda, rss = measure(path)
    row = (f"| {method} | {family} | {rss / 2**20:.0f} | {est['peak_ram_bytes'] / 2**20:.0f} | "
           f"{(est['peak_ram_bytes'] - rss) / rss:+.1%} |")
    if args.gpu:
        guess = est["peak_accelerator_bytes"]
        row += f" {cuda / 2**20:.0f} | {guess / 2**20:.0f} | {(guess - cuda) / cuda:+.1%} |"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="METHOD:FAMILY")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--gpu", action="store_true", help="train on the CUDA GPU and compare its peak too")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--model", default=None, help="a model folder instead of the tiny model of each family")
    args = parser.parse_args()
    cells = [tuple(c.split(":")) for c in args.only] or [
        (m, f) for f in FAMILIES for m in METHODS if f != "flux" or m in FLUX_METHODS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, family in cells:
            rows.append(cell(method, family, Path(tmp), args))
            print(rows[-1], flush=True)
    gpu_head = " peak allocated MiB | estimate MiB | error |" if args.gpu else ""
    publish("\n".join([
        f"### `conjure estimate` against real runs ({machine()})", "",
        f"{args.model or 'Tiny models'}, {'GPU' if args.gpu else 'CPU'}, {args.resolution} px, batch {args.batch}, "
        f"{args.steps} steps{', gradient checkpointing' if args.gradient_checkpointing else ''} "
        "(`benchmarks/estimate_accuracy.py`).", "",
        "| method | family | peak RSS MiB | estimate MiB | error |" + gpu_head,
        "|---|---|---|---|---|" + ("---|---|---|" if args.gpu else ""), *rows, ""]), args.write)


if __name__ == "__main__":
    main()
