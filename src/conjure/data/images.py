"""One user image, from file to training tensor.

Owns which file extensions count as images, decoding whatever PIL can open (any mode, EXIF orientation,
huge sizes) into a plain 8-bit RGB image, and the resize / crop / flip / normalise step that turns it into
the [-1, 1] tensor the VAE encodes. Nothing here knows about folders, captions or epochs.
"""

import io
import random
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from conjure.errors import ConjureError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Lower-case suffixes of the files a data folder is scanned for; compare with `path.suffix.lower()`."""

MAX_LOAD_SIDE = 4096
"""Longer side, in pixels, that images are shrunk to on load. Training crops are 512-1024 pixels, so a
24-megapixel photo decoded at full size would only cost memory and time (and with `keep_in_memory`, keep
costing it)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_TRANSPARENT_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255, 255)
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees

# What PIL raises for files it cannot decode. Its plugins are not consistent: a truncated PNG gives
# SyntaxError or OSError, a broken BMP header struct.error or ValueError, a short GIF EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class ImageError(ConjureError):
    """An image file that cannot be read; the message names the file and the reason."""


def is_image_file(path: Path) -> bool:
    """Whether `path` has one of the `IMAGE_EXTENSIONS` (case-insensitive); the file is not opened."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: Path) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image whose longer side is at most `MAX_LOAD_SIDE`.

    Transparent pixels are composited onto white, 16-bit greyscale is scaled (not clipped) to 8 bits, and
    CMYK with an embedded ICC profile is converted through it. Raises `ImageError` for anything that cannot
    be decoded: empty, truncated or non-image files, decompression bombs.
    """
    return load_image_with_size(path)[0]


