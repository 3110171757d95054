"""SDXL size and crop conditioning from the data layer: each item's original (height, width) and the crop's
(top, left) in the resized image, measured from the flipped side after a flip (as diffusers' SDXL scripts
do); the pixels themselves are unchanged, and collate / encode_captions pass the values on."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.data import images
from conjure.data.captions import CaptionTransform
from conjure.data.dataset import TrainDataset, collate, item_rng
from conjure.data.images import (
    load_image,
    load_image_with_size,
    prepare_image,
    prepare_image_with_crop,
    resize_shorter_side,
    to_tensor,
)
from conjure.data.example import Example
from conjure.train.conditioning import encode_captions, sdxl_time_ids

RESOLUTION = 20


@pytest.fixture
def wide(tmp_path):
    """A 60 x 40 (width x height) noise image: resized to 30 x 20, so crops move left-right only."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return Example(path, None)


@pytest.fixture
def tall(tmp_path):
    """A 40 x 100 noise image: resized to 20 x 50, so crops move up-down only."""
    path = tmp_path / "tall.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (100, 40, 3), dtype=np.uint8)).save(path)
    return Example(path, None)


def dataset(examples, **overrides) -> TrainDataset:
    settings = dict(
        resolution=RESOLUTION, center_crop=False, random_flip=True, keep_in_memory=False,
        caption_transform=CaptionTransform(preset="object", placeholder="<tok>"), seed=11,
    )
    return TrainDataset(examples, **(settings | overrides))


def crop_of(image: Image.Image, top: int, left: int) -> torch.Tensor:
    return to_tensor(image.crop((left, top, left + RESOLUTION, top + RESOLUTION)))


def test_centre_crop(wide, tall):
    data = dataset([wide, tall], center_crop=True, random_flip=False)
    first, second = data[(0, 0)], data[(0, 1)]
    assert first["original_size"] == (40, 60) and first["crop_top_left"] == (0, 5)  # (30 - 20) // 2
    assert second["original_size"] == (100, 40) and second["crop_top_left"] == (15, 0)  # (50 - 20) // 2
    resized = resize_shorter_side(load_image(wide.image), RESOLUTION)
    assert torch.equal(first["pixel_values"], crop_of(resized, 0, 5))


@pytest.mark.parametrize("center_crop", [False, True])
def test_crop_position_reproduces_the_pixels_with_and_without_flip(wide, tall, center_crop):
    """Unflipped: the crop of the resized image at (top, left). Flipped: the crop of the *flipped* resized
    image at (top, left), i.e. the position diffusers' scripts report (they flip first, then crop)."""
    data = dataset([wide, tall], center_crop=center_crop)
    seen = {"flipped": set(), "plain": set()}
    for index, example in enumerate([wide, tall]):
        resized = resize_shorter_side(load_image(example.image), RESOLUTION)
        mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for epoch in range(12):
            item = data[(epoch, index)]
            top, left = item["crop_top_left"]
            assert 0 <= top <= resized.height - RESOLUTION and 0 <= left <= resized.width - RESOLUTION
            if torch.equal(item["pixel_values"], crop_of(resized, top, left)):
                seen["plain"].add((index, top, left))
            else:
                assert torch.equal(item["pixel_values"], crop_of(mirrored, top, left)), (epoch, index)
                seen["flipped"].add((index, top, left))
    assert seen["plain"] and seen["flipped"]  # both cases were exercised
    if center_crop:  # a centred crop of the 30-wide image is symmetric: flipping leaves left at 5
        assert {(t, l) for i, t, l in seen["plain"] | seen["flipped"] if i == 0} == {(0, 5)}
    else:  # random crops reach several offsets, along the long side only
        assert len({l for i, _, l in seen["plain"] | seen["flipped"] if i == 0}) > 2
        assert len({t for i, t, _ in seen["plain"] | seen["flipped"] if i == 1}) > 2
        assert {l for i, _, l in seen["plain"] | seen["flipped"] if i == 1} == {0}


def test_flipped_left_is_measured_from_the_other_side():
    """A random crop drawn at left=L in the 30-wide image is reported as 10 - L once flipped."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for seed in range(40):
        rng = random.Random(seed)
        left, top = rng.randint(0, 10), rng.randint(0, 0)
        flipped = rng.random() < 0.5
        tensor, crop = prepare_image_with_crop(image, RESOLUTION, center_crop=False, random_flip=True,
                                               rng=random.Random(seed))
        assert crop == (top, 10 - left if flipped else left)
        assert torch.equal(tensor, prepare_image(image, RESOLUTION, center_crop=False, random_flip=True,
                                                 rng=random.Random(seed)))


def test_items_are_the_same_pixels_as_before(wide, tall):
    """The pixels are exactly what prepare_image made from the item's generator: determinism unchanged."""
    for keep in (False, True):
        data = dataset([wide, tall], keep_in_memory=keep)
        for epoch in range(3):
            for index, example in enumerate([wide, tall]):
                expected = prepare_image(load_image(example.image), RESOLUTION, center_crop=False, random_flip=True,
                                         rng=item_rng(11, epoch, index, "image"))
                item = data[(epoch, index)]
                assert torch.equal(item["pixel_values"], expected)


