"""The training data set: examples -> (pixel tensor, caption) items that are the same on every replay.

Owns the per-item random numbers and the epoch order. Every random choice for an item (crop offset,
flip, caption template and shuffle) comes from generators seeded by the string "(seed)-(epoch)-(index)-..."
(Python seeds a `random.Random` from a string through SHA-512, unlike `hash()`, which changes per process),
so an item depends on nothing but its key: not on the loader worker that builds it, the order items are
asked for, or whether the run was resumed.
"""

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from conjure.data.captions import CaptionTransform
from conjure.data.images import (
    ImageError,
    image_size,
    load_image_with_size,
    load_mask,
    prepare_image_and_mask,
    resize_shorter_side,
    resize_to_cover,
)
from conjure.data.example import Example
from conjure.errors import ConjureError


class TrainDataset(Dataset):
    """Items keyed by (epoch, index), each `{"pixel_values": [3, R, R] tensor, "caption": str, "loss_weight": float, "index": int,
    "original_size": (height, width), "crop_top_left": (top, left)}` (+ "mask": [1, R, R] in [0, 1] for an
    example with a loss mask, cropped and flipped with its image); the size and crop are SDXL's size and crop
    conditioning (`conjure.data.images.load_image_with_size`, `prepare_image_with_crop`).

    `buckets`: (height, width) aspect-ratio buckets (`conjure.data.buckets`); each example trains at the one
    closest to its aspect ratio (`sizes[index]`, also the item's "target_size"), else at `resolution` square.

    `keep_in_memory` keeps each decoded image, already resized for its training size, so later
    epochs skip decoding; items are identical either way. The cache lives in the process that fills it: with
    a DataLoader it only survives epochs with `num_workers=0` or `persistent_workers=True`, and each worker
    holds its own copy. An image that stopped being readable after the scan is replaced (see `__getitem__`).
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
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        self.examples = list(examples)
        self.resolution = resolution
        # Each example's training size: its aspect-ratio bucket, or the square. Read from the files' headers.
        self._headers: dict[Path, tuple[int, int]] = {}  # upright (height, width) per file, read once
        self.sizes: list[tuple[int, int]] = [(resolution, resolution)] * len(self.examples)
        if buckets:
            from conjure.data.buckets import assign_bucket

            # repeats list an example several times: each file's header is read once (_header_size)
            self.sizes = [assign_bucket(self._header_size(example.image), buckets) for example in self.examples]
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.keep_in_memory = keep_in_memory
        self.caption_transform = caption_transform
        # Class (regularisation) images keep their captions: no prefix, token or trigger word.
        self.class_caption_transform = class_caption_transform or CaptionTransform()
        self.seed = seed
        self._cache: dict[int, tuple[Image.Image, tuple[int, int]]] = {}
        self.failed: set[int] = set()  # examples whose files stopped being readable during the run

    def upscaled(self) -> list[Path]:
        """The images smaller than their training size, which are scaled up (soft): worth a warning."""
        small, seen = [], set()
        for example, (height, width) in zip(self.examples, self.sizes):
            if example.image in seen:
                continue
            seen.add(example.image)
            try:
                h, w = self._header_size(example.image)
            except ImageError:
                continue  # the scan already reported it
            if h < height or w < width if height == width else max(height / h, width / w) > 1:
                small.append(example.image)
        return small

    def _header_size(self, path: Path) -> tuple[int, int]:
        if path not in self._headers:
            self._headers[path] = image_size(path)
        return self._headers[path]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """The item; when its image (or mask) cannot be read any more (changed or deleted since the scan),
        it is reported once and the next readable example of the same size stands in, so a run never stops
        mid-epoch over one file. Raises ConjureError only when no example of that size is readable."""
        epoch, index = key
        if index not in self.failed:
            try:
                return self._item(epoch, index)
            except ImageError as error:
                self._give_up(index, error)
        # Stand-ins, searched only after a failure: the examples of the same size after this one, wrapping round.
        n, size = len(self.examples), self.sizes[index]
        same_size = [i % n for i in range(index + 1, index + n) if self.sizes[i % n] == size]
        for candidate in same_size:
            if candidate in self.failed:
                continue
            try:
                return self._item(epoch, candidate)
            except ImageError as error:
                self._give_up(candidate, error)
        raise ConjureError(f"no readable images left of size {size} (all {len(same_size) + 1} failed)")

    def _give_up(self, index: int, error: ImageError) -> None:
        """Report an example whose file stopped being readable, once, and skip it from now on."""
        self.failed.add(index)
        path = self.examples[index].image
        reason = str(error).removeprefix(f"{path}: ")
        print(f"warning: skipping {path} from now on: {reason}", file=sys.stderr)

    def _item(self, epoch: int, index: int) -> dict:
        example = self.examples[index]
        image, original_size = self._image(index)
        mask = load_mask(example.mask) if example.mask is not None else None
        pixel_values, crop_top_left, mask_values, flipped = prepare_image_and_mask(
            image,
            mask,
            self.sizes[index],
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
            "target_size": self.sizes[index],
            "flipped": flipped,
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
            height, width = self.sizes[index]
            image = resize_shorter_side(image, height) if height == width else resize_to_cover(image, (height, width))
            self._cache[index] = (image, original_size)
        return image, original_size


def item_rng(seed: int, epoch: int, index: int, stream: str) -> random.Random:
    """The generator for one item's `stream` ("image" or "caption"). Separate streams keep the captions of
    a run unchanged when only an image option (crop, flip) changes, and the other way round."""
    return random.Random(f"{seed}-{epoch}-{index}-{stream}")


def collate(batch: list[dict]) -> dict:
    """Items -> one batch with the same keys: `pixel_values` stacked to [B, 3, H, W] (one size per batch); `mask` [B, 1, R, R]
    when any item has one (ones for the others); `loss_weight` as a
    [B] float tensor (when every item has one); `caption`, `index`,
    and `original_size`, `crop_top_left` and `target_size` (tuples of ints, when every item has them), as lists."""
    out = {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "index": [item["index"] for item in batch],
        "flipped": [bool(item.get("flipped", False)) for item in batch],
    }
    if any("mask" in item for item in batch):  # images without a mask count everywhere
        out["mask"] = torch.stack([item.get("mask", torch.ones_like(item["pixel_values"][:1])) for item in batch])
    if all("loss_weight" in item for item in batch):
        out["loss_weight"] = torch.tensor([float(item["loss_weight"]) for item in batch])
    for key in ("original_size", "crop_top_left", "target_size"):
        if all(key in item for item in batch):
            out[key] = [tuple(int(v) for v in item[key]) for item in batch]
    return out


def epoch_batches(sizes: list[tuple[int, int]], span: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices, at most `span` each) of `epoch`, every batch of one size.

    One size (no buckets): consecutive chunks of `epoch_order`. Several: `epoch_order` split by size (each
    size's examples keep that order), cut into chunks, and the chunks shuffled by
    `random.Random(f"{seed}-batches-{epoch}")`. The count is the same every epoch (see `batches_per_epoch`)."""
    order = epoch_order(len(sizes), seed, epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for index in order:
        groups.setdefault(sizes[index], []).append(index)
    chunks = [members[i : i + span] for members in groups.values() for i in range(0, len(members), span)]
    if len(groups) > 1:
        random.Random(f"{seed}-batches-{epoch}").shuffle(chunks)
    return chunks


def batches_per_epoch(sizes: list[tuple[int, int]], span: int) -> int:
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return sum(-(-count // span) for count in counts.values())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in `epoch`: a permutation of range(n) that depends only on
    (seed, epoch), drawn by `random.Random(f"{seed}-epoch-{epoch}").shuffle`, so a resumed run visits the
    rest of an epoch in the same order as the run it continues."""
    order = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    return order


class MicroBatchSampler:
    """The batch sampler of a run: micro-batches number `start` to `end` (exclusive) of the endless sequence of
    epochs, each a list of (epoch, index) keys, this process's share (`rank` of `world`). A resumed run starts at
    the micro-batch after its last step and sees what the uninterrupted run would have seen.
    `sizes`: each example's training size; a batch never mixes sizes (`epoch_batches`)."""

    def __init__(self, sizes: list[tuple[int, int]], batch: int, seed: int, start: int, end: int, rank: int,
                 world: int):
        self.sizes, self.batch, self.seed, self.start, self.end = sizes, batch, seed, start, end
        self.rank, self.world = rank, world
        self.per_epoch = batches_per_epoch(sizes, batch * world)
        self._chunks: tuple[int, list[list[int]]] = (-1, [])  # one epoch's batches, for `rows`

    def rows(self, m: int) -> int:
        """How many examples micro-batch `m` holds across all processes (fewer than batch x world at the end of a
        bucket whose count is not a multiple of it; train/loss.BatchGenerator weights the processes' shares)."""
        epoch, b = divmod(m, self.per_epoch)
        if self._chunks[0] != epoch:
            self._chunks = epoch, epoch_batches(self.sizes, self.batch * self.world, self.seed, epoch)
        return len(self._chunks[1][b])

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        chunks: list[list[int]] = []
        current = -1
        for m in range(self.start, self.end):
            epoch, b = divmod(m, self.per_epoch)
            if epoch != current:
                chunks, current = epoch_batches(self.sizes, self.batch * self.world, self.seed, epoch), epoch
            chunk = chunks[b]
            yield [(epoch, i) for i in chunk[self.rank :: self.world]] or [(epoch, chunk[0])]
