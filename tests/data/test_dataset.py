"""TrainDataset items depend only on (seed, epoch, index); caching changes nothing; epoch orders replay."""

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.data.captions import CaptionTransform
from conjure.data.dataset import TrainDataset, collate, epoch_order
from conjure.data.example import Example


@pytest.fixture
def examples(tmp_path):
    """Three non-square, non-symmetric images (so crops and flips show), one with a caption."""
    rng = np.random.default_rng(0)
    made = []
    for number, size in enumerate([(48, 32), (32, 40), (50, 50)]):
        path = tmp_path / f"{number}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        made.append(Example(path, "red, blue, green, hat" if number == 0 else None))
    return made


def _dataset(examples, **overrides) -> TrainDataset:
    settings = dict(
        resolution=24,
        center_crop=False,
        random_flip=True,
        keep_in_memory=False,
        caption_transform=CaptionTransform(shuffle_delimiter=",", preset="object", placeholder="<tok>"),
        seed=5,
    )
    return TrainDataset(examples, **(settings | overrides))


def test_item_shape_and_fields(examples):
    dataset = _dataset(examples)
    assert len(dataset) == 3
    item = dataset[(0, 1)]
    assert item["pixel_values"].shape == (3, 24, 24) and item["pixel_values"].dtype == torch.float32
    assert item["index"] == 1 and "<tok>" in item["caption"]


def test_same_key_gives_identical_items_even_from_another_dataset_object(examples):
    first, second = _dataset(examples), _dataset(examples)
    for key in [(0, 0), (3, 2), (7, 1)]:
        a, b = first[key], second[key]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    # asking in another order changes nothing either
    assert torch.equal(first[(0, 0)]["pixel_values"], second[(0, 0)]["pixel_values"])


def test_epochs_differ_in_crop_flip_and_caption(examples):
    dataset = _dataset(examples)
    pixels = [dataset[(epoch, 0)]["pixel_values"] for epoch in range(8)]
    captions = {dataset[(epoch, 0)]["caption"] for epoch in range(8)}
    distinct = {tuple(p.flatten().tolist()) for p in pixels}
    assert len(distinct) > 1 and len(captions) > 1
    templates = {dataset[(epoch, 1)]["caption"] for epoch in range(8)}
    assert len(templates) > 1


def test_different_seeds_differ(examples):
    one, two = _dataset(examples, seed=1)[(0, 0)], _dataset(examples, seed=2)[(0, 0)]
    assert not torch.equal(one["pixel_values"], two["pixel_values"])


def test_centre_crop_without_flip_is_the_same_every_epoch(examples):
    dataset = _dataset(examples, center_crop=True, random_flip=False)
    assert torch.equal(dataset[(0, 0)]["pixel_values"], dataset[(9, 0)]["pixel_values"])


@pytest.mark.parametrize("center_crop", [True, False])
def test_keep_in_memory_gives_identical_items(examples, center_crop):
    plain = _dataset(examples, center_crop=center_crop)
    cached = _dataset(examples, center_crop=center_crop, keep_in_memory=True)
    for epoch in range(3):  # the first epoch fills the cache, later ones read it
        for index in range(3):
            a, b = plain[(epoch, index)], cached[(epoch, index)]
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]


def test_keep_in_memory_skips_decoding_after_the_first_epoch(examples):
    dataset = _dataset(examples, keep_in_memory=True)
    before = dataset[(0, 2)]["pixel_values"]
    examples[2].image.unlink()
    assert torch.equal(dataset[(0, 2)]["pixel_values"], before)


def test_image_broken_after_the_scan_is_reported_once_and_the_next_one_stands_in(examples, capsys):
    """A file that breaks mid-run must not stop the run: it is named once and skipped from then on."""
    from conjure.errors import ConjureError

    dataset = _dataset(examples)
    examples[1].image.write_bytes(b"")
    item = dataset[(0, 1)]
    assert item["index"] == 2 and torch.equal(item["pixel_values"], dataset[(0, 2)]["pixel_values"])
    dataset[(1, 1)]
    err = capsys.readouterr().err
    assert err.count(str(examples[1].image)) == 1 and "skipping" in err
    for example in examples:
        example.image.write_bytes(b"")
    with pytest.raises(ConjureError, match="no readable images left"):
        dataset[(0, 0)]


def test_collate_stacks_pixels_and_lists_the_rest(examples):
    dataset = _dataset(examples)
    batch = collate([dataset[(0, 2)], dataset[(0, 0)]])
    assert batch["pixel_values"].shape == (2, 3, 24, 24)
    assert batch["index"] == [2, 0] and len(batch["caption"]) == 2


def test_works_with_a_dataloader_and_workers(examples):
    dataset = _dataset(examples)
    keys = [(4, index) for index in epoch_order(len(dataset), seed=5, epoch=4)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, sampler=keys, collate_fn=collate, num_workers=2
    )
    batches = list(loader)
    direct = collate([dataset[key] for key in keys[:2]])
    assert torch.equal(batches[0]["pixel_values"], direct["pixel_values"])
    assert batches[0]["caption"] == direct["caption"]


def test_epoch_order_is_a_deterministic_permutation():
    order = epoch_order(50, seed=3, epoch=2)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=3, epoch=2)
    assert order != epoch_order(50, seed=3, epoch=3)
    assert order != epoch_order(50, seed=4, epoch=2)
    assert epoch_order(0, seed=1, epoch=0) == []
