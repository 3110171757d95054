"""Read a toy scene back from an image: a deterministic, rule-based evaluator (numpy only).

It is meant for images that tiny diffusion models generate (blurry, noisy, colours a little off or washed
toward the background, shapes imperfect), so each step is a robust estimate, not a match against a clean
render:

- background: the median colour of the outer 3-pixel ring, read as the nearest BACKGROUNDS colour (None when
  it is farther than BACKGROUND_TOLERANCE from all of them);
- foreground: a first pass on a 3x3 box-filtered copy (pixel noise / 3) takes the pixels far enough from
  that median colour (a share of its distance to the nearest palette colour, or more where the border is
  noisy); the median colour of their core is the foreground colour. Each pixel's coverage ("alpha") along the
  background -> foreground colour line then gives the mask (alpha > 0.5, specks dropped, pinholes filled):
  `foreground_fraction` is its share of the image, and the rest is read from its largest 8-connected
  component;
- colour: the COLOURS name nearest to the foreground colour, where a palette colour washed up to 40% of the
  way toward the background still counts as itself;
- position: the POSITIONS centre nearest to the coverage-weighted centroid;
- shape: from the radial profile r(theta), the coverage integrated along 72 rays from the centroid (rotation
  does not change its harmonic amplitudes, and blur only softens them): a strong 3rd, 4th or 5th harmonic is
  a triangle, square or star (a star whose points are blunted toward a pentagon still reads as a star), a
  flat profile a circle, and None when no harmonic clearly dominates or the blob is elongated (a strong 2nd
  harmonic);
- size: the outer radius of the profile, scaled by the shape read (a square's corners reach 1.2x its drawing
  radius; thin tips fall short), against the geometric mean of the small and large radii (9 and 17 px).

Every attribute but the background is None when there is no clear foreground (under 0.5% or over 60% of
the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from conjure.toy.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, SIZES

BORDER = 3  # width of the ring the background is read from, pixels
MIN_FRACTION = 0.005  # less foreground than this: nothing there
MAX_FRACTION = 0.60  # more than this: no clear foreground either
BACKGROUND_TOLERANCE = 60.0  # farther than this (RGB distance) from every background: background None
FIRST_PASS = 0.35  # first-pass threshold: this share of the background's distance to the nearest COLOURS
NOISE_FACTOR = 4.0  # ... or this many times the border's median distance from its median colour
MIN_THRESHOLD = 12.0  # ... and never under this (RGB distance)
MIN_COVERAGE = 0.6  # a colour washed up to 40% of the way toward the background still reads as itself
N_RAYS = 72
RAY_STEP = 0.5  # pixels between samples along a ray
CIRCLE_MAX_HARMONIC = 0.05  # r(theta) flatter than this (3rd-5th harmonic amplitude / mean): a circle
DOMINANCE = 1.5  # the strongest of those harmonics must be this many times the next one, else shape None
MAX_ELONGATION = 0.15  # a 2nd harmonic above this (an ellipse with axes ~1.35:1) is no toy shape: shape None

MIN_PIXELS = MIN_FRACTION * SIZE * SIZE

_BACKGROUND_NAMES, _COLOUR_NAMES, _POSITION_NAMES = list(BACKGROUNDS), list(COLOURS), list(POSITIONS)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float64)
_POSITION_XY = np.array(list(POSITIONS.values()), dtype=np.float64)
_YS, _XS = np.mgrid[0:SIZE, 0:SIZE]
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # ~12.4 px
# Outer radius of r(theta) / drawing radius, for clean renders: a square's corners reach 0.85 * sqrt(2);
# thin star and triangle tips cover little of a pixel, so the coverage along those rays falls short.
_OUTER_RADIUS = {"circle": 1.0, "square": 1.13, "triangle": 0.9, "star": 0.86}

_THETA = np.arange(N_RAYS) * (2 * math.pi / N_RAYS)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_HARMONICS = {k: np.exp(-1j * k * _THETA) for k in (2, 3, 4, 5)}
_HARMONIC_SHAPE = {3: "triangle", 4: "square", 5: "star"}


@dataclass(frozen=True)
class Reading:
    background: str | None  # nearest BACKGROUNDS name (None if the border is not close to any)
    colour: str | None  # nearest COLOURS name of the foreground (None if no foreground found)
    shape: str | None  # "circle" | "square" | "triangle" | "star" | None
    size: str | None  # "small" | "large" | None
    position: str | None  # POSITIONS key | None
    foreground_fraction: float  # share of pixels classified as foreground


_ATTRIBUTES = {
    "background": set(BACKGROUNDS),
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "size": set(SIZES),
    "position": set(POSITIONS),
}


def colour_distance(rgb, name: str) -> float:
    """Euclidean RGB distance (0-255 units) from `rgb` to the named COLOURS or BACKGROUNDS colour."""
    if name in COLOURS:
        target = COLOURS[name]
    elif name in BACKGROUNDS:
        target = BACKGROUNDS[name]
    else:
        raise ValueError(f"unknown colour {name!r}; known: {sorted({*COLOURS, *BACKGROUNDS})}")
    rgb = np.asarray(rgb, dtype=np.float64).reshape(-1)
    if rgb.shape != (3,):
        raise ValueError(f"expected one RGB triple, got {rgb.size} values")
    return float(np.linalg.norm(rgb - np.asarray(target, dtype=np.float64)))


def score(readings: list[Reading], **expected: str) -> float:
    """Share of `readings` in which every given attribute has the expected value,
    e.g. ``score(readings, colour="yellow", shape="star")``. An empty list scores 0.0."""
    if not expected:
        raise ValueError("score() needs at least one attribute to check, e.g. colour='yellow'")
    for attribute, value in expected.items():
        if attribute not in _ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; known: {sorted(_ATTRIBUTES)}")
        if value not in _ATTRIBUTES[attribute]:
            raise ValueError(f"unknown {attribute} {value!r}; known: {sorted(_ATTRIBUTES[attribute])}")
    readings = list(readings)
    if not readings:
        return 0.0
    hits = sum(all(getattr(r, a) == v for a, v in expected.items()) for r in readings)
    return hits / len(readings)


def read_scene(image: Image.Image | np.ndarray) -> Reading:
    """Read background, colour, shape, size and position back from an RGB image (resized to 64x64).

    Arrays may be HxWx3 (or HxWx4, HxW, 3xHxW); integer arrays hold 0-255, float arrays 0-1 (values outside
    are clipped; a float array with values above 1.5 is taken as 0-255)."""
    rgb = _as_rgb64(image)
    bg = np.median(_ring(rgb), axis=0)
    bg_distance = np.linalg.norm(_BACKGROUND_RGB - bg, axis=1)
    near = bg_distance.min() <= BACKGROUND_TOLERANCE
    background = _BACKGROUND_NAMES[int(bg_distance.argmin())] if near else None

    # First pass, on a 3x3 box-filtered copy (pixel noise / 3): pixels clearly off the background.
    smooth = _box3(rgb) - bg
    noise = float(np.median(np.linalg.norm(_ring(smooth), axis=1)))
    nearest_palette = float(np.linalg.norm(_COLOUR_RGB - bg, axis=1).min())
    threshold = max(FIRST_PASS * nearest_palette, NOISE_FACTOR * noise, MIN_THRESHOLD)
    rough = _clean(np.linalg.norm(smooth, axis=2) > threshold)
    if rough.sum() < MIN_PIXELS:
        return _nothing(background, float(rough.mean()))
    fg = np.median(rgb[_core(_largest_component(rough))], axis=0)
    direction = fg - bg
    length2 = float(direction @ direction)
    if length2 < threshold**2:  # the "foreground" is scattered pixels whose median is background-like
        return _nothing(background, float(rough.mean()))

    # Second pass: each pixel's coverage along the background -> foreground colour line.
    diff = rgb - bg
    alpha = np.clip((diff @ direction) / length2, 0.0, 1.0)
    cleaned = _clean(alpha > 0.5)
    fraction = float(cleaned.mean())
    mask = _largest_component(cleaned)
    if not MIN_FRACTION <= fraction <= MAX_FRACTION or mask.sum() < MIN_PIXELS:
        return _nothing(background, fraction)

    support = alpha * _dilate(mask)  # the component with its anti-aliased rim, as coverage
    total = float(support.sum())
    cx, cy = float((support * _XS).sum() / total), float((support * _YS).sum() / total)
    # Pixel (i, j) covers [i, i+1) x [j, j+1) in the world's coordinates, so its centre is at +0.5.
    position = _POSITION_NAMES[int(np.linalg.norm(_POSITION_XY - (cx + 0.5, cy + 0.5), axis=1).argmin())]

    reach = float(np.sqrt(((_XS[mask] - cx) ** 2 + (_YS[mask] - cy) ** 2).max())) + 3.0
    profile = _radial_profile(support, cx, cy, reach)
    shape = _shape(profile)
    outer = float(np.convolve(np.r_[profile[-1], profile, profile[0]], np.ones(3) / 3, "valid").max())
    size = "small" if outer / _OUTER_RADIUS.get(shape, 1.0) < _SIZE_THRESHOLD else "large"
    return Reading(background, _nearest_colour(fg, bg), shape, size, position, fraction)


def _ring(rgb: np.ndarray) -> np.ndarray:
    """The pixels of the outer BORDER-pixel ring, as an (n, 3) array."""
    b = BORDER
    parts = (rgb[:b], rgb[-b:], rgb[b:-b, :b], rgb[b:-b, -b:])
    return np.concatenate([part.reshape(-1, 3) for part in parts])


def _box3(rgb: np.ndarray) -> np.ndarray:
    """3x3 box filter, edges replicated."""
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _nearest_colour(fg: np.ndarray, bg: np.ndarray) -> str:
    """The COLOURS name nearest to `fg`, allowing for a wash toward the background: each palette colour
    stands for the segment from itself to MIN_COVERAGE of the way to it from the background colour (so an
    exact palette colour is always read as itself)."""
    span = _COLOUR_RGB - bg
    coverage = ((fg - bg) * span).sum(axis=1) / np.maximum((span * span).sum(axis=1), 1e-9)
    alpha = np.clip(coverage, MIN_COVERAGE, 1.0)
    return _COLOUR_NAMES[int(np.linalg.norm(bg + alpha[:, None] * span - fg, axis=1).argmin())]


def _nothing(background: str | None, fraction: float) -> Reading:
    return Reading(background, None, None, None, None, fraction)


def _as_rgb64(image) -> np.ndarray:
    """The image as a float64 64x64x3 array of 0-255 values."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an RGB image array (HxWx3), got shape {array.shape}")
        array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=2)
        if array.dtype.kind == "f":
            array = np.nan_to_num(array.astype(np.float64))
            if array.max() <= 1.5:
                array = array * 255.0
        array = np.clip(array.astype(np.float64), 0, 255)
        if array.shape[:2] == (SIZE, SIZE):
            return array
        pil = Image.fromarray(np.round(array).astype(np.uint8), "RGB")
    if pil.size != (SIZE, SIZE):
        pil = pil.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float64)


