"""Peak RAM of a FLUX.1 LoRA run with text encoded ahead (issue 23): T5 freed before the transformer's weights are
read, against both held together as before; and full-size FLUX.1-dev to the start event, each phase's peak.

What is measured: FLUX.1-dev at the real widths (transformer: 3072 wide, 24 heads of 128, T5 width 4096 in,
`--double`/`--single` blocks of the reference's 19/38; T5 v1.1 XXL: 4096 wide, 64 heads of 64, d_ff 10240,
`--t5-layers` of 24), random bf16 weights, as a diffusers folder (`--layout folder`, the tiny CLIP-L and VAE, the
toy T5 vocabulary) or as users have the full model (`--layout file`: BFL's transformer file, `double_blocks.N...`
names, and a `basic.base_model_config` folder of full-size CLIP-L, T5-XXL, the 16-channel VAE, the configs and
tokenizers), written tensor by tensor (never a part in RAM). A FLUX.1 LoRA, `data.cache_text_encoder_outputs:
true`, `advanced.cpu: true`, bf16, `advanced.base_weights_dtype` from `--base-weights`, in a fresh `conjure
train` process with HF_HUB_OFFLINE=1; encoding ahead, which a run does on a CUDA GPU only, is forced on the CPU
(as tests/train/test_caches.py does). "held together" is the same run with the text encoders kept and the
transformer read at load, what conjure did before. Peak RSS: the process's VmHWM over each phase (reset between
phases), one step at 64 px, or (`--size full`: a CPU step of the 12B transformer takes many minutes) up to the
start event. A run is killed past `--cap-gib` resident (default 18) or when the machine has under 1 GiB left, and
a full-size one starts only with >= 19 GiB available: the RAM is shared.

    python benchmarks/flux_load_memory.py --write docs/benchmarks.md
    python benchmarks/flux_load_memory.py --size full --cache /work/bench-cache/flux-full --base-weights float8,auto

`--size full` writes 33.7 GB of files (transformer 23.8, T5-XXL 9.5, CLIP-L 0.25, VAE 0.17) once, ~5 minutes,
into `--cache` and reuses them. Full size, the two phases are T5-XXL + CLIP-L + VAE (10.1 GB in bf16, the VAE in
float32) and the transformer + VAE (24.2 GB in bf16); held together they were 33.9 GB.
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

from typing import Any

import torch
import yaml

from bench_common import machine, publish  # benchmarks/bench_common.py (this script's folder)
from versus_diffusers import make_images

GIB = 2**30
FULL = {"double": 19, "single": 38, "t5_layers": 24}  # FLUX.1-dev's blocks, T5-XXL's layers
CAP = 18 * GIB  # a full-size run is killed here (VmRSS): the machine's RAM is shared
# Run in the `conjure train` process: encode ahead on the CPU; "held": also keep the encoders and read the
# transformer at load (what a run did before the encoders were freed and the transformer deferred). Each phase's
# peak (VmHWM, then reset through /proc/self/clear_refs, Linux >= 4.0) and the resident set after it go to the
# file BENCH_PHASES names; BENCH_STOP: end the process at the start event (a full-size step takes many minutes).
PATCH = """
import json, os, runpy, sys, time
import conjure.models.loading as loading, conjure.train.loop as loop

def mark(phase):
    kb = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
    open("/proc/self/clear_refs", "w").write("5")
    with open(os.environ["BENCH_PHASES"], "a") as f:
        f.write(json.dumps({"phase": phase, "peak": kb["VmHWM"], "after": kb["VmRSS"], "time": time.time()}) + "\\n")

def after(phase, fn, stop=False):
    def marked(*a, **k):
        out = fn(*a, **k)
        mark(phase)
        if stop and os.environ.get("BENCH_STOP"):
            os._exit(0)
        return out
    return marked

loop.offloads = lambda device: True
if sys.argv.pop(1) == "held":
    loop.free_encoders = lambda model, ahead: None
    load = loading.load_base_model
    loading.load_base_model = lambda *a, **k: load(*a, **{**k, "defer_denoiser": False})
loop.load_model = after("configs read, text encoders loaded", loop.load_model)
loop.encode_ahead = after("captions encoded ahead", loop.encode_ahead)
loop.free_encoders = after("text encoders freed", loop.free_encoders)
loading.LoadedModel.load_pending = after("transformer read", loading.LoadedModel.load_pending)
loop.place_model = after("model placed", loop.place_model)
loop.TrainingSession.start = after("start event", loop.TrainingSession.start, stop=True)
loop.TrainingSession.run = after("one step", loop.TrainingSession.run)
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


