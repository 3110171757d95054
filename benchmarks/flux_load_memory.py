"""Peak RAM of a FLUX.1 LoRA run with text encoded ahead: T5 freed before the transformer's weights are read
(issue 23), against both held together as before.

What is measured: a scaled-down FLUX.1-dev diffusers folder at the real widths (transformer: 3072 wide, 24 heads
of 128, T5 width 4096 in, `--double`/`--single` blocks of the reference's 19/38; T5 v1.1 XXL: 4096 wide, 64 heads
of 64, d_ff 10240, `--t5-layers` of 24, the toy tokenizer's vocabulary) and the tiny CLIP-L and VAE, random bf16
weights. Each part is built and saved alone (the folder is never whole in RAM here). A FLUX.1 LoRA,
`data.cache_text_encoder_outputs: true`, `advanced.cpu: true`, bf16, in a fresh `conjure train` process with
HF_HUB_OFFLINE=1; encoding ahead, which a run does on a CUDA GPU only, is forced on the CPU (as
tests/train/test_caches.py does). "held together" is the same run with the text encoders kept and the
transformer read at load, what conjure did before. Peak RSS: ru_maxrss as the run's start and end events say it,
one step at 64 px (the weights are memory-mapped, so the transformer's pages count from the first step).

    python benchmarks/flux_load_memory.py --write docs/benchmarks.md

Full size, the two phases are T5-XXL + CLIP-L + VAE (10.1 GB: 9.5 + 0.25 in bf16, the VAE's 0.34 in float32) and
the transformer + VAE (24.2 GB); held together they were 33.9 GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from bench_common import machine, publish  # benchmarks/bench_common.py (this script's folder)
from versus_diffusers import make_images

GIB = 2**30
# Run in the `conjure train` process: encode ahead on the CPU; "held": also keep the encoders and read the
# transformer at load (what a run did before the encoders were freed and the transformer deferred).
PATCH = """
import runpy, sys
import conjure.models.loading as loading, conjure.train.loop as loop
loop.offloads = lambda device: True
if sys.argv.pop(1) == "held":
    loop.free_encoders = lambda model, ahead: None
    load = loading.load_base_model
    loading.load_base_model = lambda *a, **k: load(*a, **{**k, "defer_denoiser": False})
runpy.run_module("conjure", run_name="__main__")
"""


def write_folder(folder: Path, double: int, single: int, t5_layers: int) -> dict[str, float]:
    """The scaled folder (module docstring); the transformer's and T5's sizes in bytes."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from conjure.models.tiny import write_tiny_model

    write_tiny_model("flux", folder)
    tiny = FluxTransformer2DModel.load_config(folder, subfolder="transformer")
    sizes = {}
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a float32 copy
    try:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=tiny["in_channels"], num_layers=double, num_single_layers=single,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=tiny["pooled_projection_dim"], guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        sizes["transformer"] = sum(p.numel() * 2 for p in transformer.parameters())
        transformer.save_pretrained(folder / "transformer")
        del transformer
        config = T5EncoderModel.config_class.from_pretrained(folder / "text_encoder_2")
        config.update({"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": t5_layers})
        t5 = T5EncoderModel(config)
        sizes["t5"] = sum(p.numel() * 2 for p in t5.parameters())
        t5.save_pretrained(folder / "text_encoder_2")
    finally:
        torch.set_default_dtype(torch.float32)
    return sizes


def peaks(mode: str, model: Path, work: Path, images: Path, timeout: float) -> dict[str, float]:
    """The run's peak RSS (bytes) at its start and end events (ru_maxrss, as the events say it) after one step."""
    out = work / "runs"
    raw = {
        "type": "lora",
        "basic": {"base_model": str(model), "output_dir": str(out), "run_name": mode, "max_train_steps": 1,
                  "seed": 0, "validate_every_n_steps": None},
        "data": {"source": str(images), "resolution": 64, "batch_size": 1, "cache_text_encoder_outputs": True},
        "lora": {"rank": 4},
        "validation": {"at_start": False, "prompts": []},
        "advanced": {"cpu": True, "mixed_precision": "bf16"},
    }
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PATCH, mode, "train", str(path)], env=env, timeout=timeout,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode:
        raise SystemExit(f"conjure train failed:\n{run.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / mode / "events.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    return {e["event"]: e["peak_ram_bytes"] for e in events if e["event"] in ("start", "end")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5 layers (T5-XXL: 24)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flux-load-memory-"))
    try:
        sizes = write_folder(work / "model", args.double, args.single, args.t5_layers)
        images = make_images(work / "images", count=2)["lora"]
        found = {mode: peaks(mode, work / "model", work, images, args.timeout) for mode in ("held", "freed")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish("\n".join([
        f"### FLUX.1 peak RAM, text encoded ahead, scaled down ({dt.date.today()}, {machine()})",
        "",
        f"`python benchmarks/flux_load_memory.py --double {args.double} --single {args.single} --t5-layers "
        f"{args.t5_layers}`: FLUX.1 LoRA at the real widths, transformer {sizes['transformer'] / GIB:.2f} GiB and "
        f"T5 {sizes['t5'] / GIB:.2f} GiB in bf16 (tiny CLIP-L and VAE), `advanced.cpu: true`, bf16, text encoded "
        "ahead (forced on the CPU), one step at 64 px; peak RSS (ru_maxrss) as the start and end events say it. "
        "The weights are memory-mapped: a part's pages count once read (T5's when it encodes, the transformer's "
        "at the first step), so the end's figure is the one to compare.", "",
        "| text encoders | peak RSS at start GiB | peak RSS after one step GiB |", "|---|---|---|",
        *(f"| {what} | {found[mode]['start'] / GIB:.2f} | {found[mode]['end'] / GIB:.2f} |" for mode, what in
          (("held", "kept, transformer read at load (before)"), ("freed", "freed, then the transformer read (now)"))),
    ]), args.write)


if __name__ == "__main__":
    main()
