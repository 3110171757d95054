"""One process against two (`conjure train --num-processes 2`, gloo on the CPU): the speed-up at the same global
batch, through the real command line.

Trains the shipped toy SD 1.x model (trained weights: the middle of train_speed.py's sizes tiny, toy, full) with a
LoRA (or --method) three ways, all at the same global batch: one process with 1 thread, one process with 2
threads (the same cores as two processes), and two processes of 1 thread each holding half the batch. Times the
steps from the run's events (median after warm-up: start-up excluded) and the whole command (start-up included).
Prints a markdown table and, with --write, appends it to docs/benchmarks.md. Not a test: figures depend on the
machine, and on a shared machine on its neighbours.

    python benchmarks/processes_speed.py --batch 8 --steps 40 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench_common import machine, median_step_seconds, publish  # benchmarks/bench_common.py (this script's folder)
from train_speed import make_images, method_sections


def run_one(model: Path, images: Path, out: Path, *, method: str, batch: int, steps: int, processes: int,
            threads: int) -> dict:
    """`conjure train` of `processes` processes of `threads` threads each, at global batch `batch`."""
    sections = method_sections(method)
    raw = {
        "type": sections.pop("type"),
        "basic": {"base_model": str(model), "output_dir": str(out), "run_name": "run", "max_train_steps": steps,
                  "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(images), "resolution": 64, "batch_size": batch // processes,
                 **sections.pop("data", {})},
        **sections,
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        "optimizer": {"learning_rate": 1e-4},
        "advanced": {"cpu": True, "mixed_precision": "no"},
    }
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conjure", "train", str(config), "--num-processes", str(processes)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_s = median_step_seconds(out / "run", warm_up=5)
    return {"step_s": step_s, "wall_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", help="ti, lora, dora, pivotal or finetune (default: lora)")
    parser.add_argument("--batch", type=int, default=8, help="the global batch (even)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    from conjure.toy.models import toy_model

    model = toy_model("sd1")
    work = Path(tempfile.mkdtemp(prefix="conjure-processes-"))
    images = make_images(work / "images", 64, count=2 * args.batch)
    ways = [(1, 1), (1, 2), (2, 1)]  # (processes, threads each)
    rows = {}
    for processes, threads in ways:
        rows[processes, threads] = run_one(model, images, work / f"p{processes}-t{threads}", method=args.method,
                                           batch=args.batch, steps=args.steps, processes=processes, threads=threads)
        print(f"{processes} process(es) x {threads} thread(s): {rows[processes, threads]}", flush=True)
    base = rows[1, 1]["step_s"]
    lines = [
        f"### 1 against 2 processes, toy SD 1.x {args.method}: {machine()} ({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/processes_speed.py --method {args.method} --batch {args.batch} --steps {args.steps}`; "
        f"global batch {args.batch} at 64 px, {args.steps} steps; median step time after 5 warm-up steps; the "
        "command's wall time includes start-up (imports, model loading; two processes load the model twice).",
        "",
        "| processes x threads | batch per process | ms/step | speed-up vs 1 x 1 | images/s | command wall time |",
        "|---|---|---|---|---|---|",
    ]
    for (processes, threads), row in rows.items():
        lines.append(f"| {processes} x {threads} | {args.batch // processes} | {row['step_s'] * 1000:.1f} | "
                     f"{base / row['step_s']:.2f}x | {args.batch / row['step_s']:.1f} | {row['wall_s']:.1f} s |")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
