"""The training data set: examples -> (pixel tensor, caption) items that are the same on every replay.

Owns the per-item random numbers and the epoch order. Every random choice for an item (crop offset,
flip, caption template and shuffle) comes from generators seeded by the string "(seed)-(epoch)-(index)-..."
(Python seeds a `random.Random` from a string through SHA-512, unlike `hash()`, which changes per process),
so an item depends on nothing but its key: not on the loader worker that builds it, the order items are
asked for, or whether the run was resumed.
"""

import random

import torch
from PIL import Image
from torch.utils.data import Dataset

from conjure.data.captions import CaptionTransform
from conjure.data.images import load_image_with_size, load_mask, prepare_image_and_mask, resize_shorter_side
from conjure.data.sources import Example


class TrainDataset(Dataset):
    """Items keyed by (epoch, index), each `{"pixel_values": [3, R, R] tensor, "caption": str, "loss_weight": float, "index": int,
    "original_size": (height, width), "crop_top_left": (top, left)}` (+ "mask": [1, R, R] in [0, 1] for an
    example with a loss mask, cropped and flipped with its image); the size and crop are SDXL's size and crop
    conditioning (`conjure.data.images.load_image_with_size`, `prepare_image_with_crop`).

    `keep_in_memory` keeps each decoded image, already resized to a shorter side of `resolution`, so later
    epochs skip decoding; items are identical either way. The cache lives in the process that fills it: with
    a DataLoader it only survives epochs with `num_workers=0` or `persistent_workers=True`, and each worker
    holds its own copy. An image that stopped being readable after the scan raises `ImageError`.
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        keep_in_memory: bool,
        caption_transform: CaptionTransform,
        seed: int,
        class_caption_transform: CaptionTransform | None = None,
    ) -> None:
        self.examples = list(examples)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.keep_in_memory = keep_in_memory
        self.caption_transform = caption_transform
        # Class (regularisation) images keep their captions: no prefix, token or trigger word.
        self.class_caption_transform = class_caption_transform or CaptionTransform()
        self.seed = seed
        self._cache: dict[int, tuple[Image.Image, tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        example = self.examples[index]
        image, original_size = self._image(index)
        mask = load_mask(example.mask) if example.mask is not None else None
        pixel_values, crop_top_left, mask_values = prepare_image_and_mask(
            image,
            mask,
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            rng=item_rng(self.seed, epoch, index, "image"),
        )
        transform = self.class_caption_transform if example.is_class else self.caption_transform
        caption = transform(example.caption, item_rng(self.seed, epoch, index, "caption"))
        return {
            "pixel_values": pixel_values,
            "caption": caption,
            "loss_weight": example.loss_weight,
            "index": index,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            **({"mask": mask_values} if mask_values is not None else {}),
        }

    def _image(self, index: int) -> tuple[Image.Image, tuple[int, int]]:
        """The decoded image of example `index` (resized to the shorter side when it is to be cached) and
        its original (height, width)."""
        if index in self._cache:
            return self._cache[index]
        image, original_size = load_image_with_size(self.examples[index].image)
        if self.keep_in_memory:
            # prepare_image skips its resize for an image already at the resolution, so cached and
            # uncached items go through exactly the same resampling.
            image = resize_shorter_side(image, self.resolution)
            self._cache[index] = (image, original_size)
        return image, original_size


def item_rng(seed: int, epoch: int, index: int, stream: str) -> random.Random:
    """The generator for one item's `stream` ("image" or "caption"). Separate streams keep the captions of
    a run unchanged when only an image option (crop, flip) changes, and the other way round."""
    return random.Random(f"{seed}-{epoch}-{index}-{stream}")


def collate(batch: list[dict]) -> dict:
    """Items -> one batch with the same keys: `pixel_values` stacked to [B, 3, R, R]; `mask` [B, 1, R, R]
    when any item has one (ones for the others); `loss_weight` as a
    [B] float tensor (when every item has one); `caption`, `index`,
    and `original_size` and `crop_top_left` (as tuples of ints, when every item has them), as lists."""
    out = {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "index": [item["index"] for item in batch],
    }
    if any("mask" in item for item in batch):  # images without a mask count everywhere
        out["mask"] = torch.stack([item.get("mask", torch.ones_like(item["pixel_values"][:1])) for item in batch])
    if all("loss_weight" in item for item in batch):
        out["loss_weight"] = torch.tensor([float(item["loss_weight"]) for item in batch])
    for key in ("original_size", "crop_top_left"):
        if all(key in item for item in batch):
            out[key] = [tuple(int(v) for v in item[key]) for item in batch]
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in `epoch`: a permutation of range(n) that depends only on
    (seed, epoch), drawn by `random.Random(f"{seed}-epoch-{epoch}").shuffle`, so a resumed run visits the
    rest of an epoch in the same order as the run it continues."""
    order = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    return order
