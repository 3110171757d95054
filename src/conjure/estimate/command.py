"""`conjure estimate CONFIG`: the table of `conjure.estimate.estimate`, or its JSON (`--json`, for the web app)."""

from __future__ import annotations

import argparse
import json
import sys

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conjure.estimate.model import Estimate, Term

GIB = 1024**3


def add_estimate(sub: argparse._SubParsersAction[argparse.ArgumentParser], add_overrides: object) -> None:
    p = sub.add_parser("estimate", help="predict a run's peak GPU memory and RAM from its config (loads no weights)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--gpu", action="store_true",
                   help="estimate for a CUDA GPU on a machine without one (bf16 unless mixed_precision says)")
    add_overrides(p)  # type: ignore[operator]
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    from conjure.config import load_config
    from conjure.estimate.peaks import estimate

    config = load_config(args.config, args.set)
    result = estimate(config, assume_gpu=args.gpu)
    if args.json:
        json.dump(result.as_json(), sys.stdout, indent=1)
        print()
    else:
        print(render(result))
    return 0


def size(n: float) -> str:
    return f"{n / GIB:7.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:7.1f} MiB"


def _rows(title: str, terms: list[Term]) -> list[str]:
    lines = [f"{title}: {size(sum(t.bytes for t in terms)).strip()}"]
    lines += [f"  {t.name:<52} {size(t.bytes)}  {t.basis}" for t in terms]
    return lines


def render(result: Estimate) -> str:
    where = "a CUDA GPU" if result.device == "cuda" else "the CPU"
    lines = [f"{result.method} on {result.family}, {where}, {result.precision}, {result.resolution} px, "
             f"batch {result.batch_size}",
             "parameters: " + ", ".join(f"{n} {c / 1e6:,.1f}M" for n, c in result.parameters.items())
             + f"; trained {result.trainable / 1e6:,.2f}M", ""]
    if result.device == "cuda":
        lines.append(f"peak accelerator memory: {size(result.peak_accelerator).strip()}")
        lines += _rows("training", result.accelerator)
        if result.encoding:
            lines += _rows("encoding captions ahead (text encoders alone)", result.encoding)
        lines.append("")
    lines.append(f"peak system RAM: {size(result.peak_ram).strip()}")
    lines += _rows("RAM", result.ram)[1:]
    lines += ["", *(f"assumes: {a}" for a in result.assumptions)]
    return "\n".join(lines)