def test_keep_in_memory_keeps_the_original_size(wide, tall):
    plain, cached = dataset([wide, tall]), dataset([wide, tall], keep_in_memory=True)
    for epoch in range(3):  # the first epoch fills the cache
        for index in range(2):
            a, b = plain[(epoch, index)], cached[(epoch, index)]
            assert (a["original_size"], a["crop_top_left"]) == (b["original_size"], b["crop_top_left"])
    assert cached[(5, 0)]["original_size"] == (40, 60)


def test_original_size_is_upright_and_before_the_shrink_on_load(tmp_path, monkeypatch):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 20 wide, 40 high
    stored.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image, size = load_image_with_size(tmp_path / "turned.jpg")
    assert image.size == (20, 40) and size == (40, 20)

    monkeypatch.setattr(images, "MAX_LOAD_SIDE", 64)
    Image.new("RGB", (400, 100), (9, 9, 9)).save(tmp_path / "big.jpg")  # decoded in draft mode
    Image.new("RGB", (100, 300), (9, 9, 9)).save(tmp_path / "big.png")
    image, size = load_image_with_size(tmp_path / "big.jpg")
    assert image.size == (64, 16) and size == (100, 400)
    image, size = load_image_with_size(tmp_path / "big.png")
    assert image.size == (21, 64) and size == (300, 100)


def test_collate_lists_sizes_and_crops_as_tuples(wide, tall):
    data = dataset([wide, tall], center_crop=True, random_flip=False)
    batch = collate([data[(0, 1)], data[(0, 0)]])
    assert batch["original_size"] == [(100, 40), (40, 60)]
    assert batch["crop_top_left"] == [(15, 0), (0, 5)]
    assert all(type(v) is int for pair in batch["original_size"] + batch["crop_top_left"] for v in pair)
    # items without the keys (other data sets) still collate, without them
    bare = [{k: item[k] for k in ("pixel_values", "caption", "index")} for item in (data[(0, 0)], data[(0, 1)])]
    assert "original_size" not in collate(bare)


def test_works_with_dataloader_workers(wide, tall):
    data = dataset([wide, tall])
    keys = [(2, 0), (2, 1)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=keys, collate_fn=collate, num_workers=1)
    (batch,) = list(loader)
    direct = collate([data[key] for key in keys])
    assert batch["original_size"] == direct["original_size"] and batch["crop_top_left"] == direct["crop_top_left"]


class _Tokens:
    def __init__(self, n):
        self.input_ids = torch.zeros(n, 4, dtype=torch.long)


class _Tokenizer:
    model_max_length = 4

    def __call__(self, captions, **kwargs):
        return _Tokens(len(captions))


class _Encoder:
    def __init__(self, width):
        self.width = width

    def __call__(self, ids, output_hidden_states=False):
        hidden = torch.ones(ids.shape[0], 4, self.width)
        out = (torch.ones(ids.shape[0], self.width),)
        return type("Out", (tuple,), {"hidden_states": (hidden, hidden, hidden)})(out)


def test_time_ids_carry_the_batch_sizes_and_crops(wide, tall):
    data = dataset([wide, tall], center_crop=True, random_flip=False)
    batch = collate([data[(0, 0)], data[(0, 1)]])
    pairs = [(_Tokenizer(), _Encoder(3)), (_Tokenizer(), _Encoder(5))]
    cond = encode_captions(pairs, ["a", "b"], torch.device("cpu"), resolution=RESOLUTION,
                           original_sizes=batch["original_size"], crops_top_left=batch["crop_top_left"])
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[40, 60, 0, 5, 20, 20], [100, 40, 15, 0, 20, 20]]
    default = encode_captions(pairs, ["a", "b"], torch.device("cpu"), resolution=RESOLUTION)
    assert default["added_cond_kwargs"]["time_ids"].tolist() == [[20, 20, 0, 0, 20, 20]] * 2
    with pytest.raises(ValueError, match="batch of 2"):
        sdxl_time_ids(2, RESOLUTION, torch.device("cpu"), original=[(1, 1)])
