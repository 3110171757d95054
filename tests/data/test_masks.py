"""Loss masks: found beside images or named in JSONL, cropped and flipped exactly with their image, batched,
and passed to the loss."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.data.dataset import TrainDataset, collate
from conjure.data.captions import CaptionTransform
from conjure.data.images import prepare_image_and_mask
from conjure.data.example import Example
from conjure.data.sources import MASK_SUFFIX, scan_source


def gradient_image(width=96, height=64):
    """Red encodes x, green y: any crop or flip shows in the pixels."""
    x = np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))
    y = np.tile(np.linspace(0, 255, height, dtype=np.float64)[:, None], (1, width))
    rgb = np.stack([x, y, np.zeros_like(x)], axis=-1).round().astype(np.uint8)
    return Image.fromarray(rgb), Image.fromarray(rgb[..., 0])  # the mask is the red channel


@pytest.mark.parametrize("size", [64, (48, 80), (80, 48)], ids=["square", "wide-bucket", "tall-bucket"])
@pytest.mark.parametrize("seed", range(8))
def test_mask_gets_the_images_crop_and_flip(seed, size):
    image, mask = gradient_image()
    pixels, (top, left), mask_values, _ = prepare_image_and_mask(
        image, mask, size, center_crop=False, random_flip=True, rng=random.Random(seed))
    red = (pixels[0] + 1) * 127.5
    assert mask_values.shape == (1, *((size, size) if isinstance(size, int) else size)) == (1, *red.shape)
    torch.testing.assert_close(mask_values[0] * 255, red, atol=0.51, rtol=0)
    # and the same draws as without a mask
    plain, crop, none, _ = prepare_image_and_mask(image, None, size, center_crop=False, random_flip=True,
                                               rng=random.Random(seed))
    assert torch.equal(plain, pixels) and crop == (top, left) and none is None


def test_a_mask_of_another_size_is_scaled_to_its_image_first():
    image, mask = gradient_image(192, 128)
    _, _, mask_values, _ = prepare_image_and_mask(image, mask.resize((96, 64)), 64, center_crop=True,
                                               random_flip=False, rng=random.Random(0))
    pixels, _, full, _ = prepare_image_and_mask(image, mask, 64, center_crop=True, random_flip=False,
                                             rng=random.Random(0))
    assert (mask_values - full).abs().mean() < 0.02


def test_sources_find_masks_beside_images_and_in_jsonl(tmp_path):
    image, mask = gradient_image()
    image.save(tmp_path / "a.png")
    mask.save(tmp_path / f"a{MASK_SUFFIX}")
    image.save(tmp_path / "b.png")
    examples = scan_source(tmp_path).examples
    assert examples == [Example(tmp_path / "a.png", None, mask=tmp_path / f"a{MASK_SUFFIX}"),
                        Example(tmp_path / "b.png", None)]  # the mask file is not an image to train on
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"image": "b.png", "text": "x", "mask": f"a{MASK_SUFFIX}"}) + "\n"
        + json.dumps({"image": "a.png", "mask": "missing.png"}) + "\n")
    scan = scan_source(tmp_path / "data.jsonl")
    assert scan.examples == [Example(tmp_path / "b.png", "x", mask=tmp_path / f"a{MASK_SUFFIX}")]
    assert scan.skipped[0][0] == tmp_path / "a.png" and "mask file not found" in scan.skipped[0][1]


def test_batches_carry_masks_with_ones_for_images_without(tmp_path):
    image, mask = gradient_image()
    image.save(tmp_path / "a.png")
    mask.save(tmp_path / f"a{MASK_SUFFIX}")
    image.save(tmp_path / "b.png")
    dataset = TrainDataset(scan_source(tmp_path).examples, resolution=64, center_crop=True, random_flip=True,
                           keep_in_memory=True, caption_transform=CaptionTransform(), seed=0)
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch["mask"].shape == (2, 1, 64, 64)
    assert torch.equal(batch["mask"][1], torch.ones(1, 64, 64))
    assert 0.3 < batch["mask"][0].mean() < 0.7


def test_masks_reach_the_loss_in_a_run(tmp_path, tiny_models, monkeypatch):
    import conjure.train.loss as loss
    from conjure.config import parse_config
    from conjure.train.loop import train

    image, mask = gradient_image()
    for name in ("a", "b"):
        image.save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("zwx gradient")
    mask.save(tmp_path / f"a{MASK_SUFFIX}")
    seen = []
    real = loss.denoising_loss

    def spy(*args, mask=None, **kwargs):
        seen.append(mask)
        return real(*args, mask=mask, **kwargs)

    monkeypatch.setattr(loss, "denoising_loss", spy)
    train(parse_config({
        "type": "lora",
        "basic": {"base_model": str(tiny_models("sd1")), "output_dir": str(tmp_path / "runs"), "max_train_steps": 2,
                  "validate_every_n_steps": None},
        "data": {"source": str(tmp_path), "resolution": 64, "batch_size": 2},
        "lora": {"trigger_word": "zwx", "rank": 2},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
    }))
    assert len(seen) == 2 and all(m is not None and m.shape == (2, 1, 64, 64) for m in seen)
