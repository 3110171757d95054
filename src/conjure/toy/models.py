"""Where the pre-trained toy base models live (package data), and the concept sets that teach them.

`toy_model(variant)` is a diffusers folder: sd1 (epsilon), sd2 (v-prediction, linear projections) and
sdxl (two text encoders, pooled embedding, size/crop ids), all 64x64, made by scripts/train_toy_models.py.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from conjure.errors import ConjureError
from conjure.toy import world

VARIANTS = ("sd1", "sd2", "sdxl")


def toy_model(variant: str) -> Path:
    path = Path(str(resources.files("conjure") / "assets" / "toy" / variant))
    if not (path / "model_index.json").is_file():
        raise ConjureError(f"no toy model {variant!r} in this installation (looked in {path})")
    return path


def concept_scenes(n: int, *, seed: int = 0, colour: str = "yellow", shape: str = "star") -> list[world.Scene]:
    """`n` scenes of a held-out concept (default: a yellow star) with varied size, position, background."""
    rng = random.Random(seed)
    return [world.sample_scene(rng, colours=(colour,), shapes=(shape,)) for _ in range(n)]



def concept_caption(scene: world.Scene, token: str = "<yellow-star>") -> str:
    """A world-style caption in which `token` stands for the concept's colour and shape."""
    return f"a {scene.size} {token} {scene.position} on a {scene.background} background"