def bfl_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of BFL's own file (flux1-dev.safetensors) for a FluxTransformer2DModel config, as
    black-forest-labs/flux's src/flux/model.py (Flux) and modules/layers.py (MLPEmbedder, DoubleStreamBlock,
    SingleStreamBlock, LastLayer; main, read 2026-12) name them: every Linear with a bias, q/k/v fused (single
    blocks: with the MLP's input), RMSNorm scales per head."""
    h, head = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    mlp, out = 4 * h, {}

    def linear(name: str, rows: int, cols: int) -> None:
        out.update({f"{name}.weight": (rows, cols), f"{name}.bias": (rows,)})

    def norms(prefix: str) -> None:
        out.update({f"{prefix}.query_norm.scale": (head,), f"{prefix}.key_norm.scale": (head,)})

    linear("img_in", h, config["in_channels"])
    linear("txt_in", h, config["joint_attention_dim"])
    embedders = {"time_in": 256, "vector_in": config["pooled_projection_dim"],
                 **({"guidance_in": 256} if config["guidance_embeds"] else {})}
    for name, width in embedders.items():
        linear(f"{name}.in_layer", h, width)
        linear(f"{name}.out_layer", h, h)
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            norms(f"{p}_attn.norm")
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", mlp, h)
            linear(f"{p}_mlp.2", h, mlp)
    for i in range(config["num_single_layers"]):
        linear(f"single_blocks.{i}.linear1", 3 * h + mlp, h)
        linear(f"single_blocks.{i}.linear2", h, h + mlp)
        norms(f"single_blocks.{i}.norm")
        linear(f"single_blocks.{i}.modulation.lin", 3 * h, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    linear("final_layer.linear", config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"]), h)
    return dict(sorted(out.items()))  # safetensors writes its tensors in name order


def check_bfl_shapes(config: dict[str, Any]) -> None:
    """diffusers' own converter (loaders/single_file_utils.py convert_flux_transformer_checkpoint_to_diffusers,
    diffusers 0.42.1: what `from_single_file` runs) turns `bfl_shapes(config)` into exactly the state dict of
    FluxTransformer2DModel(config), names and shapes (on the meta device: nothing is allocated; the converter
    assumes FLUX.1's width, 3072)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = {k: torch.empty(shape, device="meta") for k, shape in bfl_shapes(config).items()}
    converted = {k: tuple(v.shape) for k, v in convert_flux_transformer_checkpoint_to_diffusers(bfl).items()}
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if converted != expected:
        wrong = sorted(set(converted.items()) ^ set(expected.items()))[:5]
        raise SystemExit(f"the BFL layout does not convert to FluxTransformer2DModel's: {wrong}")


def meta_parts(double: int, single: int, t5_layers: int) -> dict[str, Any]:
    """FLUX.1-dev's parts on the meta device (models/reference.py) with `double`/`single` blocks, `t5_layers`."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from conjure.models.reference import build_reference_components

    parts = build_reference_components("flux", device="meta")
    t5_config = parts["text_encoder_2"].config
    t5_config.num_layers = t5_layers
    with torch.device("meta"):
        parts["transformer"] = FluxTransformer2DModel.from_config(
            {**parts["transformer"].config, "num_layers": double, "num_single_layers": single})
        parts["text_encoder_2"] = T5EncoderModel(t5_config)
    return parts


def stored_shapes(model: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The names and shapes a saved `model` has: its state dict less tied copies (T5's encoder.embed_tokens is
    `shared`), each name after `prefix` (a CLIP text encoder's `text_model.`, as real folders have it)."""
    params = dict(model.named_parameters())  # one name per tied parameter
    kept = {k: v for k, v in model.state_dict().items() if k in params or k in dict(model.named_buffers())}
    return {k if k.startswith(prefix) else prefix + k: tuple(v.shape) for k, v in kept.items()}


def write_full(cache: Path, double: int, single: int, t5_layers: int) -> dict[str, float]:
    """FLUX.1-dev as users have it, random bf16 weights written tensor by tensor (never a part in RAM): the
    transformer as BFL's single file (`flux1-dev.safetensors`) and a `basic.base_model_config` folder (`config/`:
    configs, the VAE, CLIP-L, T5-XXL in one file, the tokenizers: the real CLIP one, the toy T5 one as
    models/reference.py gives it, T5's SentencePiece model not being shipped). Kept in `cache` and reused (23.8 +
    9.5 + 0.25 + 0.17 GB = 33.7 GB); returns the transformer's and T5's sizes in bytes."""
    from conjure import families
    from conjure.models.reference import save_configs
    from conjure.models.tokenizer import write_clip_tokenizer
    from load_memory import write_safetensors

    parts = meta_parts(double, single, t5_layers)
    config = dict(parts["transformer"].config)
    check_bfl_shapes(config)
    folder = cache / "config"
    save_configs("flux", parts, folder)
    write_clip_tokenizer(folder / "tokenizer", families.get("flux").text_encoders[0].pad_token)
    parts["tokenizer_2"].save_pretrained(folder / "tokenizer_2")
    files = {cache / "flux1-dev.safetensors": bfl_shapes(config),
             folder / "vae" / "diffusion_pytorch_model.safetensors": stored_shapes(parts["vae"]),
             folder / "text_encoder" / "model.safetensors": stored_shapes(parts["text_encoder"], "text_model."),
             folder / "text_encoder_2" / "model.safetensors": stored_shapes(parts["text_encoder_2"])}
    for path, shapes in files.items():
        if not path.is_file():  # written whole under another name first: an interrupted write is not reused
            partial = path.with_name(path.name + ".partial")
            write_safetensors(shapes, partial, dtype=torch.bfloat16)
            partial.replace(path)
    size = {path.parent.name: path.stat().st_size for path in files}
    return {"transformer": size[cache.name], "t5": size["text_encoder_2"]}


def run(mode: str, base: dict[str, str], work: Path, images: Path, *, base_weights: str, to_start: bool,
        cap: int, timeout: float) -> dict[str, Any]:
    """One `conjure train` of a FLUX.1 LoRA (module doc), one step or (`to_start`) up to its start event, watched:
    killed once its resident set passes `cap` bytes or the machine's available memory falls under 1 GiB. Returns
    its phases (PATCH), their peak (bytes), and why it did not finish ("killed ...", the error's last line)."""
    out, name = work / "runs", f"{mode}-{base_weights}"
    raw = {
        "type": "lora",
        "basic": {**base, "output_dir": str(out), "run_name": name, "max_train_steps": 1, "seed": 0,
                  "validate_every_n_steps": None},
        "data": {"source": str(images), "resolution": 64, "batch_size": 1, "cache_text_encoder_outputs": True},
        "lora": {"rank": 4},
        "validation": {"at_start": False, "prompts": []},
        "advanced": {"cpu": True, "mixed_precision": "bf16", "base_weights_dtype": base_weights},
    }
    config, phases, log = work / f"{name}.yaml", work / f"{name}.phases", work / f"{name}.log"
    config.write_text(yaml.safe_dump(raw))
    phases.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "BENCH_PHASES": str(phases), **({"BENCH_STOP": "1"} if to_start else {})}
    began = time.time()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PATCH, mode, "train", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        stopped = watch(proc, cap, timeout)
    shutil.rmtree(out, ignore_errors=True)
    found = [json.loads(line) for line in phases.read_text().splitlines()] if phases.is_file() else []
    failed = stopped or (log.read_text().strip().splitlines() or ["no output"])[-1] if proc.returncode else None
    return {"phases": found, "peak": max((p["peak"] for p in found), default=0), "failed": failed, "began": began,
            "ended": time.time()}


def watch(proc: subprocess.Popen[bytes], cap: int, timeout: float) -> str | None:
    """Wait for `proc`, killing it past `cap` bytes resident, under 1 GiB available on the machine, or after
    `timeout` seconds; why it was killed, or None."""
    deadline, why = time.monotonic() + timeout, None
    while proc.poll() is None:
        try:
            rss = int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS")).split()[1]) * 1024
        except (OSError, StopIteration):  # ending
            rss = 0
        if rss > cap:
            why = f"killed at {rss / GIB:.1f} GiB resident (cap {cap / GIB:.0f} GiB)"
        elif available() < GIB:
            why = f"killed at {rss / GIB:.1f} GiB resident: the machine had under 1 GiB available"
        elif time.monotonic() > deadline:
            why = f"killed after {timeout:.0f} s"
        if why:
            proc.kill()
            proc.wait()
            return why
        time.sleep(0.05)
    return None


def available() -> int:
    """The machine's MemAvailable (/proc/meminfo), bytes."""
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    return int(line.split()[1]) * 1024


def phase_rows(name: str, result: dict[str, Any]) -> list[str]:
    """A run's table rows: each phase's peak, the resident set after it and its seconds; then why it stopped."""
    times = [result["began"]] + [p["time"] for p in result["phases"]]
    rows = [f"| {name} | {p['phase']} | {p['peak'] / GIB:.2f} | {p['after'] / GIB:.2f} | {t - t0:.0f} |"
            for p, t0, t in zip(result["phases"], times, times[1:])]
    if result["failed"]:
        rows.append(f"| {name} | stopped: {result['failed']} | | | {result['ended'] - times[-1]:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("scaled", "full"), default="scaled",
                        help="full: FLUX.1-dev's 19/38 blocks and T5-XXL's 24 layers, as a BFL file (--layout file), "
                             "text encoders freed, measured to the start event")
    parser.add_argument("--layout", choices=("folder", "file"), default="folder",
                        help="a diffusers folder, or BFL's transformer file with a base_model_config folder")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5 layers (T5-XXL: 24)")
    parser.add_argument("--base-weights", default="auto", help="advanced.base_weights_dtype, comma-separated")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the files here and reuse them (full size: 33.7 GB of disk)")
    parser.add_argument("--cap-gib", type=float, default=CAP / GIB, help="kill a run past this resident size")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    full = args.size == "full"
    if full:
        args.layout, args.double, args.single, args.t5_layers = "file", *FULL.values()
    modes = ("freed",) if full else ("held", "freed")
    work = Path(tempfile.mkdtemp(prefix="flux-load-memory-"))
    try:
        found = measure(args, work, modes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish(report(args, modes, *found), args.write)


def measure(args: argparse.Namespace, work: Path, modes: tuple[str, ...]) -> tuple[dict[str, float], dict[str, Any]]:
    """Write (or reuse) the files and run each mode and base-weights choice; the parts' sizes and the results."""
    if args.layout == "folder":
        sizes = write_folder(work / "model", args.double, args.single, args.t5_layers)
        base = {"base_model": str(work / "model")}
    else:
        cache = args.cache or work / "files"
        sizes = write_full(cache, args.double, args.single, args.t5_layers)
        base = {"base_model": str(cache / "flux1-dev.safetensors"), "base_model_config": str(cache / "config")}
    images = make_images(work / "images", count=2)["lora"]
    results = {}
    for mode in modes:
        for weights in args.base_weights.split(","):
            if args.size == "full" and available() < 19 * GIB:
                raise SystemExit(f"{available() / GIB:.1f} GiB available: a full-size run wants >= 19 GiB free")
            results[f"{mode}-{weights}"] = run(mode, base, work, images, base_weights=weights,
                                              to_start=args.size == "full", cap=int(args.cap_gib * GIB),
                                              timeout=args.timeout)
            print(*phase_rows(f"{mode}-{weights}", results[f"{mode}-{weights}"]), sep="\n", flush=True)
    return sizes, results


def report(args: argparse.Namespace, modes: tuple[str, ...], sizes: dict[str, float],
           results: dict[str, Any]) -> str:
    command = (f"`python benchmarks/flux_load_memory.py --size full --base-weights {args.base_weights}`" if
               args.size == "full" else
               f"`python benchmarks/flux_load_memory.py --layout {args.layout} --double {args.double} --single "
               f"{args.single} --t5-layers {args.t5_layers} --base-weights {args.base_weights}`")
    what = "full-size FLUX.1-dev" if args.size == "full" else "FLUX.1-dev at the real widths with fewer blocks"
    lines = [
        f"### FLUX.1 peak RAM, text encoded ahead, {args.size} ({dt.date.today()}, {machine()})", "",
        f"{command}: a FLUX.1 LoRA on {what} ({'BFL transformer file + base_model_config folder' if args.layout == 'file' else 'diffusers folder'}; "
        f"transformer {sizes['transformer'] / GIB:.2f} GiB, T5 {sizes['t5'] / GIB:.2f} GiB in bf16), "
        "`advanced.cpu: true`, bf16, text encoded ahead (forced on the CPU), "
        + ("to the start event" if args.size == "full" else "one step at 64 px")
        + "; peak RSS (VmHWM) of each phase, reset between phases, the resident set after it, and its wall time "
        f"({os.environ.get('OMP_NUM_THREADS', '1')} thread(s)).", "",
    ]
    if args.size != "full":
        overall = {k: v["peak"] for k, v in results.items()}
        lines += ["| text encoders | base weights | peak RSS GiB |", "|---|---|---|"]
        lines += [f"| {'kept, transformer read at load (before)' if k.startswith('held') else 'freed, then the transformer read (now)'} | {k.split('-', 1)[1]} | {v / GIB:.2f} |" for k, v in overall.items()]
        lines.append("")
    lines += ["| run | phase | peak in phase GiB | resident after GiB | seconds |", "|---|---|---|---|---|"]
    for name, result in results.items():
        lines += phase_rows(name, result)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
