"""Draw the bundled demo image set: twelve 64x64 PNGs of one yellow five-pointed star.

The demo teaches a textual-inversion embedding one simple, recognisable concept, so the star changes only
in size, position and rotation while the backgrounds (plain colours and gradients) vary around it. No
caption files: the demo uses the "object" template preset. Deterministic (fixed seed, PIL + numpy only);
run `python scripts/make_demo_images.py` from anywhere to rewrite src/conjure/assets/demo/ti/.
"""

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "conjure" / "assets" / "demo" / "ti"
COUNT = 12
SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and downscale with a box filter: cheap, clean anti-aliasing
SEED = 20240611
STAR_YELLOW = (255, 204, 0)
# A regular pentagram's inner/outer radius ratio (1 / golden ratio squared).
INNER_RATIO = 0.381966
BACKGROUND_COLOURS = [
    (40, 70, 160),  # blue
    (30, 120, 110),  # teal
    (110, 40, 120),  # purple
    (50, 50, 55),  # charcoal
    (170, 60, 50),  # brick red
    (135, 190, 235),  # sky blue
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder to write 00.png ... 11.png into")
    args = parser.parse_args()
    write_demo_images(args.out)


def write_demo_images(out_dir: Path) -> list[Path]:
    """Write the demo set into `out_dir` and return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    paths = []
    for number in range(COUNT):
        path = out_dir / f"{number:02d}.png"
        demo_image(number, rng).save(path, optimize=True)
        paths.append(path)
    return paths


def demo_image(number: int, rng: np.random.Generator) -> Image.Image:
    """Image `number`: even numbers on a plain background (each colour once), odd ones on a gradient from
    that colour to another one."""
    big = SIZE * SUPERSAMPLE
    first = (number // 2) % len(BACKGROUND_COLOURS)
    second = (first + rng.integers(1, len(BACKGROUND_COLOURS))) % len(BACKGROUND_COLOURS)
    if number % 2 == 0:
        image = Image.new("RGB", (big, big), BACKGROUND_COLOURS[first])
    else:
        image = gradient(big, BACKGROUND_COLOURS[first], BACKGROUND_COLOURS[second], rng.uniform(0, math.tau))
    outer = rng.uniform(0.2, 0.4) * big
    margin = outer * 1.05
    centre = (rng.uniform(margin, big - margin), rng.uniform(margin, big - margin))
    rotation = rng.uniform(0, math.tau / 5)  # a star looks the same every fifth of a turn
    ImageDraw.Draw(image).polygon(star_points(centre, outer, rotation), fill=STAR_YELLOW)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def gradient(size: int, start: tuple[int, int, int], end: tuple[int, int, int], angle: float) -> Image.Image:
    """A linear gradient from `start` to `end` along the direction `angle` (radians)."""
    coords = np.linspace(-1.0, 1.0, size)
    x, y = np.meshgrid(coords, coords)
    along = (x * math.cos(angle) + y * math.sin(angle)) / math.sqrt(2) * 0.5 + 0.5
    mix = along[..., None]
    pixels = np.array(start, dtype=np.float64) * (1 - mix) + np.array(end, dtype=np.float64) * mix
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def star_points(centre: tuple[float, float], outer: float, rotation: float) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star, alternating outer and inner radius, first point up."""
    cx, cy = centre
    points = []
    for corner in range(10):
        radius = outer if corner % 2 == 0 else outer * INNER_RATIO
        angle = rotation - math.pi / 2 + corner * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


if __name__ == "__main__":
    main()