def load_image_with_size(path: Path) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image(path)` and the (height, width) of the file's full image, upright (after its EXIF
    orientation) but before any shrinking on load: the "original size" SDXL is conditioned on."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: cannot read image (empty file)")
        with Image.open(path) as image:
            width, height = image.size  # before draft(), which may decode at 1/2 to 1/8 scale
            if image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            _draft_smaller(image)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
        image.thumbnail((MAX_LOAD_SIDE, MAX_LOAD_SIDE), Image.Resampling.BICUBIC)
        return image, (height, width)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: cannot read image (not an image format PIL recognises)") from None
    except _DECODE_ERRORS as error:
        raise ImageError(f"{path}: cannot read image ({_describe(error)})") from error


def _describe(error: Exception) -> str:
    """A short reason for a decode failure, without repeating the path that OSError messages carry."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _draft_smaller(image: Image.Image) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale image when the full one is far over the limit.

    Draft scaling happens inside libjpeg, so the full-size pixels never exist in memory; the requested size
    keeps the aspect ratio so the draft's longer side stays at least `MAX_LOAD_SIDE`.
    """
    longer = max(image.size)
    if image.format != "JPEG" or longer <= MAX_LOAD_SIDE:
        return
    width, height = image.size
    target = (max(1, width * MAX_LOAD_SIDE // longer), max(1, height * MAX_LOAD_SIDE // longer))
    image.draft(None, target)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, choosing the conversion that keeps what the image looks like."""
    if image.mode == "RGB":
        return image
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        return _cmyk_through_profile(image)
    return image.convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white: PIL's plain RGB conversion would show whatever colour the fully
    transparent pixels happen to store (often black), which the model would learn as part of the subject."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 0-65535 greyscale to 0-255. PIL's own conversion clips at 255, turning almost every 16-bit
    pixel white. Mode "I" (32-bit) is read the same way: Pillow gives it to 16-bit PNGs and TIFFs."""
    values = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _cmyk_through_profile(image: Image.Image) -> Image.Image:
    """Convert CMYK to sRGB with the file's own ICC profile; the naive formula PIL uses otherwise gives
    washed-out colours for print CMYK. A profile that lcms cannot use falls back to the naive formula."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):
        return image.convert("RGB")
    return converted if converted is not None else image.convert("RGB")


def prepare_image(
    image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, rng: random.Random
) -> torch.Tensor:
    """The float32 [3, resolution, resolution] tensor in [-1, 1] that the VAE encodes.

    Steps, in order: resize so the shorter side is `resolution` (skipped when it already is, so images
    cached by `resize_shorter_side` give the same result), crop a square (centred, or at an offset drawn
    from `rng`: x then y), then mirror left-right when `random_flip` and `rng.random() < 0.5`. `rng` is only
    drawn from for a random crop and for `random_flip`, in that order.
    """
    return prepare_image_with_crop(image, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng)[0]


def prepare_image_with_crop(
    image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`prepare_image` (the same tensor, the same draws from `rng`) and the crop's (top, left) in the resized
    image's pixels: SDXL's crop conditioning.

    As in diffusers' SDXL training scripts, which flip before cropping, a flipped image's left is measured
    from the flipped image's side: cropping at `left` and then mirroring shows exactly what mirroring the
    resized image and cropping at `width - resolution - left` would.
    """
    prepared = prepare_image_and_mask(image, None, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng)
    return prepared.pixels, prepared.crop_top_left


class Prepared(NamedTuple):
    pixels: torch.Tensor  # float32 [3, H, W] in [-1, 1]
    crop_top_left: tuple[int, int]
    mask: torch.Tensor | None  # float32 [1, H, W] in [0, 1]
    flipped: bool


def prepare_image_and_mask(
    image: Image.Image, mask: Image.Image | None, resolution: int | tuple[int, int], *, center_crop: bool,
    random_flip: bool, rng: random.Random,
) -> Prepared:
    """`prepare_image_with_crop`, and the same resize, crop and flip applied to a greyscale loss `mask`
    (first scaled to the image's size when it differs), as a float32 [1, H, W] tensor in [0, 1].

    `resolution` may be a (height, width) aspect-ratio bucket: the image is then scaled to cover it
    (`resize_to_cover`) and cropped to it, centred or at an offset drawn from `rng` (left, then top)."""
    height, width_out = (resolution, resolution) if isinstance(resolution, int) else resolution
    if mask is not None and mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    if height == width_out:
        image = resize_shorter_side(image, height)
        mask = resize_shorter_side(mask, height) if mask is not None else None
    else:
        image = resize_to_cover(image, (height, width_out))
        mask = resize_to_cover(mask, (height, width_out)) if mask is not None else None
    width = image.width
    if center_crop:
        left, top = (image.width - width_out) // 2, (image.height - height) // 2
    else:
        left, top = rng.randint(0, image.width - width_out), rng.randint(0, image.height - height)
    box = (left, top, left + width_out, top + height)
    image, mask = image.crop(box), (mask.crop(box) if mask is not None else None)
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        left = width - width_out - left
    mask_tensor = None
    if mask is not None:
        mask_tensor = torch.from_numpy(np.array(mask, dtype=np.uint8)).to(torch.float32)[None] / 255.0
    return Prepared(to_tensor(image), (top, left), mask_tensor, flipped)


def load_mask(path: Path) -> Image.Image:
    """A loss mask file as an upright 8-bit greyscale image (white: counts fully, black: not at all)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: cannot read mask (empty file)")
        with Image.open(path) as mask:
            mask.load()
            mask = ImageOps.exif_transpose(mask)
            mask = mask.convert("L") if mask.mode not in _SIXTEEN_BIT_MODES else _sixteen_bit_to_rgb(mask).convert("L")
        mask.thumbnail((MAX_LOAD_SIDE, MAX_LOAD_SIDE), Image.Resampling.BILINEAR)
        return mask
    except FileNotFoundError:
        raise ImageError(f"{path}: mask file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: cannot read mask (not an image format PIL recognises)") from None
    except _DECODE_ERRORS as error:
        raise ImageError(f"{path}: cannot read mask ({_describe(error)})") from error


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale `image` so its shorter side is exactly `resolution`, keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) == resolution:
        return image
    if width <= height:
        size = (resolution, max(resolution, round(height * resolution / width)))
    else:
        size = (max(resolution, round(width * resolution / height)), resolution)
    # reducing_gap first shrinks by a whole factor with a box filter; at 3.0 Pillow documents the result as
    # indistinguishable from plain bicubic, and it is several times faster on phone-sized photos.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def resize_to_cover(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale `image` (keeping its aspect ratio) to the smallest size that covers the (height, width) `bucket`
    (`conjure.data.buckets.bucket_resize_and_crop_size`); unchanged when it already has that size."""
    from conjure.data.buckets import bucket_resize_and_crop_size

    (height, width), _ = bucket_resize_and_crop_size((image.height, image.width), bucket)
    if (image.height, image.width) == (height, width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def image_size(path: Path) -> tuple[int, int]:
    """The upright (height, width) of an image file from its header (EXIF orientation applied), without
    decoding the pixels; raises `ImageError` when it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
        return height, width
    except (UnidentifiedImageError, *_DECODE_ERRORS) as error:
        raise ImageError(f"{path}: cannot read image ({_describe(error)})") from None


def crop_square(image: Image.Image, resolution: int, *, center: bool, rng: random.Random) -> Image.Image:
    """Cut a `resolution` square from an image at least that large on both sides."""
    left, top = square_crop_offset(image.width, image.height, resolution, center=center, rng=rng)
    return image.crop((left, top, left + resolution, top + resolution))


def square_crop_offset(
    width: int, height: int, resolution: int, *, center: bool, rng: random.Random
) -> tuple[int, int]:
    """(left, top) of a `resolution` square in a width x height image: centred (rounded down), or drawn
    from `rng` (left, then top)."""
    if center:
        return (width - resolution) // 2, (height - resolution) // 2
    return rng.randint(0, width - resolution), rng.randint(0, height - resolution)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1], the range Stable Diffusion's VAE was trained on."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.to(torch.float32) / 127.5 - 1.0
