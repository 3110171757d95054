"""`conjure lora bake|extract|combine`: the argparse wiring (the work: tools/bake.py, extract.py, combine.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conjure.errors import refuse_overwrite

SAVE_DTYPES = ("fp16", "bf16", "fp32")


def _energy_lines(records: list, what: str) -> list[str]:
    """One line per module (lowest energy first) and the summary: min and mean of the energy kept."""
    from conjure.export.resize import energy_summary

    lines = [f"  {r.module}: rank {r.new_rank} of {r.old_rank}, energy kept {r.energy:.2%}"
             for r in sorted(records, key=lambda r: r.energy)]
    mean, lowest = energy_summary(records)
    return lines + [f"{what} {len(records)} modules; energy kept: mean {mean:.2%}, min {lowest.energy:.2%} "
                    f"({lowest.module})"]


def _notes(notes: list[str]) -> None:
    for note in notes:
        print(note, file=sys.stderr)


def cmd_bake(args: argparse.Namespace) -> int:
    from conjure.tools.bake import bake
    from conjure.tools.lora_inputs import parse_input

    out = refuse_overwrite(Path(args.to), args.force)
    done = bake(args.base, [parse_input(t) for t in args.loras], out, args.save_dtype)
    for path, count in done.modules.items():
        print(f"  {path}: {count} modules merged")
    _notes(done.notes)
    kind = "single-file checkpoint" if out.suffix == ".safetensors" else "diffusers model"
    print(f"wrote {done.path} ({done.family} {kind}, {args.save_dtype})")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from conjure.tools.extract import extract

    out = refuse_overwrite(Path(args.to), args.force)
    done = extract(args.base, args.tuned, out, rank=args.rank, energy=args.energy, conv_rank=args.conv_rank,
                   save_dtype=args.save_dtype)
    print("\n".join(_energy_lines(done.modules, "extracted")))
    print(f"wrote {done.path} (kohya LoRA, {done.family}; {done.skipped} modules with no difference skipped)")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from conjure.tools.combine import combine
    from conjure.tools.lora_inputs import parse_input

    out = refuse_overwrite(Path(args.to), args.force)
    done = combine([parse_input(t) for t in args.loras], out, rank=args.rank, save_dtype=args.save_dtype)
    if done.resized:
        print("\n".join(_energy_lines(done.resized, "resized")))
    _notes(done.notes)
    ranks = sorted(set(done.ranks.values()))
    print(f"wrote {done.path} (kohya LoRA, {done.family}; {len(done.ranks)} modules, rank "
          f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'})")
    return 0


def _common(p: argparse.ArgumentParser, what: str, default: str) -> None:
    p.add_argument("--to", required=True, metavar="OUT", help=what)
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default=default,
                   help=f"dtype of the weights written (default: {default}; values beyond fp16's range are refused)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")


def add_lora(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lora = sub.add_parser("lora", help="LoRA tools: bake into a model, extract from a fine-tune, combine files")
    actions = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    spec = "FILE[:WEIGHT] (any LoRA/DoRA file conjure inspect reads; weight default 1)"

    p = actions.add_parser(
        "bake", help="merge LoRAs/DoRAs into a base model's weights (a diffusers folder or single file)",
        description="Apply each LoRA/DoRA file in turn at its weight to BASE's weights, as ComfyUI and A1111 apply "
        "them, and save the model. A file of another family, or with modules BASE does not have, is refused.",
    )
    p.add_argument("base", metavar="BASE", help="diffusers folder, hub id or .safetensors/.ckpt checkpoint")
    p.add_argument("loras", metavar="LORA", nargs="+", help=spec)
    _common(p, "the diffusers model folder to write, or a single-file checkpoint if it ends in .safetensors "
            "(original LDM/SGM keys: what A1111/Forge, ComfyUI and InvokeAI load as a main model)", "fp16")
    p.set_defaults(func=cmd_bake)

    p = actions.add_parser(
        "extract", help="a LoRA of a fine-tune's difference to its base (per-module SVD, kohya layout)",
        description="Write the LoRA that best approximates TUNED - BASE in every Linear/Conv2d of the UNet and text "
        "encoders that differ (SVD per module), and print the energy each keeps.",
    )
    p.add_argument("base", metavar="BASE", help="the base model (diffusers folder, hub id or checkpoint)")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    p.add_argument("--rank", type=int, metavar="R", help="rank of each module (with --energy: its cap)")
    p.add_argument("--energy", type=float, metavar="E",
                   help="per module, the smallest rank keeping this fraction of the difference's energy, e.g. 0.9")
    p.add_argument("--conv-rank", type=int, metavar="R", help="rank of the 3x3 convs (default: as the others)")
    _common(p, "the .safetensors file to write", "fp16")
    p.set_defaults(func=cmd_extract)

    p = actions.add_parser(
        "combine", help="combine LoRAs into one file (ranks concatenated exactly, or resized by SVD)",
        description="Write one kohya LoRA that applies what the files apply one after the other at their weights "
        "(ranks concatenated: exact), or with --rank lowered by SVD. DoRA files are refused.",
    )
    p.add_argument("loras", metavar="LORA", nargs="+", help=spec)
    p.add_argument("--rank", type=int, metavar="R", help="lower every module above rank R by SVD of its update")
    _common(p, "the .safetensors file to write", "fp16")
    p.set_defaults(func=cmd_combine)
