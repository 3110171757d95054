"""`conjure inspect FILE [--json] [--allow-pickle]`: what a LoRA/DoRA/LyCORIS/embedding (or model) file holds and
whether InvokeAI, ComfyUI, AUTOMATIC1111/Forge and diffusers apply every tensor of it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_inspect(args: argparse.Namespace) -> int:
    from conjure.inspection.reader import inspect_file
    from conjure.inspection.apps import verdicts
    from conjure.inspection.report import as_json, as_text

    insp = inspect_file(Path(args.file), allow_pickle=args.allow_pickle)
    found = verdicts(insp)
    print(json.dumps(as_json(insp, found), indent=2) if args.json else as_text(insp, found))
    return 0


def add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect", help="what a LoRA/DoRA/LyCORIS/embedding or model file holds, and what each app would drop",
        description="Read a .safetensors (or A1111 .pt) adapter or embedding file from its header and shapes, and "
        "report its kind, family, ranks and alphas, the modules it adapts, trigger words and training facts, and "
        "for InvokeAI, ComfyUI, AUTOMATIC1111/Forge and diffusers whether every tensor is applied (rules read from "
        "each app's loader code: docs/app-loaders.md). A whole model (single-file SD checkpoint, FLUX.1 "
        "transformer, diffusers UNet file) is reported as a checkpoint: family, prediction type, parts, and where "
        "each app loads it.",
    )
    p.add_argument("file", metavar="FILE", help="the .safetensors (or .pt) file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow-pickle", action="store_true",
                   help="open a .pt/.ckpt/.bin that needs more than tensors to unpickle (it can run code: only for "
                   "files you trust)")
    p.set_defaults(func=cmd_inspect)
