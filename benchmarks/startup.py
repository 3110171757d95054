"""Start-up of `conjure train` on the CPU: spawn to the first optimizer step, and the import floor under it.

Spawn to first step: `conjure train` of a LoRA (rank 4 on UNet attention) on the tiny SD1-layout model, 64 px,
batch 2, one thread, in a fresh process that torch's global optimizer step hook ends at its first step (the
config, model and images of versus_diffusers.py). Two figures per run: the wall-clock seconds from the spawn,
and the CPU seconds the process used by then (`time.process_time`: every thread), which a busy shared machine
inflates far less than the wall clock. With --before-src (an older version's src folder, from `git archive`),
the two versions alternate, run for run. Each version first runs once untimed, which also fills conjure's
tokenizer cache (its own folder here) as any earlier run on a machine would.

The import floor: what the run must import before its first step, one stage after another in one fresh process
per repeat, each stage timed alone: the interpreter, torch, torch._dynamo (diffusers and transformers import it
at their own import), transformers' CLIP, peft (diffusers imports it through diffusers.hooks when it is
installed), diffusers' UNet, VAE and scheduler, and then conjure's own modules for the run (with pydantic, PIL,
accelerate and the rest of what only conjure asks for).

    python benchmarks/startup.py --repeats 5 --before-src /tmp/before/src --write docs/benchmarks.md
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

from bench_common import machine, publish  # benchmarks/ (this script's folder)
from versus_diffusers import conjure_config, make_images

STAGES = (
    ("torch", "import torch"),
    ("torch._dynamo", "import torch._dynamo"),
    ("transformers: CLIPTextModel, CLIPTokenizer", "from transformers import CLIPTextModel, CLIPTokenizer"),
    ("peft", "import peft"),
    ("diffusers: UNet2DConditionModel, AutoencoderKL, DDPMScheduler",
     "from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler"),
    ("conjure's own modules for the run, with pydantic, PIL, accelerate",
     "import conjure.cli, conjure.train.loop, conjure.methods.lora, conjure.models.loading, conjure.data.dataset"),
)

# `conjure train CONFIG`, ended by the first optimizer step: its wall-clock time and the process's CPU seconds
FIRST_STEP = """
import json, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
def first(optimizer, args, kwargs):
    print("FIRST", json.dumps([time.time(), time.process_time()]), flush=True)
    os._exit(0)
register_optimizer_step_post_hook(first)
sys.argv = ["conjure", "train", sys.argv[1]]
runpy.run_module("conjure", run_name="__main__", alter_sys=True)
"""

PROBE = """
import json, sys, time
seconds = [time.perf_counter() - float(sys.argv[1])]
for statement in json.loads(sys.argv[2]):
    started = time.perf_counter()
    exec(statement)
    seconds.append(time.perf_counter() - started)
print(json.dumps(seconds))
"""


def import_floor(repeats: int, stages: tuple[tuple[str, str], ...] = STAGES) -> list[list[float]]:
    """Per repeat: the interpreter's start (spawn to its first line) and each stage's seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = []
    for _ in range(repeats):
        # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in both processes
        done = subprocess.run([sys.executable, "-c", PROBE, str(time.perf_counter()),
                               json.dumps([s for _, s in stages])], capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def first_step(config: Path, src: Path | None) -> tuple[float, float]:
    """(wall-clock seconds from the spawn, CPU seconds of the process) at the end of the run's first step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", FIRST_STEP, str(config)], capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FIRST ")), None)
    if line is None:
        raise RuntimeError(f"no first step (exit {done.returncode}): {done.stderr[-2000:]}")
    ended, cpu = json.loads(line.split(" ", 1)[1])
    return ended - spawned, cpu


def spawn_to_first_step(versions: dict[str, Path | None], repeats: int, work: Path) -> dict[str, list[tuple]]:
    from conjure.models.tiny import write_tiny_model

    model = write_tiny_model("sd1", work / "model")
    images = make_images(work / "images")["lora"]
    os.environ["CONJURE_CACHE_DIR"] = str(work / "cache")  # the runs' tokenizer cache, filled by the warm-up runs
    seconds: dict[str, list[tuple]] = {name: [] for name in versions}
    for r in range(-1, repeats):  # -1: the untimed warm-up run of each version
        for name, src in versions.items():
            out = work / f"{name}-{r + 1}"
            out.mkdir()
            figures = first_step(conjure_config("lora", model, images, out, 30, cached=False), src)
            print(name, r, figures, f"load {os.getloadavg()[0]:.1f}", flush=True)
            if r >= 0:
                seconds[name].append(figures)
    return seconds


def report(floor: list[list[float]], startup: dict[str, list[tuple]], repeats: int,
           stages: tuple[tuple[str, str], ...] = STAGES) -> str:
    lines = [f"### Start-up of `conjure train`: {machine()} ({dt.date.today()})", "",
             f"`python benchmarks/startup.py --repeats {repeats}`, load average {os.getloadavg()[0]:.1f} at the end.",
             ""]
    if startup:
        lines += ["Spawn to the end of the first optimizer step of a LoRA on the tiny SD1-layout model (64 px, "
                  "batch 2, one thread), each run a fresh process: wall-clock seconds, and the CPU seconds the "
                  "process used by then:", "",
                  "| version | wall s, each run | median | CPU s, each run | median |", "|---|---|---|---|---|"]
        for name, runs in startup.items():
            walls, cpus = [w for w, _ in runs], [c for _, c in runs]
            lines.append(f"| {name} | {' / '.join(f'{s:.2f}' for s in walls)} | {statistics.median(walls):.2f} | "
                         f"{' / '.join(f'{s:.2f}' for s in cpus)} | {statistics.median(cpus):.2f} |")
        lines.append("")
    lines += [f"The import floor, each stage in the order the run meets it, in a fresh process (min and median of "
              f"{len(floor)}):", "", "| stage | min s | median s |", "|---|---|---|"]
    for i, name in enumerate(["the interpreter (spawn to its first line)"] + [name for name, _ in stages]):
        column = [run[i] for run in floor]
        lines.append(f"| {name} | {min(column):.2f} | {statistics.median(column):.2f} |")
    total = [sum(run) for run in floor]
    lines.append(f"| all of it | {min(total):.2f} | {statistics.median(total):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before-src", type=Path, help="an older version's src folder to alternate with")
    parser.add_argument("--imports-only", action="store_true", help="the import floor alone")
    parser.add_argument("--write", type=Path, help="append the section to this markdown file")
    args = parser.parse_args(argv)
    floor = import_floor(args.repeats)
    startup: dict[str, list[tuple]] = {}
    if not args.imports_only:
        versions = {"this version": None, **({"before": args.before_src} if args.before_src else {})}
        startup = spawn_to_first_step(versions, args.repeats, Path(tempfile.mkdtemp(prefix="conjure-startup-")))
    publish(report(floor, startup, args.repeats), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
