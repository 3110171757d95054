"""conjure side by side with the diffusers example scripts, on the CPU (issue 16's setting).

Runs diffusers' `examples/textual_inversion/textual_inversion.py` and `examples/text_to_image/
train_text_to_image_lora.py` and `conjure train` on one tiny SD1-layout model folder (`conjure tiny-model sd1`) and
one image folder: 64 px, batch 2, 200 steps, AdamW 1e-4 (weight decay 1e-2, the scripts' default) constant, LoRA
rank 4 on the UNet's attention (the script's to_q/to_k/to_v/to_out.0; conjure's `unet_targets: attention`), one
thread. Each run is a fresh process; one hook (torch's global optimizer step hook) times every optimizer step in
all of them, so start-up (spawn to the first step's end) and steps/s (median step interval after 20 steps) are
measured the same way: on the wall clock, and in the process's CPU time (what a shared machine's other work
disturbs least). conjure's LoRA runs twice: as is, and with `cache_latents: memory` and
`cache_text_encoder_outputs: true`. The runs are interleaved: each round runs every trainer once, in a rotated
order, so a change of the machine's load spreads over all of them; the table gives each figure's median and range.
`--baseline-src DIR` adds conjure from another source tree (`git archive COMMIT src | tar -x -C DIR`) to every
round, for a before/after. `--pieces` also times, in every trainer alike, the pieces of a step that all of them
have (data loader, VAE encode, text encoder, UNet forward, backward, clipping, optimizer step) in thread CPU time,
and prints where each trainer's step goes: what is left beside the models' own calls is each trainer's own work.

The scripts are not part of conjure: fetch them for the run (diffusers' GitHub repository, the version installed)
into a folder given as --scripts, never committed. They import torchvision (transforms only); where the one
installed for them cannot load its compiled detection ops (a CUDA build beside a CPU torch), the runner skips
torchvision's meta registrations of those ops, which the scripts never call. Packages installed only for the
scripts go in a folder given as --extra-path. The default (3 rounds of 5 runs of 200 steps) takes about 3 minutes
on a quiet 2-core machine (each run ~5 s of start-up and ~6-7 s of steps), longer under load:

    git -C DIFFUSERS show HEAD:examples/textual_inversion/textual_inversion.py > /tmp/diffusers-examples/textual_inversion.py
    git -C DIFFUSERS show HEAD:examples/text_to_image/train_text_to_image_lora.py > /tmp/diffusers-examples/train_text_to_image_lora.py
    pip install --no-deps --target /tmp/pydeps torchvision
    python benchmarks/versus_diffusers.py --scripts /tmp/diffusers-examples --extra-path /tmp/pydeps \\
        --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench_common import publish  # benchmarks/bench_common.py (this script's folder)

RUNNER = """
import atexit, json, os, runpy, sys, time, types
import torch
torch.set_num_threads(1)
from torch.optim.optimizer import register_optimizer_step_post_hook
times, pieces, inside = [], {}, []
register_optimizer_step_post_hook(
    lambda optimizer, args, kwargs: times.append((time.time(), time.process_time(), time.thread_time())))
atexit.register(lambda: open(os.environ["BENCH_STEPS"], "w").write(json.dumps({"steps": times, "pieces": pieces})))
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def piece(owner, name, label):  # the calls' thread CPU time and the step they fell in; a piece inside another once
    call = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if inside:
            return call(*args, **kwargs)
        inside.append(label)
        start = time.thread_time()
        try:
            return call(*args, **kwargs)
        finally:
            inside.pop()
            pieces.setdefault(label, []).append((len(times), time.thread_time() - start))

    setattr(owner, name, wrapper)


if os.environ.get("BENCH_PIECES"):
    import accelerate, accelerate.optimizer, diffusers, transformers
    from torch.utils.data import dataloader
    for owner, name, label in [
        (dataloader._SingleProcessDataLoaderIter, "__next__", "data loader"),
        (diffusers.AutoencoderKL, "encode", "VAE encode"),
        (transformers.CLIPTextModel, "forward", "text encoder forward"),
        (diffusers.UNet2DConditionModel, "forward", "UNet forward"),
        (torch.Tensor, "backward", "backward"),
        (accelerate.Accelerator, "clip_grad_norm_", "gradient clipping"),
        (accelerate.optimizer.AcceleratedOptimizer, "step", "optimizer step"),
    ]:
        piece(owner, name, label)
target = sys.argv[1]
sys.argv = sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""
PIECES = ("data loader", "VAE encode", "text encoder forward", "UNet forward", "backward", "gradient clipping",
          "optimizer step")
