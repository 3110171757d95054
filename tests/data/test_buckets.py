"""Aspect-ratio buckets: within their limits, as large as allowed, and every image goes to the closest shape."""

import math
import random

import pytest

from conjure.data.buckets import assign_bucket, bucket_resize_and_crop_size, make_buckets

# SDXL's training buckets (Podell et al. 2023, appendix I), as (height, width); symmetric, so the order of each
# pair does not matter here.
SDXL_BUCKETS = {
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
}
SDXL_BUCKETS |= {(w, h) for h, w in SDXL_BUCKETS}

SETTINGS = [
    dict(resolution=512),
    dict(resolution=768),
    dict(resolution=1024),
    dict(resolution=512, step=32),
    dict(resolution=640, step=64, min_side=128, max_side=2048),
    dict(resolution=512, max_area=512 * 640),
]


def _log_distance(size, bucket):
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def test_sdxl_buckets_are_the_published_list_less_the_redundant_ones():
    buckets = make_buckets(1024)
    assert len(buckets) == 33
    assert set(buckets) <= SDXL_BUCKETS
    # The published ones left out each have a bucket one step longer on a side that still fits the area.
    left_out = SDXL_BUCKETS - set(buckets)
    assert left_out == {(704, 1344), (832, 1152), (896, 1088), (960, 1024)} | {
        (1344, 704), (1152, 832), (1088, 896), (1024, 960)}
    for expected in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536), (512, 2048)]:
        assert expected in buckets
    assert buckets[0] == (2048, 512) and buckets[-1] == (512, 2048)


def test_sd_buckets_at_512():
    assert make_buckets(512) == [
        (1024, 256), (960, 256), (896, 256), (832, 256), (768, 320), (704, 320), (640, 384), (576, 448), (512, 512),
        (448, 576), (384, 640), (320, 704), (320, 768), (256, 832), (256, 896), (256, 960), (256, 1024),
    ]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_buckets_keep_their_limits_and_are_as_large_as_allowed(settings):
    step = settings.get("step", 64)
    resolution = settings["resolution"]
    min_side = settings.get("min_side", resolution // 2 // step * step)
    max_side = settings.get("max_side", resolution * 2)
    max_area = settings.get("max_area", resolution * resolution)
    buckets = make_buckets(**settings)
    assert len(set(buckets)) == len(buckets)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)
    assert {(w, h) for h, w in buckets} == set(buckets)  # portrait and landscape alike
    square = math.isqrt(max_area) // step * step
    assert (square, square) in buckets
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert min_side <= h <= max_side and min_side <= w <= max_side
        assert h * w <= max_area
        if h != w:  # at least one side cannot grow by a step without breaking a limit (the square may)
            taller_fits = h + step <= max_side and (h + step) * w <= max_area
            wider_fits = w + step <= max_side and h * (w + step) <= max_area
            assert not (taller_fits and wider_fits), (h, w)


def test_square_is_the_resolution_with_the_default_area():
    for resolution in (64, 256, 512, 768, 1024, 1536):
        assert (resolution, resolution) in make_buckets(resolution)


def test_output_is_deterministic():
    assert make_buckets(1024) == make_buckets(1024)
    assert make_buckets(768, step=32) == make_buckets(768, step=32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=512, step=0), "step must be positive"),
        (dict(resolution=500), "multiple of the bucket step 64"),
        (dict(resolution=512, min_side=100), "min_side 100 must be a positive multiple"),
        (dict(resolution=512, max_side=1000), "max_side 1000 must be a positive multiple"),
        (dict(resolution=512, min_side=576), "min_side <= resolution <= max_side"),
        (dict(resolution=512, max_side=448), "min_side <= resolution <= max_side"),
        (dict(resolution=512, max_area=200 * 200), "no bucket fits"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_buckets(**kwargs)


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_every_image_goes_to_the_bucket_closest_in_aspect_ratio(settings):
    buckets = make_buckets(**settings)
    rng = random.Random(0)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(2000)]
    sizes += [(h, w) for h, w in buckets] + [(2 * h, 2 * w) for h, w in buckets]
    for size in sizes:
        chosen = assign_bucket(size, buckets)
        best = min(_log_distance(size, bucket) for bucket in buckets)
        assert _log_distance(size, chosen) <= best + 1e-12, (size, chosen)


def test_an_image_of_a_bucket_shape_goes_to_that_bucket():
    buckets = make_buckets(1024)
    for h, w in buckets:
        assert assign_bucket((h * 3, w * 3), buckets) == (h, w)
        assert assign_bucket((h // 64, w // 64), buckets) == (h, w)


def test_extreme_aspect_ratios_go_to_the_most_extreme_buckets():
    buckets = make_buckets(512)
    assert assign_bucket((10_000, 10), buckets) == buckets[0] == (1024, 256)
    assert assign_bucket((10, 10_000), buckets) == buckets[-1] == (256, 1024)
    assert assign_bucket((1, 1), buckets) == (512, 512)


def test_a_tie_goes_to_the_larger_bucket_then_the_first():
    # 2x3 and 3x2 are equally far from a square image (|log 2/3| = |log 3/2|): no area to prefer, the first wins.
    assert assign_bucket((100, 100), [(128, 192), (192, 128)]) == (128, 192)
    assert assign_bucket((100, 100), [(192, 128), (128, 192)]) == (192, 128)
    # 64x256 (1:4) and 256x256 (1:1) are equally far from a 1:2 image: the larger bucket wins, in either order.
    assert assign_bucket((50, 100), [(64, 256), (256, 256)]) == (256, 256)
    assert assign_bucket((50, 100), [(256, 256), (64, 256)]) == (256, 256)


def test_assign_bucket_refuses_empty_input():
    with pytest.raises(ValueError, match="no buckets"):
        assign_bucket((10, 10), [])
    with pytest.raises(ValueError, match="positive"):
        assign_bucket((0, 10), [(64, 64)])


@pytest.mark.parametrize(
    "size, bucket, resized, offset",
    [
        ((1000, 1000), (512, 512), (512, 512), (0, 0)),
        ((1000, 2000), (512, 512), (512, 1024), (0, 512)),  # wide: fit the height, crop the width
        ((3000, 1000), (768, 320), (960, 320), (192, 0)),  # taller than the bucket: fit the width
        ((100, 150), (512, 768), (512, 768), (0, 0)),  # upscaled, exactly the bucket's shape
        ((333, 500), (320, 512), (341, 512), (21, 0)),  # rounded to the nearest pixel
    ],
)
def test_resize_covers_the_bucket_and_the_crop_fits(size, bucket, resized, offset):
    assert bucket_resize_and_crop_size(size, bucket) == (resized, offset)


def test_resize_keeps_the_aspect_ratio_and_never_undershoots():
    buckets = make_buckets(1024)
    rng = random.Random(1)
    for _ in range(2000):
        size = (rng.randint(1, 6000), rng.randint(1, 6000))
        bucket = assign_bucket(size, buckets)
        (rh, rw), (top, left) = bucket_resize_and_crop_size(size, bucket)
        assert rh >= bucket[0] and rw >= bucket[1]
        assert (top, left) == (rh - bucket[0], rw - bucket[1]) and min(top, left) == 0
        scale = max(bucket[0] / size[0], bucket[1] / size[1])
        assert abs(rh - size[0] * scale) <= 0.5 + 1e-9 and abs(rw - size[1] * scale) <= 0.5 + 1e-9