def _shift_sum(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels in each pixel's 3x3 neighbourhood (outside the image counts as unset)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.int8)
    padded[1:-1, 1:-1] = mask
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drops set pixels with fewer than 2 set neighbours (specks, thin lines) and fills unset pixels with 6 or
    more (pinholes, cracks); straight edges and right-angle corners stay as they are."""
    neighbours = _shift_sum(mask) - mask
    return np.where(mask, neighbours >= 2, neighbours >= 6)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_sum(mask) > 0


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by 3x3 (away from anti-aliased edges), or the mask itself when that leaves too few."""
    core = _shift_sum(mask) == 9
    return core if core.sum() >= 8 else mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component, from the runs of set pixels in each row and a union-find over them."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)  # row-major order, so the k-th start pairs with the k-th stop
    stops = np.nonzero(edges == -1)[1]
    n = len(rows)
    if n <= 1:
        return mask.copy()
    rows_l, starts_l, stops_l = rows.tolist(), starts.tolist(), stops.tolist()
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = 0  # first run of the row above the current one
    for i in range(n):
        y = rows_l[i]
        while rows_l[first] < y - 1:
            first += 1
        j = first
        while j < i and rows_l[j] == y - 1:
            if starts_l[j] <= stops_l[i] and starts_l[i] <= stops_l[j]:  # overlap or diagonal touch
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[ri] = rj
            j += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=stops - starts, minlength=n)
    keep = np.flatnonzero(roots == int(sizes.argmax()))
    out = np.zeros_like(mask, dtype=bool)
    for i in keep.tolist():
        out[rows_l[i], starts_l[i] : stops_l[i]] = True
    return out