WARM_UP = 20  # steps left out of every figure

CAPTION = "a photo of zwx dog"


def make_images(folder: Path, count: int = 8) -> dict[str, Path]:
    """The same images twice: with same-name .txt captions (conjure) and a metadata.jsonl (the LoRA script's
    `imagefolder` loader), for LoRA; alone, for textual inversion (its script opens every file of the folder)."""
    captioned, alone = folder / "captioned", folder / "alone"
    captioned.mkdir(parents=True)
    alone.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        image.save(captioned / f"{i}.png")
        image.save(alone / f"{i}.png")
        (captioned / f"{i}.txt").write_text(CAPTION)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": CAPTION}))
    (captioned / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return {"lora": captioned, "ti": alone}


def conjure_config(kind: str, model: Path, images: Path, out: Path, steps: int, cached: bool) -> Path:
    method = ({"lora": {"rank": 4, "unet_targets": "attention", "trigger_word": "zwx"}} if kind == "lora"
              else {"textual_inversion": {"placeholder_token": "<zwx>", "initializer": "dog"}})
    raw = {
        "type": "lora" if kind == "lora" else "textual_inversion",
        "basic": {"base_model": str(model), "output_dir": str(out), "max_train_steps": steps, "seed": 0,
                  "save_every_n_steps": steps, "validate_every_n_steps": None},
        "data": {"source": str(images), "resolution": 64, "batch_size": 2,
                 **({"cache_latents": "memory", "cache_text_encoder_outputs": True} if cached else {})},
        **method,
        "validation": {"at_start": False, "prompts": []},
        "optimizer": {"optimizer": "adamw", "learning_rate": 1e-4, "scheduler": "constant", "weight_decay": 1e-2},
        "advanced": {"mixed_precision": "no"},
    }
    path = out / f"{kind}{'-cached' if cached else ''}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def script_args(kind: str, scripts: Path, model: Path, images: Path, out: Path, steps: int) -> list[str]:
    common = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images), "--resolution", "64",
              "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--output_dir", str(out),
              "--dataloader_num_workers", "0"]
    if kind == "lora":
        return [str(scripts / "train_text_to_image_lora.py"), *common, "--rank", "4", "--caption_column", "text",
                "--checkpointing_steps", str(10 * steps)]
    return [str(scripts / "textual_inversion.py"), *common, "--placeholder_token", "<zwx>",
            "--initializer_token", "dog", "--save_steps", str(10 * steps), "--checkpointing_steps", str(10 * steps)]


def timed(args: list[str], extra_path: Path | None, log: Path, pieces: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", BENCH_STEPS=str(log.with_suffix(".json")))
    env.update({"BENCH_PIECES": "1"} if pieces else {})
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    spawned = time.time()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-c", RUNNER, *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env).returncode
    wall = time.time() - spawned
    saved = json.loads(log.with_suffix(".json").read_text()) if log.with_suffix(".json").exists() else {}
    times = saved.get("steps", [])
    if code != 0 or len(times) < WARM_UP + 10:
        return {"error": f"exit {code}, {len(times)} steps; see {log}"}
    clock, cpu, thread = np.array(times).T
    result = {"startup_s": clock[0] - spawned, "steps_s": 1 / statistics.median(np.diff(clock[WARM_UP:])),
              "cpu_steps_s": 1 / statistics.median(np.diff(cpu[WARM_UP:])), "wall_s": wall}
    if pieces:  # ms per step, over the steps after warm-up (a final validation's calls come after the last step)
        steps = len(times) - 1 - WARM_UP
        result["pieces_ms"] = {"step": 1000 * (thread[-1] - thread[WARM_UP]) / steps, **{
            label: 1000 * sum(d for at, d in saved["pieces"].get(label, []) if WARM_UP < at < len(times)) / steps
            for label in PIECES}}
    return result


TRAINERS = {"ti": ["diffusers", "conjure"], "lora": ["diffusers", "conjure", "conjure, cached latents + text"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", type=Path, required=True,
                        help="folder with diffusers' textual_inversion.py and train_text_to_image_lora.py")
    parser.add_argument("--extra-path", type=Path, help="folder of packages installed only for the scripts")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every trainer once")
    parser.add_argument("--methods", default="ti,lora")
    parser.add_argument("--conjure-src", type=Path, help="run conjure from this src folder (e.g. an older version's, "
                        "exported with `git archive`) instead of the installed one")
    parser.add_argument("--baseline-src", type=Path, help="also run conjure from this src folder (e.g. `git archive` "
                        "of an older commit), interleaved with the others, as the rows 'conjure (baseline)'")
    parser.add_argument("--pieces", action="store_true", help="also time the pieces of a step (the models' calls, "
                        "backward, clipping, optimizer, data loader) in every trainer, in thread CPU time")
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    from conjure.models.tiny import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="versus-diffusers-"))
    model = write_tiny_model("sd1", work / "model")
    folders = make_images(work / "images")
    runs = [(kind, name) for kind in args.methods.split(",") for name in TRAINERS[kind]]
    if args.baseline_src:
        runs += [(kind, name.replace("conjure", "conjure (baseline)")) for kind, name in runs if "conjure" in name]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for r in range(args.repeats):
        for kind, name in runs[r % len(runs):] + runs[: r % len(runs)]:  # a rotated order each round
            images = folders[kind]
            out = work / f"{kind}-{name.split(',')[0].replace(' ', '-')}-{r}{'-cached' if 'cached' in name else ''}"
            out.mkdir()
            src = args.baseline_src if "baseline" in name else args.conjure_src
            command = (script_args(kind, args.scripts, model, images, out, args.steps) if name == "diffusers"
                       else ["conjure", "train", str(conjure_config(kind, model, images, out, args.steps,
                                                                    "cached" in name))])
            result = timed(command, args.extra_path if name == "diffusers" else src, out / "log.txt", args.pieces)
            print(kind, name, r, result, flush=True)
            results[(kind, name)].append(result)
    publish(table(results, args), args.write)
    return 0


