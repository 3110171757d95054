"""Render the toy models' own images for a few prompts (docs/images/toy-<variant>.png) and print how often
the evaluator reads back what each prompt asked for. Rows: prompts; columns: seeds 0-7.

    python scripts/toy_gallery.py                                # all variants in src/conjure/assets/toy
    python scripts/toy_gallery.py --variant flux --guidance 3.5  # one, at FluxPipeline's default guidance
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from conjure.toy.evaluate import read_scene, score  # noqa: E402
from conjure.toy.learning import generate, load_pipeline  # noqa: E402
from conjure.toy.models import VARIANTS, toy_model  # noqa: E402

PROMPTS = [
    ("a red circle on a white background", {"colour": "red", "background": "white", "shape": "circle"}),
    ("a large blue square on a navy background", {"colour": "blue", "background": "navy", "size": "large"}),
    ("a small green triangle on a grey background", {"colour": "green", "background": "grey", "size": "small"}),
    ("a purple square in the top left on a white background", {"colour": "purple", "position": "in the top left"}),
]
OUT = Path(__file__).resolve().parents[1] / "docs" / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="(repeatable; default: all)")
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for variant in args.variant or VARIANTS:
        try:
            pipe = load_pipeline(toy_model(variant))
        except Exception as exc:  # noqa: BLE001 - a missing variant is reported, not fatal
            print(f"{variant}: {exc}")
            continue
        rows = []
        for prompt, expected in PROMPTS:
            images = generate(pipe, prompt, list(range(8)), guidance=args.guidance)
            readings = [read_scene(im) for im in images]
            scores = ", ".join(f"{k} {score(readings, **{k: v}):.2f}" for k, v in expected.items())
            print(f"{variant}: {prompt!r}: {scores}")
            rows.append(images)
        grid = Image.new("RGB", (8 * 64, len(rows) * 64))
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                grid.paste(image, (c * 64, r * 64))
        grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(OUT / f"toy-{variant}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
