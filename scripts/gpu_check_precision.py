"""GPU check of conjure's precision choices (issue 13, defects 2 and 3), for a lent CUDA machine.

(a) Validation decoding under fp16 autocast: the full-size SDXL VAE (`conjure.models.reference`, random weights,
    float32) decodes an SDXL-shaped latent (1x4x128x128 -> 1024x1024 px) under `torch.autocast("cuda",
    torch.float16)` through conjure's own `conjure.train.validation.decode_latents`, which must leave autocast and
    decode in fp32: the output must be finite and equal to a decode without any autocast. For contrast, the old
    path (the VAE called inside the autocast, as validation did before) is reported too: finite or not, and how
    far it is from the fp32 decode.
    Caveat: random weights need not overflow in fp16 the way the real SDXL VAE's do (its decoder's activations
    exceed fp16's 65504; that is why validation grids were black), so the old path may well stay finite here. What
    this check proves is that conjure's decode runs outside autocast in fp32 on CUDA and stays finite at full
    size; only the real weights (e.g. stabilityai/sdxl-vae) could show the overflow itself.
(b) What `advanced.mixed_precision: auto` picks on this card, with the card's name and compute capability, and
    what `torch.cuda.is_bf16_supported()` answers with and without emulation (pre-Ampere cards: True / False).

No downloads; under 2 minutes on one H100 (building the VAE and a few 1024 px decodes). Exits non-zero without
CUDA or when a check fails. Usage (from the repository root, `src` on PYTHONPATH):

    python scripts/gpu_check_precision.py [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_common import machine, publish  # noqa: E402

from conjure.models.reference import build_reference_vae  # noqa: E402
from conjure.train.setup import resolve_precision  # noqa: E402
from conjure.train.validation import decode_latents  # noqa: E402


def decode_check() -> list[tuple[str, str]]:
    torch.manual_seed(0)
    vae = build_reference_vae("sdxl", device="cuda").eval()
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator("cpu").manual_seed(0)).cuda()
    with torch.no_grad():
        reference = decode_latents(vae, latents)  # no autocast at all
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", torch.float16):
            ours = decode_latents(vae, latents)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        with torch.autocast("cuda", torch.float16):
            old = vae.decode(latents / vae.config.scaling_factor).sample.float()
    finite = bool(torch.isfinite(ours).all())
    same = float((ours - reference).abs().max())
    old_finite = bool(torch.isfinite(old).all())
    old_gap = float((old - reference).abs().nan_to_num(float("inf")).max())
    rows = [
        ("decode_latents under fp16 autocast: output", f"{tuple(ours.shape)} {ours.dtype}, finite: {finite}"),
        ("decode_latents under fp16 autocast vs no autocast: max abs difference", f"{same:.3g}"),
        ("decode_latents time (1024 px)", f"{seconds:.2f} s"),
        ("old path (VAE inside fp16 autocast): finite", f"{old_finite} (max abs difference {old_gap:.3g})"),
    ]
    if not finite or same > 1e-3:
        for row in rows:
            print(*row, sep=": ")
        raise SystemExit("FAIL: conjure's decode under fp16 autocast is not the finite fp32 decode")
    return rows


def precision_check() -> list[tuple[str, str]]:
    chosen = resolve_precision("auto", cpu=False)
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    return [
        ("card", f"{torch.cuda.get_device_name()}, compute capability {capability}"),
        ("torch.cuda.is_bf16_supported() / (including_emulation=False)",
         f"{torch.cuda.is_bf16_supported()} / {torch.cuda.is_bf16_supported(including_emulation=False)}"),
        ("mixed_precision: auto picks", f"{chosen.value} ({chosen.source})"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="append the results to this markdown file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check_precision.py needs a CUDA GPU: torch.cuda.is_available() is False")
    started = time.perf_counter()
    rows = precision_check() + decode_check()
    table = "\n".join(f"| {what} | {result} |" for what, result in rows)
    publish(
        f"### Precision checks (issue 13): {machine()} ({time.strftime('%Y-%m-%d')})\n\n"
        "`python scripts/gpu_check_precision.py`: full-size SDXL VAE with random weights (see the script's caveat: "
        f"random weights need not overflow like the real ones); {time.perf_counter() - started:.0f} s in all.\n\n"
        "| check | result |\n|---|---|\n" + table + "\n",
        args.write,
    )


if __name__ == "__main__":
    main()
