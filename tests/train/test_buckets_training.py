"""Aspect-ratio buckets in training: each image trains at its bucket's size, a batch holds one size, every
example is seen once per epoch, SDXL's size ids say the bucket, and resume stays exact."""

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.config import parse_config
from conjure.data.buckets import assign_bucket, make_buckets
from conjure.data.captions import CaptionTransform
from conjure.data.dataset import TrainDataset, batches_per_epoch, epoch_batches
from conjure.data.example import Example
from conjure.train.control import TrainControl
from conjure.train.loop import train

SHAPES = [(64, 64), (48, 120), (120, 48), (40, 100), (70, 70), (50, 130), (130, 50)]  # (height, width)


@pytest.fixture
def odd_images(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zwx shape")
    return folder


def test_items_take_their_buckets_size(odd_images):
    buckets = make_buckets(64, step=16)
    examples = [Example(p, "x") for p in sorted(odd_images.glob("*.png"), key=lambda p: int(p.stem))]
    dataset = TrainDataset(examples, resolution=64, center_crop=False, random_flip=True, keep_in_memory=True,
                           caption_transform=CaptionTransform(), seed=0, buckets=buckets)
    for index, (h, w) in enumerate(SHAPES):
        expected = assign_bucket((h, w), buckets)
        item = dataset[(0, index)]
        assert item["target_size"] == expected == dataset.sizes[index]
        assert item["pixel_values"].shape == (3, *expected)
        assert item["original_size"] == (h, w)
        assert expected[0] * expected[1] <= 64 * 64
    assert dataset.sizes[1][1] > dataset.sizes[1][0] and dataset.sizes[2][0] > dataset.sizes[2][1]  # wide, tall
    cached = dataset[(1, 3)]["pixel_values"]
    fresh = TrainDataset(examples, resolution=64, center_crop=False, random_flip=True, keep_in_memory=False,
                         caption_transform=CaptionTransform(), seed=0, buckets=buckets)[(1, 3)]["pixel_values"]
    assert torch.equal(cached, fresh)  # the in-memory copy changes nothing


def test_batches_hold_one_size_and_cover_the_epoch():
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 4
    for epoch in range(3):
        batches = epoch_batches(sizes, 2, seed=5, epoch=epoch)
        assert len(batches) == batches_per_epoch(sizes, 2) == 3 + 2 + 2
        assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
        assert all(len({sizes[i] for i in b}) == 1 for b in batches)
        assert batches == epoch_batches(sizes, 2, seed=5, epoch=epoch)  # deterministic
    assert epoch_batches(sizes, 2, seed=5, epoch=0) != epoch_batches(sizes, 2, seed=5, epoch=1)


def raw_config(tiny_models, folder, tmp_path, family="sd1", **basic):
    return {
        "type": "lora",
        "basic": {"base_model": str(tiny_models(family)), "output_dir": str(tmp_path / "runs"), "run_name": "run",
                  "max_train_steps": 4, "save_every_n_steps": 4, "validate_every_n_steps": None, "seed": 2, **basic},
        "data": {"source": str(folder), "resolution": 64, "batch_size": 2, "aspect_ratio_buckets": True,
                 "bucket_step": 16, "center_crop": False, "random_flip": True},
        "lora": {"trigger_word": "zwx", "rank": 2, "save_dtype": "fp32"},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
    }


def test_an_sdxl_run_trains_at_bucket_sizes_with_matching_size_ids(tiny_models, odd_images, tmp_path, monkeypatch):
    import conjure.train.conditioning as conditioning

    seen = []
    real = conditioning.encode_captions

    def spy(pairs, captions, device, **kwargs):
        cond = real(pairs, captions, device, **kwargs)
        seen.append((kwargs["target_sizes"], cond["added_cond_kwargs"]["time_ids"]))
        return cond

    monkeypatch.setattr(conditioning, "encode_captions", spy)
    result = train(parse_config(raw_config(tiny_models, odd_images, tmp_path, "sdxl", max_train_steps=6)))
    assert result.step == 6
    targets = {t for sizes, _ in seen for t in sizes}
    assert len(targets) > 1 and all(len(set(sizes)) == 1 for sizes, _ in seen)
    for sizes, time_ids in seen:
        assert time_ids[:, 4:].tolist() == [list(map(float, s)) for s in sizes]


def test_resume_with_buckets_matches_an_uninterrupted_run(tiny_models, odd_images, tmp_path):
    raw = raw_config(tiny_models, odd_images, tmp_path)
    straight = train(parse_config(raw))
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
    raw["basic"]["run_name"] = "stopped"
    stopped = train(parse_config(raw), control=control)
    resumed = train(parse_config(raw), resume=str(stopped.run_dir))
    a = torch.load(straight.checkpoints[-1] / "training_state.pt", weights_only=False)["method"]
    b = torch.load(resumed.checkpoints[-1] / "training_state.pt", weights_only=False)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_area_limit_reaches_the_buckets(tiny_models, odd_images, tmp_path, monkeypatch):
    import conjure.data.dataset as dataset

    seen = {}
    real = dataset.TrainDataset.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen["sizes"] = self.sizes

    monkeypatch.setattr(dataset.TrainDataset, "__init__", spy)
    raw = raw_config(tiny_models, odd_images, tmp_path, max_train_steps=1)
    raw["data"]["bucket_max_area"] = 48 * 48
    train(parse_config(raw))
    assert seen["sizes"] and all(h * w <= 48 * 48 for h, w in seen["sizes"])


def test_bad_bucket_settings_name_the_field(tiny_models, odd_images, tmp_path):
    from conjure.errors import ConjureError

    raw = raw_config(tiny_models, odd_images, tmp_path)
    raw["data"]["bucket_min_side"] = 128  # above the resolution
    with pytest.raises(ConjureError, match="data.aspect_ratio_buckets"):
        train(parse_config(raw))


def test_images_smaller_than_their_bucket_are_named_in_a_warning(tiny_models, odd_images, tmp_path, capsys):
    train(parse_config(raw_config(tiny_models, odd_images, tmp_path, max_train_steps=1)))
    assert "scaled up" not in capsys.readouterr().err  # every image here covers its bucket
    Image.new("RGB", (90, 30), (9, 9, 9)).save(odd_images / "small.png")  # 30 x 90: under its 32 x 96 bucket
    train(parse_config(raw_config(tiny_models, odd_images, tmp_path, max_train_steps=1, run_name="again")))
    err = capsys.readouterr().err
    assert "1 image(s) are smaller than their training size" in err and "small.png" in err