def _radial_profile(support: np.ndarray, cx: float, cy: float, reach: float) -> np.ndarray:
    """r(theta): the coverage integrated along rays from (cx, cy) out to `reach`, i.e. the boundary radius of
    a solid, star-shaped foreground, with anti-aliasing and noise averaged in (bilinear sampling, 0 outside)."""
    steps = np.arange(RAY_STEP / 2, reach, RAY_STEP)
    x = np.clip(cx + 1 + _COS[:, None] * steps, 0, SIZE + 0.999)  # +1: coordinates in the padded image
    y = np.clip(cy + 1 + _SIN[:, None] * steps, 0, SIZE + 0.999)
    padded = np.zeros((SIZE + 2, SIZE + 2))
    padded[1:-1, 1:-1] = support
    x0, y0 = x.astype(np.intp), y.astype(np.intp)
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, SIZE + 1), np.minimum(y0 + 1, SIZE + 1)
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).sum(axis=1) * RAY_STEP


def _shape(profile: np.ndarray) -> str | None:
    """circle / triangle / square / star from the harmonics of r(theta) relative to its mean; None for an
    elongated blob (a strong 2nd harmonic) or when no one of the 3rd-5th clearly dominates."""
    mean = float(profile.mean())
    amplitude = {k: 2 * abs(complex(profile @ h)) / len(profile) / mean for k, h in _HARMONICS.items()}
    if amplitude.pop(2) > MAX_ELONGATION:
        return None
    (best, k), (second, _) = sorted(((a, k) for k, a in amplitude.items()), reverse=True)[:2]
    if best < CIRCLE_MAX_HARMONIC:
        return "circle"
    if best < DOMINANCE * second:
        return None
    return _HARMONIC_SHAPE[k]
