"""One process against two (`conjure train --num-processes 2`, gloo on the CPU): the speed-up at the same global
batch, through the real command line.

Trains the shipped toy SD 1.x model (trained weights: the middle of train_speed.py's sizes tiny, toy, full) with a
LoRA (or --method) three ways, all at the same global batch: one process with 1 thread, one process with 2
threads (the same cores as two processes), and two processes of 1 thread each holding half the batch. Times the
steps from the run's events (median after warm-up: start-up excluded) and the whole command (start-up included).
Prints a markdown table and, with --write, appends it to docs/benchmarks.md. Not a test: figures depend on the
machine, and on a shared machine on its neighbours.

`--distributed fsdp` (a full fine-tune: `--method finetune`, without its EMA, which fsdp refuses): one process,
two under ddp and two under fsdp (advanced.distributed), with the main process's peak RAM (the end event's
peak_ram_bytes), where fsdp's 1/N of the trained state shows against ddp's whole copy.

    python benchmarks/processes_speed.py --batch 8 --steps 40 --write docs/benchmarks.md
    python benchmarks/processes_speed.py --method finetune --distributed fsdp --batch 8 --steps 20
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

import json

import yaml

from bench_common import machine, median_step_seconds, publish  # benchmarks/bench_common.py (this script's folder)
from train_speed import make_images, method_sections


def run_one(model: Path, images: Path, out: Path, *, method: str, batch: int, steps: int, processes: int,
            threads: int, distributed: str = "ddp") -> dict:
    """`conjure train` of `processes` processes of `threads` threads each, at global batch `batch`."""
    sections = method_sections(method)
    if distributed == "fsdp":
        sections.pop("finetune", None)  # its EMA: a whole copy of the weights fsdp shards (refused)
    raw = {
        "type": sections.pop("type"),
        "basic": {"base_model": str(model), "output_dir": str(out), "run_name": "run", "max_train_steps": steps,
                  "save_every_n_steps": steps, "validate_every_n_steps": None, "seed": 0},
        "data": {"source": str(images), "resolution": 64, "batch_size": batch // processes,
                 **sections.pop("data", {})},
        **sections,
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        "optimizer": {"learning_rate": 1e-4},
        "advanced": {"cpu": True, "mixed_precision": "no", "distributed": distributed},
    }
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conjure", "train", str(config), "--num-processes", str(processes)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_s = median_step_seconds(out / "run", warm_up=5)
    events = [json.loads(line) for line in (out / "run" / "events.jsonl").read_text().splitlines()]
    peak = next(e for e in events if e["event"] == "end")["peak_ram_bytes"]
    return {"step_s": step_s, "wall_s": time.perf_counter() - started, "peak_ram_gib": peak / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", help="ti, lora, dora, pivotal or finetune (default: lora)")
    parser.add_argument("--batch", type=int, default=8, help="the global batch (even)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp",
                        help="fsdp: 1 process, 2 under ddp, 2 under fsdp (a finetune without EMA)")
    args = parser.parse_args()
    from conjure.toy.models import toy_model

    model = toy_model("sd1")
    work = Path(tempfile.mkdtemp(prefix="conjure-processes-"))
    images = make_images(work / "images", 64, count=2 * args.batch)
    # (processes, threads each, advanced.distributed)
    ways = ([(1, 1, "ddp"), (1, 2, "ddp"), (2, 1, "ddp")] if args.distributed == "ddp"
            else [(1, 1, "fsdp"), (2, 1, "ddp"), (2, 1, "fsdp")])
    rows = {}
    for way in ways:
        processes, threads, distributed = way
        rows[way] = run_one(model, images, work / f"p{processes}-t{threads}-{distributed}", method=args.method,
                            batch=args.batch, steps=args.steps, processes=processes, threads=threads,
                            distributed=distributed)
        print(f"{processes} process(es) x {threads} thread(s), {distributed}: {rows[way]}", flush=True)
    base = rows[ways[0]]["step_s"]
    lines = [
        f"### 1 against 2 processes, toy SD 1.x {args.method}: {machine()} ({dt.date.today().isoformat()})",
        "",
        f"`python benchmarks/processes_speed.py --method {args.method} --batch {args.batch} --steps {args.steps}`; "
        f"global batch {args.batch} at 64 px, {args.steps} steps; median step time after 5 warm-up steps; the "
        "command's wall time includes start-up (imports, model loading; two processes load the model twice).",
        "",
        "| processes x threads | distributed | batch per process | ms/step | speed-up vs 1 x 1 | images/s "
        "| command wall time | peak RAM, main process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (processes, threads, distributed), row in rows.items():
        lines.append(f"| {processes} x {threads} | {distributed if processes > 1 else '-'} | {args.batch // processes} "
                     f"| {row['step_s'] * 1000:.1f} | {base / row['step_s']:.2f}x | {args.batch / row['step_s']:.1f} "
                     f"| {row['wall_s']:.1f} s | {row['peak_ram_gib']:.2f} GiB |")
    publish("\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
