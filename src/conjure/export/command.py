"""`conjure convert IN OUT`: a LoRA file changed as the options say (layout, dtype, rank, embedding bundles)."""

from __future__ import annotations

import argparse
from pathlib import Path

from conjure.errors import ConjureError, refuse_overwrite


def cmd_convert(args: argparse.Namespace) -> int:
    from conjure.export.convert import ConvertOptions, convert
    from conjure.export.resize import energy_summary

    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise ConjureError(f"{src}: no such file")
    refuse_overwrite(out, args.force)
    options = ConvertOptions(
        to=args.to, family=args.family, dtype=args.dtype, resize_rank=args.resize_rank, energy=args.energy,
        merge_embedding=args.merge_embedding, split_bundle=args.split_bundle, force=args.force,
    )
    done = convert(src, out, options)
    print(f"wrote {out} ({done.format} format{', ' + args.dtype if args.dtype else ''})")
    for r in done.resized:
        change = f"rank {r.old_rank}, copied" if r.copied else f"rank {r.old_rank} -> {r.new_rank}"
        print(f"  {r.module}: {change}, energy kept {r.energy:.2%}")
    if done.resized:
        mean, lowest = energy_summary(done.resized)
        copied = sum(r.copied for r in done.resized)
        print(f"resized {len(done.resized) - copied} of {len(done.resized)} modules ({copied} copied as they were); "
              f"energy kept: mean {mean:.2%}, min {lowest.energy:.2%} ({lowest.module})")
    for name, path in done.embeddings.items():
        print(f"wrote {path} (embedding {name!r}: type {name} in the prompt)")
    return 0


def add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.families import FAMILIES

    p = sub.add_parser(
        "convert", help="convert a LoRA file: kohya <-> diffusers/PEFT, dtype, lower rank, embedding bundles",
        description="Write a LoRA file changed as the options say. IN: a kohya or diffusers/PEFT file, or another "
        "trainer's layout that `conjure inspect` reads (OneTrainer, SimpleTuner, ai-toolkit, diffusers' attention "
        "processors, LyCORIS LoCon). Without --resize-rank every value is kept (kohya -> peft -> kohya gives back "
        "the same file contents; another trainer's file of several alphas written as kohya gets one, the "
        "others folded into lora_up: the same updates, as diffusers needs); DoRA files cannot change between kohya and PEFT; LyCORIS LoHa/LoKr files "
        "convert only with --resize-rank or --energy (no LoRA of their rank is the same function).",
    )
    p.add_argument("input", metavar="IN", help="LoRA file (.safetensors)")
    p.add_argument("output", metavar="OUT", help="file to write")
    p.add_argument(
        "--to", choices=["kohya", "peft"],
        help="layout to write (default: IN's, kohya for another trainer's): kohya loads in InvokeAI, ComfyUI, "
        "A1111/Forge and diffusers; peft in diffusers only",
    )
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="write the LoRA's tensors in this dtype (alphas keep theirs; values beyond fp16's range are "
                   "refused, not written as inf; default: as they are)")
    p.add_argument("--resize-rank", type=int, metavar="R",
                   help="lower every module of rank > R to rank R by SVD of its update (kohya resize_lora.py's "
                   "conventions, each module's alpha kept); prints the energy kept per module. DoRA magnitudes "
                   "are kept. LyCORIS LoHa/LoKr: from their exact update, so the approximation is reported too")
    p.add_argument("--energy", type=float, metavar="E",
                   help="with or without --resize-rank: per module, the smallest rank keeping this fraction of the "
                   "update's energy (sum of squared singular values), e.g. 0.9; --resize-rank caps it")
    bundle = p.add_mutually_exclusive_group()
    bundle.add_argument("--merge-embedding", metavar="EMB", type=Path,
                        help="bundle this embedding file into the LoRA as bundle_emb.<its file name>.* (A1111/Forge "
                        "and ComfyUI read it; kohya layout only)")
    bundle.add_argument("--split-bundle", action="store_true",
                        help="write the LoRA without its bundled embeddings and each as its own embedding file "
                        "beside OUT (<name>.safetensors)")
    p.add_argument("--family", choices=list(FAMILIES), help="model family, when the file does not tell")
    p.add_argument("--force", action="store_true", help="overwrite OUT and the embedding files --split-bundle writes")
    p.set_defaults(func=cmd_convert)
