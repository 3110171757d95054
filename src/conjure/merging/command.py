"""`conjure merge MODEL MODEL... --method ... --to OUT`: the CLI of merging/merge.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_merge(args: argparse.Namespace) -> int:
    from conjure.cli import quiet_loading_bars
    from conjure.merging.merge import MergeRecipe, describe, merge_models

    quiet_loading_bars(args)
    recipe = MergeRecipe(args.method, tuple(args.weights) if args.weights else None, args.density, args.lam, args.seed)
    done = merge_models(args.models, Path(args.to), recipe, base=args.base, config=args.config,
                        save_dtype=args.save_dtype, force=args.force)
    kind = "single-file checkpoint" if done.path.suffix.lower() == ".safetensors" else "diffusers folder"
    print(f"merged {len(args.models)} {done.family} models ({describe(done.recipe)})"
          f"{f' onto base {args.base}' if args.base else ''}: {done.tensors} tensors in {done.seconds:.1f} s")
    print(f"wrote {done.path} ({kind}, {args.save_dtype})")
    return 0


def add_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.merging import METHODS

    p = sub.add_parser(
        "merge", help="merge SD 1.x/2.x/SDXL models of one family into a diffusers folder or a single file",
        description="Merge two or more models of one family tensor by tensor. lerp: weighted sum, the weights "
        "normalised to sum to 1 (default equal). slerp: spherical interpolation of two models at t = the second "
        "model's share of the weights (default 0.5), linear where the tensors are nearly parallel. add-difference: "
        "A + w (B - BASE), one weight per model after the first (default 1). ties (Yadav et al. 2023): the task "
        "vectors MODEL - BASE trimmed to their top --density by magnitude (default 0.2), signs elected by sum, "
        "agreeing entries averaged (weighted by --weights, default 1 each), BASE + --lambda x that. dare (Yu et al. "
        "2023): task-vector entries kept with probability --density (default 0.1, i.e. 90% dropped) and rescaled by "
        "1/density, BASE + --lambda x their weighted sum; --seed makes the drop masks reproducible. The first MODEL "
        "gives the output its configs, tokenizers and scheduler.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="diffusers folder, single-file .safetensors/.ckpt or hub id (folders are read lazily; the "
                   "others are loaded whole)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one per MODEL (add-difference: one per "
                   "MODEL after the first)")
    p.add_argument("--base", metavar="MODEL", help="the model the differences are taken from (add-difference, ties, "
                   "dare)")
    p.add_argument("--density", type=float, metavar="D", help="ties: fraction of each task vector kept (default "
                   "0.2); dare: probability an entry is kept (default 0.1)")
    p.add_argument("--lambda", dest="lam", type=float, metavar="L", help="ties/dare: scale of the merged task "
                   "vector (default 1)")
    p.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--to", required=True, metavar="OUT", help="a .safetensors path (one file in the original "
                   "layout apps load as a main model) or a folder (diffusers layout)")
    p.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the written "
                   "weights (default fp16)")
    p.add_argument("--config", metavar="MODEL", help="diffusers folder or hub id whose configs single-file MODELs "
                   "load with (needed offline)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)