def table(results: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> str:
    import platform

    import torch

    def spread(values: list[float], fmt: str) -> str:
        return (f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"
                if values else "n/a")

    def ratio(kind: str, name: str, key: str) -> str:
        mine = [r[key] for r in results[(kind, name)] if key in r]
        base = [r[key] for r in results[(kind, "diffusers")] if key in r]
        return f"{statistics.median(mine) / statistics.median(base):.2f}x" if mine and base else "n/a"

    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    machine = (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} core(s), 1 thread, "
               f"torch {torch.__version__}")
    lines = [f"### Side by side with the diffusers example scripts: {machine} ({dt.date.today()})", "",
             f"`python benchmarks/versus_diffusers.py --steps {args.steps} --repeats {args.repeats}"
             f"{' --baseline-src DIR' if args.baseline_src else ''}{' --pieces' if args.pieces else ''}`: tiny SD1-layout "
             "model, 64 px, batch 2, AdamW 1e-4 constant (weight decay 1e-2), LoRA rank 4 on UNet attention; "
             "steps/s = 1 / median step interval after 20 steps, on the wall clock and in the process's CPU time; "
             f"start-up = spawn to the end of the first step. Median (min-max) of {args.repeats} interleaved "
             f"rounds; load average at the end (1/5/15 min): {load}.", "",
             "| method | trainer | steps/s (wall) | ratio | steps/s (CPU time) | ratio | start-up s |",
             "|---|---|---|---|---|---|---|"]
    for (kind, name), runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        figures = {key: [r[key] for r in runs if key in r] for key in ("steps_s", "cpu_steps_s", "startup_s")}
        lines.append(f"| {kind} | {name} | {spread(figures['steps_s'], '.2f')} | {ratio(kind, name, 'steps_s')} | "
                     f"{spread(figures['cpu_steps_s'], '.2f')} | {ratio(kind, name, 'cpu_steps_s')} | "
                     f"{spread(figures['startup_s'], '.1f')} |" + (f" {'; '.join(errors)}" if errors else ""))
    return "\n".join(lines + pieces_table(results)) + "\n"


def pieces_table(results: dict[tuple[str, str], list[dict]]) -> list[str]:
    """With --pieces: each trainer's step in thread CPU time ms, split into the pieces every trainer has (median over
    the rounds); "the rest" is what none of them covers (noise and loss, tokenizing, events, the trainer's own
    Python)."""
    timed_runs = {run: [r["pieces_ms"] for r in runs if "pieces_ms" in r] for run, runs in results.items()}
    timed_runs = {run: found for run, found in timed_runs.items() if found}
    if not timed_runs:
        return []
    names = [f"{kind} {name}" for kind, name in timed_runs]
    lines = ["", "Where a step's time goes (thread CPU time, ms per step, median of the rounds):", "",
             "| piece | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label in ("step", *PIECES, "the rest"):
        cells = []
        for found in timed_runs.values():
            values = [f["step"] - sum(f[p] for p in PIECES) if label == "the rest" else f[label] for f in found]
            cells.append(f"{statistics.median(values):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
