"""Draw the bundled demo image set: twelve 64x64 PNGs of a yellow star, rendered by the toy world, each
with a world-style caption in which `<yellow-star>` stands for the concept ("a large <yellow-star> in the top
left on a navy background"): the toy models know only their world's words, so the TI templates' "a photo
of ..." would be noise to them. Stars are not in the toy models' world (conjure/toy/world.py); the toy VAE
was trained on them, so it can reconstruct the concept. Deterministic; run
`python scripts/make_demo_images.py` to rewrite src/conjure/assets/demo/ti/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from conjure.toy.models import concept_caption, concept_scenes
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
        path.with_suffix(".txt").write_text(concept_caption(scene) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write 00.png ... 11.png into")
    write_demo_images(parser.parse_args().out)


if __name__ == "__main__":
    main()
