"""Draw the bundled demo image set: twelve 64x64 PNGs of a yellow star, rendered by the toy world.

Yellow and stars are held out of the toy base models' training (conjure/toy/world.py), so the demo teaches
them something new; the toy VAE was trained on them, so it can reconstruct the concept. No caption files:
the demo uses the "object" template preset. Deterministic; run `python scripts/make_demo_images.py` to
rewrite src/conjure/assets/demo/ti/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from conjure.toy.models import concept_scenes
from conjure.toy.world import render

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "conjure" / "assets" / "demo" / "ti"
COUNT = 12
SEED = 7


def write_demo_images(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(concept_scenes(COUNT, seed=SEED)):
        path = out_dir / f"{i:02d}.png"
        render(scene).save(path, optimize=True)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write 00.png ... 11.png into")
    write_demo_images(parser.parse_args().out)


if __name__ == "__main__":
    main()
