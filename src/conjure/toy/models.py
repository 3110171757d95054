"""Where the pre-trained toy base models live (package data), and the concept sets that teach them.

`toy_model(variant)` is a diffusers folder: sd1 (epsilon), sd2 (v-prediction, linear projections), sdxl (two
text encoders, pooled embedding, size/crop ids) and flux (FLUX.1-dev-like: flow matching, CLIP pooled + T5,
guidance input), all 64x64, made by scripts/train_toy_models.py.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from conjure import families
from conjure.errors import ConjureError
from conjure.toy import world

VARIANTS = tuple(families.FAMILIES)  # one toy model per family, named after it


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


def write_concept_set(
    folder: Path, token: str, *, n: int = 16, seed: int = 123, name_prefix: str = "", world_images: int = 0
) -> Path:
    """`n` images of the concept captioned with `token` (`<prefix>NN.png` + `.txt`), and optionally
    `world_images` ordinary non-yellow world images with their own captions (`world-NN`): the regularisation
    that keeps prompts without the token as they were. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(concept_scenes(n, seed=seed)):
        world.render(scene).save(folder / f"{name_prefix}{i:02d}.png")
        (folder / f"{name_prefix}{i:02d}.txt").write_text(concept_caption(scene, token), encoding="utf-8")
    rng, colours = random.Random(7), tuple(c for c in world.WORLD_COLOURS if c != "yellow")
    for i in range(world_images):
        scene = world.sample_scene(rng, colours=colours)
        world.render(scene).save(folder / f"world-{i:02d}.png")
        (folder / f"world-{i:02d}.txt").write_text(world.full_caption(scene), encoding="utf-8")
    return folder
