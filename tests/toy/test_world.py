"""The toy world: renders, scene sampling and captions (and the held-out concepts staying held out)."""

import random
import re

import numpy as np

from conjure.toy.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    UNNAMED_COLOURS,
    WORLD_COLOURS,
    WORLD_SHAPES,
    Scene,
    caption,
    full_caption,
    render,
    sample_scene,
    vocabulary,
)


def test_render_is_64x64_rgb_and_deterministic():
    rng = random.Random(0)
    for _ in range(20):
        scene = sample_scene(rng, colours=tuple(COLOURS), shapes=SHAPES)
        image = render(scene)
        assert image.mode == "RGB"
        assert image.size == (SIZE, SIZE) == (64, 64)
        assert np.array_equal(np.asarray(image), np.asarray(render(scene)))


def test_render_draws_the_shape_in_its_colour_on_its_background():
    scene = Scene("square", "blue", "large", "in the center", "white")
    pixels = np.asarray(render(scene))
    assert tuple(pixels[0, 0]) == BACKGROUNDS["white"]
    assert tuple(pixels[32, 32]) == COLOURS["blue"]


def test_sample_scene_is_deterministic_and_within_the_world():
    a = [sample_scene(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    for _ in range(300):
        scene = sample_scene(rng)
        assert scene.colour in WORLD_COLOURS and scene.shape in WORLD_SHAPES
        assert scene.size in SIZES and scene.position in POSITIONS and scene.background in BACKGROUNDS
        assert -3 <= scene.dx <= 3 and -3 <= scene.dy <= 3 and -15 <= scene.angle <= 15


def test_captions_only_use_the_vocabulary():
    words = set(vocabulary())
    rng = random.Random(2)
    for _ in range(500):
        scene = sample_scene(rng, colours=tuple(COLOURS), shapes=SHAPES)
        assert set(full_caption(scene).split()) <= words
        assert set(caption(scene, rng).split()) <= words


def test_new_concepts_are_not_in_the_default_world():
    """Stars are not in the world; unnamed colours (none at present) would never be named."""
    assert "star" in SHAPES and "star" not in WORLD_SHAPES
    rng = random.Random(3)
    for _ in range(2000):
        scene = sample_scene(rng)
        assert scene.shape != "star"
        for text in (caption(scene, rng, drop=0.0, empty=0.0), caption(scene, rng)):
            assert "star" not in text.split()
            assert not set(UNNAMED_COLOURS) & set(text.split())


def test_caption_with_empty_1_is_empty():
    rng = random.Random(4)
    scene = sample_scene(rng)
    assert all(caption(scene, rng, empty=1) == "" for _ in range(20))


def test_full_caption_format():
    scene = Scene("circle", "red", "large", "in the top left", "white")
    assert full_caption(scene) == "a large red circle in the top left on a white background"
    pattern = re.compile(
        r"a (small|large) (\w+) (circle|square|triangle|star) (in the (?:top|bottom) (?:left|right)|in the center)"
        r" on a (\w+) background"
    )
    rng = random.Random(5)
    for _ in range(100):
        scene = sample_scene(rng, colours=tuple(COLOURS), shapes=SHAPES)
        match = pattern.fullmatch(full_caption(scene))
        assert match, full_caption(scene)
        assert match.groups() == (scene.size, scene.colour, scene.shape, scene.position, scene.background)


def test_caption_without_drops_is_the_full_caption_and_drops_keep_the_shape():
    rng = random.Random(6)
    for _ in range(100):
        scene = sample_scene(rng)
        unnamed = scene.colour in UNNAMED_COLOURS
        expected = full_caption(scene).replace(f" {scene.colour}", "") if unnamed else full_caption(scene)
        assert caption(scene, rng, drop=0.0, empty=0.0) == expected
        short = caption(scene, rng, drop=1.0, empty=0.0)
        assert short == f"a {scene.shape}"
