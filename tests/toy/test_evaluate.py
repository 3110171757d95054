"""The toy evaluator reads scenes back: exactly on clean renders, and robustly on noisy, blurred, JPEG'd and
washed-out ones (what tiny diffusion models generate looks like that)."""

import io
import math
import random
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conjure.toy.evaluate import Reading, colour_distance, read_scene, score
from conjure.toy.world import BACKGROUNDS, COLOURS, SHAPES, SIZE, Scene, render, sample_scene

FIELDS = ("background", "colour", "shape", "size", "position")


def all_scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, colours=tuple(COLOURS), shapes=SHAPES) for _ in range(n)]


def accuracies(scenes, images) -> dict[str, float]:
    readings = [read_scene(image) for image in images]
    return {a: float(np.mean([getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes)])) for a in FIELDS}


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian noise (std 8 levels), a 3x3 box blur and a JPEG round trip at quality 75."""
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, 8.0, (SIZE, SIZE, 3))
    blurred = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(1))
    buffer = io.BytesIO()
    blurred.save(buffer, "JPEG", quality=75)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def test_reads_clean_renders_of_every_colour_and_shape():
    scenes = all_scenes(seed=0, n=500)
    acc = accuracies(scenes, [render(s) for s in scenes])
    assert all(acc[a] >= 0.98 for a in FIELDS), acc
    assert all(acc[a] == 1.0 for a in ("background", "colour", "size", "position")), acc


def test_reads_noisy_blurred_jpeg_renders():
    scenes = all_scenes(seed=1, n=500)
    noise = np.random.default_rng(1)
    acc = accuracies(scenes, [degrade(render(s), noise) for s in scenes])
    assert min(acc["colour"], acc["background"], acc["position"], acc["size"]) >= 0.95, acc
    assert acc["shape"] >= 0.85, acc


def test_reads_colours_washed_toward_the_background():
    """A plain-MSE VAE washes colours out: 40% of the way to the background still reads as the colour."""
    scenes = all_scenes(seed=2, n=200)
    images = []
    for scene in scenes:
        pixels = np.asarray(render(scene), dtype=np.float64)
        washed = 0.6 * pixels + 0.4 * np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
        images.append(Image.fromarray(np.round(washed).astype(np.uint8)))
    acc = accuracies(scenes, images)
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("angle", [-15.0, 0.0, 15.0])
def test_reads_each_shape_and_size_at_the_extreme_rotations(shape, size, angle):
    for position, dx, dy in [("in the top left", -3, -3), ("in the bottom right", 3, 3), ("in the center", 0, 0)]:
        scene = Scene(shape, "purple", size, position, "grey", dx=dx, dy=dy, angle=angle)
        reading = read_scene(render(scene))
        assert (reading.shape, reading.size, reading.position) == (shape, size, position), (scene, reading)


def supersampled(draw_shape, background: str, colour: str) -> Image.Image:
    image = Image.new("RGB", (4 * SIZE, 4 * SIZE), BACKGROUNDS[background])
    draw_shape(ImageDraw.Draw(image), COLOURS[colour])
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def test_a_star_blunted_to_a_pentagon_still_reads_as_a_star():
    """The toy VAE decodes stars as pentagons; five-fold symmetry is what marks a star."""
    angles = [math.radians(-90 + 72 * i) for i in range(5)]
    corners = [(128 + 60 * math.cos(a), 128 + 60 * math.sin(a)) for a in angles]  # radius 15 px at 64x64
    image = supersampled(lambda draw, fill: draw.polygon(corners, fill=fill), "white", "yellow")
    assert read_scene(image).shape == "star"
    assert read_scene(image.filter(ImageFilter.BoxBlur(1))).shape == "star"


def test_an_elongated_blob_is_no_shape():
    image = supersampled(lambda draw, fill: draw.ellipse([60, 96, 196, 160], fill=fill), "grey", "red")
    reading = read_scene(image)
    assert (reading.colour, reading.position, reading.shape) == ("red", "in the center", None)


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_background_has_no_foreground(background):
    blank = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    reading = read_scene(blank)
    assert reading == Reading(background, None, None, None, None, 0.0)

    noisy = np.asarray(blank, dtype=np.float64) + np.random.default_rng(0).normal(0, 8, (SIZE, SIZE, 3))
    reading = read_scene(np.clip(noisy, 0, 255).astype(np.uint8))
    assert reading.background == background and reading.colour is None and reading.shape is None
    assert reading.foreground_fraction < 0.005


def test_background_is_none_when_the_border_is_far_from_every_background():
    reading = read_scene(Image.new("RGB", (SIZE, SIZE), COLOURS["green"]))
    assert reading.background is None and reading.colour is None


def test_a_foreground_filling_most_of_the_image_is_no_clear_foreground():
    pixels = np.full((SIZE, SIZE, 3), BACKGROUNDS["white"], dtype=np.uint8)
    pixels[4:-4, 4:-4] = COLOURS["red"]
    reading = read_scene(pixels)
    assert reading.background == "white" and reading.colour is None and reading.foreground_fraction > 0.6


def test_foreground_fraction_is_the_share_of_shape_pixels():
    pixels = np.full((SIZE, SIZE, 3), BACKGROUNDS["grey"], dtype=np.uint8)
    pixels[34:60, 6:32] = COLOURS["green"]  # 26 px side: a square of radius 26 / 1.7 = 15.3 px
    assert read_scene(pixels) == Reading("grey", "green", "square", "large", "in the bottom left", 26**2 / SIZE**2)

    scene = Scene("square", "red", "large", "in the center", "white")  # side 2 * 0.85 * 17 = 28.9 px
    assert read_scene(render(scene)).foreground_fraction == pytest.approx(28.9**2 / SIZE**2, rel=0.08)


def test_accepts_arrays_in_several_layouts_and_other_sizes():
    scene = Scene("triangle", "yellow", "large", "in the bottom left", "navy", dx=1, dy=-2, angle=10)
    image = render(scene)
    expected = read_scene(image)
    assert (expected.shape, expected.colour, expected.position) == ("triangle", "yellow", "in the bottom left")
    pixels = np.asarray(image)
    assert read_scene(pixels) == expected
    assert read_scene(pixels.astype(np.float32) / 255) == expected
    assert read_scene(pixels.transpose(2, 0, 1)) == expected
    assert read_scene(np.dstack([pixels, np.full((SIZE, SIZE), 255, np.uint8)])) == expected
    assert read_scene(image.convert("RGBA")) == expected
    big = read_scene(image.resize((256, 256), Image.Resampling.BICUBIC))
    assert (big.background, big.colour, big.shape, big.size, big.position) == (
        expected.background, expected.colour, expected.shape, expected.size, expected.position
    )
    with pytest.raises(ValueError):
        read_scene(np.zeros((SIZE, SIZE, 5), np.uint8))


def test_is_deterministic_and_fast():
    images = [render(s) for s in all_scenes(seed=3, n=100)]
    first = [read_scene(i) for i in images]
    start = time.perf_counter()
    second = [read_scene(i) for i in images]
    per_image = (time.perf_counter() - start) / len(images)
    assert first == second
    assert per_image < 0.02, f"{per_image * 1000:.1f} ms per image"  # ~2.5 ms on one CPU core


def test_colour_distance():
    assert colour_distance(COLOURS["yellow"], "yellow") == 0.0
    assert colour_distance(np.array(BACKGROUNDS["navy"]), "navy") == 0.0
    assert colour_distance((0, 0, 0), "white") == pytest.approx(245 * 3**0.5)
    assert colour_distance(COLOURS["orange"], "yellow") < colour_distance(COLOURS["blue"], "yellow")
    with pytest.raises(ValueError):
        colour_distance((0, 0, 0), "pink")
    with pytest.raises(ValueError):
        colour_distance((0, 0), "red")


def test_score():
    star = Reading("white", "yellow", "star", "small", "in the center", 0.03)
    circle = Reading("navy", "red", "circle", "large", "in the top left", 0.2)
    nothing = Reading("grey", None, None, None, None, 0.0)
    readings = [star, circle, nothing, star]
    assert score(readings, colour="yellow") == 0.5
    assert score(readings, colour="yellow", shape="star") == 0.5
    assert score(readings, colour="yellow", shape="circle") == 0.0
    assert score(readings, background="navy") == 0.25
    assert score(readings, position="in the top left", size="large") == 0.25
    assert score([], colour="red") == 0.0
    with pytest.raises(ValueError):
        score(readings)
    with pytest.raises(ValueError):
        score(readings, hue="red")
    with pytest.raises(ValueError):
        score(readings, colour="pink")


def test_score_of_readings_of_rendered_scenes():
    scenes = [
        Scene("star", "yellow", "large", "in the center", "white"),
        Scene("circle", "red", "small", "in the top right", "navy"),
    ]
    readings = [read_scene(render(s)) for s in scenes]
    assert score(readings, colour="yellow", shape="star") == 0.5
    assert score(readings, shape="circle", position="in the top right", background="navy", size="small") == 0.5
