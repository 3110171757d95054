"""Pre-train the toy base models (see conjure/toy/pretrain.py) and write them as diffusers folders.

    python scripts/train_toy_models.py vae --out build/toy            # shared VAE
    python scripts/train_toy_models.py unet --variant sd1 --out build/toy   # per variant (sd1, sd2, sdxl)
    python scripts/train_toy_models.py flux --out build/toy            # toy FLUX.1 (shifted shared VAE)
    python scripts/train_toy_models.py assemble --out build/toy --to src/conjure/assets/toy

Seeds and step counts default to the ones that made the committed models (README: "Toy models").
One thread is pinned: reproducible, and steady on 2-core machines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("vae")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--decoder-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("unet")
    p.add_argument("--variant", choices=["sd1", "sd2", "sdxl"], required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("flux")
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", type=Path, help="the shared toy VAE (default: the committed one, assets/toy/sd1/vae)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("assemble")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--to", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from conjure.toy import pretrain

    started = time.perf_counter()
    if args.stage == "vae":
        vae = pretrain.train_vae(args.steps, args.decoder_steps, seed=args.seed)
        vae.save_pretrained(args.out / "vae")
    elif args.stage == "unet":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.out / "vae")
        pretrain.train_variant(args.variant, vae, args.steps, seed=args.seed, out=args.out / args.variant)
    elif args.stage == "flux":
        from conjure.toy import pretrain_flux
        from conjure.toy.models import toy_model

        vae = pretrain_flux.shifted_shared_vae(args.vae or toy_model("sd1") / "vae")
        pretrain_flux.train_flux(vae, args.steps, seed=args.seed, out=args.out / "flux")
    else:
        if (args.out / "vae").is_dir():  # the UNet variants share the VAE trained in this build
            pretrain.assemble(args.out, args.to)
        if (args.out / "flux" / "transformer").is_dir():
            from conjure.toy import pretrain_flux

            pretrain_flux.assemble_flux(args.out, args.to)
    print(f"{args.stage} done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
