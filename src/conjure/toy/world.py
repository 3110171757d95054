"""The toy world: 64x64 scenes of one coloured shape on a plain background, and their captions.

The base models learn WORLD_COLOURS x WORLD_SHAPES, yellow included. `star` is not in their world at all
(the VAE sees stars, so it can reconstruct them). The methods are taught "a yellow star" under a new token:
a colour the model can draw (so a token can find it, and the evaluator can read it back) on a shape it has
never seen. UNNAMED_COLOURS can take colours out of the captions (drawn but never named); it is empty: the
first toy models were trained that way, and textual inversion could not find a direction for a colour that
no word had ever asked for (yellow stayed at the 25% it had without any colour word).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 70, 225),
    "orange": (250, 140, 25),
    "purple": (145, 55, 185),
    "brown": (125, 75, 35),
    "yellow": (240, 215, 30),  # held out of the base models' world
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "grey": (130, 130, 130), "navy": (25, 30, 75)}
SHAPES = ("circle", "square", "triangle", "star")  # "star" is held out of the base models' world
SIZES = {"small": 9.0, "large": 17.0}  # radius in pixels at 64x64
POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left": (19, 19),
    "in the top right": (45, 19),
    "in the bottom left": (19, 45),
    "in the bottom right": (45, 45),
    "in the center": (32, 32),
}

WORLD_COLOURS = tuple(COLOURS)
UNNAMED_COLOURS: tuple[str, ...] = ()  # colours drawn in the world but never named in its captions
WORLD_SHAPES = tuple(s for s in SHAPES if s != "star")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # jitter of the centre, pixels
    dy: float = 0.0
    angle: float = 0.0  # rotation, degrees


def sample_scene(
    rng: random.Random,
    *,
    colours: tuple[str, ...] = WORLD_COLOURS,
    shapes: tuple[str, ...] = WORLD_SHAPES,
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
) -> Scene:
    return Scene(
        shape=rng.choice(shapes),
        colour=rng.choice(colours),
        size=rng.choice(tuple(SIZES)),
        position=rng.choice(tuple(POSITIONS)),
        background=rng.choice(backgrounds),
        dx=rng.uniform(-3, 3),
        dy=rng.uniform(-3, 3),
        angle=rng.uniform(-15, 15),
    )


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.85, y * r * 0.85) for x, y in corners]
    elif shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
        pts = [(x, y + r * 0.15) for x, y in pts]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    else:
        raise ValueError(shape)
    t = math.radians(angle)
    return [(cx + x * math.cos(t) - y * math.sin(t), cy + x * math.sin(t) + y * math.cos(t)) for x, y in pts]


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image, anti-aliased (drawn at 4x, then downscaled)."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx, cy, r = (cx + scene.dx) * s, (cy + scene.dy) * s, SIZES[scene.size] * s
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, scene.angle), fill=fill)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def full_caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.shape} {scene.position} on a {scene.background} background"


def caption(scene: Scene, rng: random.Random, *, drop: float = 0.25, empty: float = 0.1) -> str:
    """A caption with parts left out at random (so prompts can name only some attributes); `empty` of
    them are empty, for classifier-free guidance."""
    if rng.random() < empty:
        return ""
    colour = "" if scene.colour in UNNAMED_COLOURS else scene.colour
    words = [w for w in (scene.size, colour) if w and rng.random() >= drop]
    text = " ".join(["a", *words, scene.shape])
    if rng.random() >= drop:
        text += f" {scene.position}"
    if rng.random() >= drop:
        text += f" on a {scene.background} background"
    return text


def vocabulary() -> list[str]:
    """Every word a toy caption can contain (the toy tokenizer makes each one a single token)."""
    words = {"a", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *SIZES}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)
