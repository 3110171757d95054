"""Aspect-ratio buckets: training sizes other than a square, so that wide and tall images are not cropped to
their middle.

Owns the bucket list for a resolution (SDXL-style: sides in steps of 64 pixels, as large as a pixel budget of
resolution x resolution allows, from 1:4 to 4:1 by default), which bucket an image goes to, and how an image is
resized and cropped to fill its bucket. Sizes are (height, width) pairs of ints, as elsewhere in conjure's data
layer. Pure functions of integers: nothing here opens an image or needs torch.

With the defaults at 1024 pixels the list is the one SDXL was trained on (Podell et al. 2023, appendix I) less
the eight that a bucket one step wider and of nearly the same shape makes redundant (e.g. 960x1024 beside
960x1088). The construction is kohya sd-scripts' (`make_bucket_resolutions`), with sides limited to 1:4 .. 4:1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

Size = tuple[int, int]
"""(height, width) in pixels."""


def make_buckets(
    resolution: int,
    *,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    max_area: int | None = None,
) -> list[Size]:
    """The (height, width) buckets for `resolution`, sorted by aspect ratio (tallest first), without duplicates.

    Both sides are multiples of `step` within [`min_side`, `max_side`] (defaults: half the resolution rounded
    down to the step, and twice the resolution), and no bucket has more pixels than `max_area` (default:
    resolution squared). For each width the bucket is as tall as those limits allow, and, so that portrait
    and landscape images are treated alike, for each height as wide: the transposes of the first are the
    second. The largest square that fits is included too: (resolution, resolution) with the default area.

    Raises ValueError for a `step` that is not positive, a resolution or side limit that is not a multiple of
    the step, `min_side <= resolution <= max_side` broken, or an area too small for even a min_side square.
    """
    if step <= 0:
        raise ValueError(f"bucket step must be positive, got {step}")
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the bucket step {step}")
    min_side = max(step, resolution // 2 // step * step) if min_side is None else min_side
    max_side = resolution * 2 if max_side is None else max_side
    max_area = resolution * resolution if max_area is None else max_area
    for name, side in (("min_side", min_side), ("max_side", max_side)):
        if side <= 0 or side % step:
            raise ValueError(f"{name} {side} must be a positive multiple of the bucket step {step}")
    if not min_side <= resolution <= max_side:
        raise ValueError(f"need min_side <= resolution <= max_side, got {min_side}, {resolution}, {max_side}")
    if max_area < min_side * min_side:
        raise ValueError(f"max_area {max_area} is smaller than a {min_side}x{min_side} square: no bucket fits")

    buckets: set[Size] = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.update({(height, width), (width, height)})
    square = min(max_side, math.isqrt(max_area) // step * step)
    buckets.add((square, square))
    # Distinct buckets never share an aspect ratio (each is as large as allowed in one direction, and a larger
    # one of the same shape would be a whole step longer on both sides), so the order is total.
    return sorted(buckets, key=lambda bucket: (Fraction(bucket[1], bucket[0]), bucket))


def assign_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to that of an image of `size` (height, width).

    Closest means the smallest |log(h / w) - log(bh / bw)|: a bucket twice as wide as the image's shape is as
    far from it as one twice as tall, so the crop loses the same share of the image either way. The distance is
    compared exactly (as fractions), so an image exactly between two buckets is a true tie: it goes to the
    bucket with more pixels, and between equal areas to the one that comes first in `buckets`.
    """
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if not buckets:
        raise ValueError("no buckets to choose from")

    def key(indexed: tuple[int, Size]) -> tuple[Fraction, int, int]:
        index, (bucket_height, bucket_width) = indexed
        # exp(|log(a / b)|) = max(a / b, b / a): ordered like the log distance, and exact.
        ratio = Fraction(height * bucket_width, width * bucket_height)
        return max(ratio, 1 / ratio), -bucket_height * bucket_width, index

    return min(enumerate(buckets), key=key)[1]


def bucket_resize_and_crop_size(size: Size, bucket: Size) -> tuple[Size, Size]:
    """How an image of `size` (height, width) fills `bucket`: its (height, width) after resizing, and the
    largest (top, left) offset of a bucket-sized crop in the resized image.

    The image is scaled by max(bucket height / height, bucket width / width), the smallest scale at which it
    covers the bucket, keeping its aspect ratio (a side is rounded to the nearest pixel, and never below the
    bucket's). Then a crop of exactly the bucket's size is cut at any offset from (0, 0) to the returned one:
    half of it to centre, a random one to augment. One of the two offsets is always 0.
    """
    height, width = size
    bucket_height, bucket_width = bucket
    if min(height, width, bucket_height, bucket_width) <= 0:
        raise ValueError(f"sizes must be positive, got image {size} and bucket {bucket}")
    if bucket_height * width >= bucket_width * height:  # the image is wider than the bucket: fit the height
        resized = (bucket_height, max(bucket_width, round(width * bucket_height / height)))
    else:
        resized = (max(bucket_height, round(height * bucket_width / width)), bucket_width)
    return resized, (resized[0] - bucket_height, resized[1] - bucket_width)
