"""Peak RAM of loading a full-size model: the peak resident memory of `conjure train` up to its start event.

What is measured (issue 23): a full-size single-file checkpoint in the original layout (the SD 1.5 / SDXL key
names and shapes that `conjure.export.single_file` writes, random fp16 weights, built here tensor by tensor and
streamed to disk, so writing it never holds the model), trained by textual inversion with `advanced.cpu: true`
and `mixed_precision: bf16`, in a fresh `conjure train` process with HF_HUB_OFFLINE=1 and an empty HF_HOME. The
figure is the process's VmHWM (/proc/PID/status: the peak resident set, file-backed pages included) read when the
run's events.jsonl gets its "start" line; the process is then ended. So this is loading only: activations come on
top and depend on the resolution. `--with-config` also sets basic.base_model_config to a folder of the shipped
configs with tokenizer files (what a version without shipped configs needs offline); `--folder` measures a
diffusers folder of the same model (fp16 weights, one file per part) in place of the single file, `--hub` the
same folder as the snapshot of a hub id (`conjure-bench/<family>`) in the run's Hugging Face cache.

    python benchmarks/load_memory.py --families sd1 --write docs/benchmarks.md
    python benchmarks/load_memory.py --families sdxl --work /tmp/bench-23   # 6.5 GiB file: >= 14 GiB free RAM

Linux only (/proc). The checkpoint files are deleted at the end unless --keep.
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
import time
from pathlib import Path

import torch
import yaml

from bench_common import machine, publish  # benchmarks/bench_common.py (this script's folder)
from versus_diffusers import make_images

GIB = 2**30
TARGETS = {"sd1": 3.5, "sdxl": 9.0}  # issue 23: peak GiB to the start event, bf16


def checkpoint_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """The original-layout key names and shapes of the full-size `family` (built on the meta device)."""
    from conjure import families
    from conjure.export.single_file import checkpoint_state_dict
    from conjure.models.reference import build_reference_components

    parts = build_reference_components(family, device="meta")
    names = ("unet", "vae", *(slot.encoder for slot in families.get(family).text_encoders))
    state = checkpoint_state_dict(family, {n: parts[n].state_dict() for n in names}, parts["unet"].config)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def write_checkpoint(family: str, path: Path, seed: int = 0) -> int:
    """A random-weight fp16 .safetensors of the full-size `family` in the original layout; returns its size."""
    return write_safetensors(checkpoint_shapes(family), path, seed)


def write_safetensors(shapes: dict[str, tuple[int, ...]], path: Path, seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> int:
    """Random tensors of `shapes` in `dtype` (fp16 or bf16), one at a time (the safetensors layout: an 8-byte header
    length, the JSON header, then each tensor's bytes); returns the file's size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    name_of = {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": name_of, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for shape in shapes.values():
            tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
            f.write(tensor.to(dtype).view(torch.int16).numpy().tobytes())
    return path.stat().st_size


def write_folder(family: str, folder: Path) -> int:
    """A random-weight fp16 diffusers folder of the full-size `family` (configs, tokenizers, one weights file per
    part); returns the weights' size in bytes."""
    from conjure.models.reference import build_reference_components

    parts = build_reference_components(family, device="meta")
    config_folder(family, folder)
    size = 0
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            file = "model.safetensors" if "text_encoder" in name else "diffusion_pytorch_model.safetensors"
            shapes = {k: tuple(v.shape) for k, v in part.state_dict().items()}
            size += write_safetensors(shapes, folder / name / file)
    return size


def config_folder(family: str, folder: Path) -> Path:
    """The shipped configs of `family` with tokenizer files: a base_model_config for versions without them."""
    from conjure import families
    from conjure.models.reference import build_reference_components, save_configs
    from conjure.models.tokenizer import write_clip_tokenizer

    save_configs(family, build_reference_components(family, device="meta"), folder)
    for slot in families.get(family).text_encoders:
        write_clip_tokenizer(folder / slot.tokenizer, slot.pad_token)
    return folder


def hub_snapshot(family: str, work: Path) -> Path:
    """The snapshot folder of the hub id `conjure-bench/<family>` in the run's Hugging Face cache (HF_HOME/hub),
    laid out as huggingface_hub lays it out: models--<org>--<name>/refs/main names the snapshot's commit."""
    repo, commit = work / "hf-home" / "hub" / f"models--conjure-bench--{family}", "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def peak_to_start(base_model: str, work: Path, images: Path, config: Path | None, timeout: float,
                  src: Path | None = None) -> float:
    """Peak RSS (bytes) of `conjure train` on `base_model` when its start event is written (`src`: the conjure
    source folder to run, e.g. an older version's from `git archive`)."""
    out = work / "runs"
    raw = {
        "type": "textual_inversion",
        "basic": {"base_model": base_model, "output_dir": str(out), "run_name": "bench", "max_train_steps": 1,
                  "seed": 0, "validate_every_n_steps": None,
                  **({"base_model_config": str(config)} if config else {})},
        "data": {"source": str(images), "resolution": 64, "batch_size": 1},
        "textual_inversion": {"placeholder_token": "<zwx>", "initializer": "dog"},
        "validation": {"at_start": False, "prompts": []},
        "advanced": {"cpu": True, "mixed_precision": "bf16"},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    hf_home = work / "hf-home"
    hf_home.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1",
           **({"PYTHONPATH": str(src)} if src else {})}
    proc = subprocess.Popen([sys.executable, "-m", "conjure", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events = out / "bench" / "events.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"conjure train ended before its start event:\n{proc.stderr.read()[-3000:]}")
            if events.is_file() and '"start"' in events.read_text():
                status = Path(f"/proc/{proc.pid}/status").read_text()
                return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
            time.sleep(0.05)
        raise SystemExit(f"no start event within {timeout:.0f} s")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd1", help="comma-separated: sd1, sdxl")
    parser.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--with-config", action="store_true", help="set basic.base_model_config too")
    parser.add_argument("--folder", action="store_true", help="a diffusers folder in place of a single file")
    parser.add_argument("--hub", action="store_true", help="that folder as a hub id's snapshot in the HF cache")
    parser.add_argument("--conjure-src", type=Path, default=None, help="the conjure src folder to measure")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="load-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "images", ignore_errors=True)
    images = make_images(work / "images", count=2)["ti"]
    rows = []
    for family in args.families.split(","):
        folder = args.folder or args.hub
        checkpoint = hub_snapshot(family, work) if args.hub else work / (
            f"{family}-folder" if args.folder else f"{family}.safetensors")
        try:
            if folder:
                shutil.rmtree(checkpoint, ignore_errors=True)
                size = write_folder(family, checkpoint)
            else:  # a file kept by an earlier --keep run is reused
                size = checkpoint.stat().st_size if checkpoint.is_file() else write_checkpoint(family, checkpoint)
            config = config_folder(family, work / f"{family}-config") if args.with_config else None
            peak = peak_to_start(f"conjure-bench/{family}" if args.hub else str(checkpoint), work, images, config, args.timeout, args.conjure_src)
        finally:
            if not args.keep and folder:
                shutil.rmtree(checkpoint, ignore_errors=True)
            elif not args.keep:
                checkpoint.unlink(missing_ok=True)
        target = TARGETS.get(family)
        rows.append(f"| {family} | {size / GIB:.2f} | {peak / GIB:.2f} | {target if target else '-'} |")
        print(rows[-1], flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    publish("\n".join([
        f"### Peak RAM to the start event, full-size single files ({dt.date.today()}, {machine()})", "",
        f"`python benchmarks/load_memory.py --families {args.families}"
        f"{' --with-config' if args.with_config else ''}{' --folder' if args.folder else ''}{' --hub' if args.hub else ''}`: textual inversion, `advanced.cpu: true`, bf16, "
        "random fp16 weights in the original layout, HF_HUB_OFFLINE=1 with an empty HF_HOME; peak RSS = VmHWM "
        "when events.jsonl gets its start line.", "",
        "| family | file GiB | peak RSS GiB | target GiB |", "|---|---|---|---|", *rows,
    ]), args.write)


if __name__ == "__main__":
    main()
