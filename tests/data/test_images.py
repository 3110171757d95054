"""load_image turns every mode and orientation into upright RGB; prepare_image resizes, crops and flips."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.data import images
from conjure.data.images import ImageError, is_image_file, load_image, prepare_image, resize_shorter_side
from conjure.errors import ConjureError


def _pixel(path: Path, xy=(0, 0)) -> tuple[int, int, int]:
    image = load_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_extensions_are_case_insensitive():
    assert is_image_file(Path("a.JPG")) and is_image_file(Path("b.Tiff")) and is_image_file(Path("c.webp"))
    assert not is_image_file(Path("a.txt")) and not is_image_file(Path("jpg"))


def test_rgba_transparent_pixels_become_white_and_opaque_ones_stay(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (200, 10, 10, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    image.save(tmp_path / "a.png")
    assert _pixel(tmp_path / "a.png", (0, 0)) == (255, 255, 255)
    assert _pixel(tmp_path / "a.png", (1, 1)) == (200, 10, 10)
    assert all(abs(value - 127) <= 1 for value in _pixel(tmp_path / "a.png", (2, 2)))


def test_la_is_composited_on_white(tmp_path):
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((1, 1), (50, 255))
    image.save(tmp_path / "a.png")
    assert _pixel(tmp_path / "a.png", (0, 0)) == (255, 255, 255)
    assert _pixel(tmp_path / "a.png", (1, 1)) == (50, 50, 50)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "a.png", transparency=0)
    assert _pixel(tmp_path / "a.png", (0, 0)) == (255, 255, 255)
    assert _pixel(tmp_path / "a.png", (1, 1)) == (10, 200, 30)


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    image.save(tmp_path / "a.gif")
    assert _pixel(tmp_path / "a.gif") == (10, 200, 30)


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=100)
    red, green, blue = _pixel(tmp_path / "a.jpg")
    assert red > 240 and green < 15 and blue < 15


def test_cmyk_with_an_unusable_icc_profile_falls_back_to_plain_conversion(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "a.jpg", quality=100, icc_profile=b"junk" * 40)
    red, green, blue = _pixel(tmp_path / "a.jpg")
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_mid_grey_stays_mid_grey(tmp_path, suffix):
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / f"a{suffix}")
    assert Image.open(tmp_path / f"a{suffix}").mode.startswith("I")
    assert _pixel(tmp_path / f"a{suffix}") == (128, 128, 128)


def test_thirty_two_bit_integer_is_read_as_sixteen_bit(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)).save(tmp_path / "a.tif")
    assert _pixel(tmp_path / "a.tif") == (255, 255, 255)


def test_greyscale_becomes_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "a.png")
    assert _pixel(tmp_path / "a.png") == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show rotated 90 degrees clockwise
    image.save(tmp_path / "a.jpg", exif=exif, quality=100)
    loaded = load_image(tmp_path / "a.jpg")
    assert loaded.size == (20, 40)
    red, _, blue = loaded.getpixel((10, 2))  # rotated clockwise, the left edge is now on top
    assert red > 200 and blue < 50


def test_large_images_are_shrunk_on_load(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_LOAD_SIDE", 64)
    Image.new("RGB", (400, 100), (9, 9, 9)).save(tmp_path / "a.jpg")
    Image.new("RGB", (100, 300), (9, 9, 9)).save(tmp_path / "b.png")
    assert load_image(tmp_path / "a.jpg").size == (64, 16)
    assert load_image(tmp_path / "b.png").size == (21, 64)


def _truncated_png(path: Path) -> None:
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda path: path.write_bytes(b""), "empty file"),
        (_truncated_png, "truncated"),
        (lambda path: path.write_text("not an image at all"), "not an image format"),
    ],
    ids=["zero-byte", "truncated", "text"],
)
def test_unreadable_files_raise_an_image_error_naming_the_path(tmp_path, make, reason):
    path = tmp_path / "broken.png"
    make(path)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    message = str(caught.value)
    assert isinstance(caught.value, ConjureError)
    assert message.startswith(f"{path}: cannot read image (") and reason in message and "\n" not in message


def test_missing_file_raises_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="No such file"):
        load_image(tmp_path / "gone.png")


def test_resize_shorter_side_keeps_aspect_and_hits_the_resolution_exactly():
    assert resize_shorter_side(Image.new("RGB", (300, 200)), 64).size == (96, 64)
    assert resize_shorter_side(Image.new("RGB", (201, 301)), 64).size == (64, 96)
    assert resize_shorter_side(Image.new("RGB", (10, 20)), 64).size == (64, 128)
    same = Image.new("RGB", (64, 99))
    assert resize_shorter_side(same, 64) is same


def _left_red_right_blue(width=64, height=32) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_prepare_image_shape_range_and_centre_crop():
    image = _left_red_right_blue()
    tensor = prepare_image(image, 16, center_crop=True, random_flip=False, rng=random.Random(0))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, :, 0].mean() > 0.9 and tensor[2, :, -1].mean() > 0.9  # red left, blue right


def test_prepare_image_flip_is_drawn_from_the_rng():
    image = _left_red_right_blue(32, 32)
    flips = []
    for seed in range(20):
        tensor = prepare_image(image, 16, center_crop=True, random_flip=True, rng=random.Random(seed))
        flips.append(bool(tensor[2, :, 0].mean() > 0.9))  # blue on the left: flipped
        expected = random.Random(seed).random() < 0.5
        assert flips[-1] == expected
    assert any(flips) and not all(flips)


def test_prepare_image_random_crop_comes_from_the_rng():
    image = Image.fromarray(np.arange(64 * 16 * 3, dtype=np.uint32).reshape(16, 64, 3).astype(np.uint8))
    def crop(seed: int) -> torch.Tensor:
        return prepare_image(image, 16, center_crop=False, random_flip=False, rng=random.Random(seed))

    assert torch.equal(crop(3), crop(3))
    assert len({crop(seed).sum().item() for seed in range(10)}) > 1
