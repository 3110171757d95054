"""Looking at a data set before training on it: `conjure dataset check` and `conjure dataset jsonl`.

Owns the data-set report: what a source holds (counts, image sizes, aspect-ratio buckets) and what is wrong
with it, one `Problem` per finding, each an "error" (training would lose the file, or has nothing to train on)
or a "warning" (training runs, but maybe not as meant); printed as text or as the stable dict the UI shows.
Also owns writing a folder's images and captions as a `.jsonl` source.

A source is read exactly as training reads it (`conjure.data.sources.scan_source`,
`conjure.data.images.load_image_with_size`), and never written to.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

from conjure.data.buckets import Size, assign_bucket, make_buckets
from conjure.data.check_settings import CheckSettings
from conjure.data.images import ImageError, load_image_with_size
from conjure.data.hf import is_hf_source
from conjure.data.example import PROGRESS_MIN_IMAGES, Example
from conjure.data.sources import scan_source, within
from conjure.errors import ConjureError

ERROR, WARNING = "error", "warning"

_DEFAULTS = CheckSettings()

KINDS = {
    "missing": (ERROR, "an image file that does not exist (a .jsonl line's, a dangling link, a symlink loop)"),
    "unreadable": (ERROR, "the image cannot be decoded (empty, truncated, not an image): training skips it"),
    "no_usable_images": (ERROR, "no image of the source can be read: nothing to train on"),
    "missing_caption": (WARNING, "an image without a caption file or caption text"),
    "empty_caption": (WARNING, "an image whose caption file is blank"),
    "no_captions": (WARNING, "no image has a caption (one finding for the whole source)"),
    "long_caption": (WARNING, "a caption longer than the text encoder reads: its end is ignored"),
    "small_image": (WARNING, "an image whose shorter side is under the resolution: training upscales it"),
    "duplicate": (WARNING, "an image whose file has the same bytes as an earlier one (or is listed twice)"),
    "orphan_caption": (WARNING, "a .txt file in a folder source with no image of the same name beside it"),
}
"""Every finding `kind` -> (severity, what it means). Kinds are part of the JSON report: add, never rename."""

SHORTER_SIDE_EDGES = (256, 512, 768, 1024, 1536, 2048)
"""Where the shorter-side ranges of the size histogram start and end, in pixels."""

MOST_COMMON_SIZES = 5
"""How many of the most frequent exact image sizes the report lists."""


@dataclass(frozen=True)
class Problem:
    """One finding: the file (or the source itself) it is about, "error" or "warning", its `KINDS` key, and a
    sentence for the user."""

    path: str
    severity: str
    kind: str
    message: str

    def line(self) -> str:
        return f"{self.path}: {self.severity}: {self.message}"


@dataclass(frozen=True)
class DatasetReport:
    """What `check_source` found. `to_dict()` is the JSON report; `text()` the terminal one."""

    source: str
    counts: dict[str, int]
    resolutions: dict[str, Any]
    buckets: dict[str, Any]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        """No errors (warnings alone are fine): what `conjure dataset check` exits 0 for."""
        return not any(problem.severity == ERROR for problem in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form:

        - `source`: the path as given.
        - `counts`: `images` (listed, readable or not), `usable`, `unreadable` (incl. missing), `with_caption` and
          `without_caption` (of the usable), `duplicates` (extra copies), `errors`, `warnings`.
        - `resolutions`: `shorter_side`: [{`min`, `max` (null: no upper end), `count`}] for the non-empty ranges;
          `most_common`: [{`height`, `width`, `count`}]; `smallest`, `largest` (by pixels): {`height`, `width`}
          or null. Sizes are the images' full, upright sizes.
        - `buckets`: `resolution`, `step`, `counts`: [{`height`, `width`, `count`}] for the buckets in use, in the
          order of `make_buckets` (tallest first).
        - `problems`: [{`path`, `severity` ("error" | "warning"), `kind` (a `KINDS` key), `message`}]: errors
          first, each group in the source's order.
        - `ok`: no errors.
        """
        return {
            "source": self.source,
            "counts": dict(self.counts),
            "resolutions": self.resolutions,
            "buckets": self.buckets,
            "problems": [asdict(problem) for problem in self.problems],
            "ok": self.ok,
        }

    def text(self) -> str:
        """One `path: severity: message` line per problem, then a summary."""
        lines = [problem.line() for problem in self.problems]
        if lines:
            lines.append("")
        counts = self.counts
        lines.append(
            f"source: {self.source}: {_plural(counts['images'], 'image')}, {counts['usable']} usable, "
            f"{counts['unreadable']} unreadable"
        )
        lines.append(
            f"captions: {counts['with_caption']} with, {counts['without_caption']} without; "
            f"duplicates: {counts['duplicates']}"
        )
        shorter = self.resolutions["shorter_side"]
        if shorter:
            lines.append("shorter side: " + ", ".join(f"{_range_text(r)}: {r['count']}" for r in shorter))
            common = self.resolutions["most_common"]
            lines.append("most common sizes (width x height): " + _sizes_text(common))
            buckets = self.buckets
            lines.append(f"buckets at {buckets['resolution']} px (width x height): " + _sizes_text(buckets["counts"]))
        errors, warnings = counts["errors"], counts["warnings"]
        verdict = "ok" if self.ok else "not ready: fix the errors"
        lines.append(f"result: {verdict} ({_plural(errors, 'error')}, {_plural(warnings, 'warning')})")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Image:
    """One listed image after decoding: its full upright size and content hash, or why it cannot be read."""

    example: Example
    size: Size | None
    digest: str | None
    reason: str | None


def check_source(
    source: Path, *, resolution: int = _DEFAULTS.resolution, bucket_step: int = _DEFAULTS.bucket_step,
    max_tokens: int = _DEFAULTS.max_tokens, confine: Path | None = None,
) -> DatasetReport:
    """Check the data source `source` (a folder of images with optional same-stem `.txt` captions, or a `.jsonl`
    file) as training would read it, decoding every image once.

    The settings are `CheckSettings`' (their defaults too). `resolution` is the training resolution: smaller
    images are reported, and images are counted per aspect-ratio bucket of `make_buckets(resolution,
    step=bucket_step)`. `max_tokens` is the text encoder's limit, start and end tokens included. Raises
    `ConjureError` for bad arguments and for what makes a source unreadable as a whole (missing, no images in
    it, a caption file that is not UTF-8, a bad `.jsonl` line), as training does. `confine`: as `scan_source`'s
    (the web app's rule: nothing whose real path lies outside the opened folder is read or quoted).
    """
    source = Path(source)
    try:
        buckets = make_buckets(resolution, step=bucket_step)
    except ValueError as error:
        raise ConjureError(str(error)) from None
    if max_tokens < 3:
        raise ConjureError(f"max tokens must be at least 3 (start, end and one word), got {max_tokens}")

    scan = scan_source(source, check_images=False, confine=confine)  # no decoding here: _inspect decodes, and keeps the sizes
    images = _inspect(scan.examples)
    usable = [image for image in images if image.size is not None]
    errors = [Problem(str(path), ERROR, "missing", reason) for path, reason in scan.skipped]
    errors += [Problem(str(image.example.image), ERROR, "unreadable", image.reason) for image in images if image.reason]
    if not usable:
        errors.append(Problem(str(source), ERROR, "no_usable_images", "no image can be read: nothing to train on"))
    warnings = _caption_problems(source, usable, max_tokens, confine) + _size_problems(usable, resolution)
    duplicates = _duplicate_problems(usable)
    warnings += duplicates
    if source.is_dir() and not is_hf_source(source):
        warnings += _orphan_captions(source, [example.image for example in scan.examples])

    with_caption = sum(image.example.caption is not None for image in usable)
    counts = {
        "images": len(images) + len(scan.skipped),
        "usable": len(usable),
        "unreadable": len(images) - len(usable) + len(scan.skipped),
        "with_caption": with_caption,
        "without_caption": len(usable) - with_caption,
        "duplicates": len(duplicates),
        "errors": len(errors),
        "warnings": len(warnings),
    }
    sizes = [image.size for image in usable]
    return DatasetReport(
        source=str(source),
        counts=counts,
        resolutions=_resolutions(sizes),
        buckets=_bucket_counts(sizes, buckets, resolution, bucket_step),
        problems=_in_source_order(errors, scan.examples) + _in_source_order(warnings, scan.examples),
    )


def _in_source_order(problems: list[Problem], examples: list[Example]) -> list[Problem]:
    """`problems` sorted by their image's place in the source, then by kind (in `KINDS` order); findings about
    other files or the whole source come last."""
    place: dict[str, int] = {}
    for index, example in enumerate(examples):
        place.setdefault(str(example.image), index)
    kinds = list(KINDS)
    return sorted(problems, key=lambda problem: (place.get(problem.path, len(place)), kinds.index(problem.kind)))


def _inspect(examples: list[Example]) -> list[_Image]:
    """Decode each image as training does (same loader, same reasons) and hash the readable ones' bytes."""
    images = []
    disable = None if len(examples) > PROGRESS_MIN_IMAGES else True  # None: shown only on a terminal
    for example in tqdm(examples, desc="Checking images", unit="image", file=sys.stderr, disable=disable):
        try:
            _, size = load_image_with_size(example.image)
        except ImageError as error:
            reason = str(error).removeprefix(f"{example.image}: ")  # the report shows the path itself
            images.append(_Image(example, None, None, reason))
            continue
        images.append(_Image(example, size, _file_digest(example.image), None))
    return images


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _caption_problems(source: Path, usable: list[_Image], max_tokens: int, confine: Path | None) -> list[Problem]:
    """Missing, blank and over-long captions. When no image has one, a single finding for the source: that is
    how textual inversion is usually trained (its prompt templates stand in), not one mistake per image."""
    if usable and all(image.example.caption is None for image in usable):
        message = (
            f"none of the {_plural(len(usable), 'image')} has a caption: textual inversion uses its prompt "
            "templates; a LoRA needs captions or data.caption_prefix"
        )
        return [Problem(str(source), WARNING, "no_captions", message)]
    problems = []
    for image in usable:
        if image.example.caption is None:
            problems.append(_missing_caption(source, image.example.image, confine))
    captioned = [image.example for image in usable if image.example.caption is not None]
    if captioned:
        problems += _long_captions(captioned, max_tokens)
    return problems


def _missing_caption(source: Path, image: Path, confine: Path | None) -> Problem:
    if not source.is_dir() or is_hf_source(source):  # captions from a JSONL line or a data set's column
        return Problem(str(image), WARNING, "missing_caption", 'no caption ("text" is missing or blank)')
    caption_file = image.with_suffix(".txt")
    if confine is not None and caption_file.is_file() and not within(caption_file, confine):
        message = f"caption file {caption_file.name} links outside the data set: not read"
        return Problem(str(image), WARNING, "missing_caption", message)
    if caption_file.is_file():
        return Problem(str(image), WARNING, "empty_caption", f"caption file {caption_file.name} is empty")
    return Problem(str(image), WARNING, "missing_caption", f"no caption file ({caption_file.name})")


def _long_captions(examples: list[Example], max_tokens: int) -> list[Problem]:
    """Captions whose token count, start and end tokens included, is over `max_tokens`. Training truncates them
    (keeping the start token, the first max_tokens - 2 words' tokens and the end token), so the message shows
    what is cut off. Counted on the raw caption: a prefix or token added in training makes it longer still."""
    tokenizer = _tokenizer()
    ids = tokenizer([example.caption for example in examples], verbose=False).input_ids
    problems = []
    for example, tokens in zip(examples, ids):
        if len(tokens) > max_tokens:
            # CLIP's decoder spaces out punctuation ("fur , long"); undo that for the message.
            ignored = re.sub(r"\s+([,.;:!?])", r"\1", tokenizer.decode(tokens[max_tokens - 1 : -1])).strip(" ,")
            if len(ignored) > 60:
                ignored = ignored[:57] + "..."
            message = (
                f"caption is {len(tokens)} tokens, over the text encoder's {max_tokens} (start and end included); "
                f'training ignores the end: "{ignored}"'
            )
            problems.append(Problem(str(example.image), WARNING, "long_caption", message))
    return problems


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    """conjure's shipped CLIP tokenizer (the ids of every SD family's encoders), built once: it is only read."""
    from conjure.models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def _size_problems(usable: list[_Image], resolution: int) -> list[Problem]:
    problems = []
    for image in usable:
        if min(image.size) < resolution:
            message = f"{_size_text(image.size)} is under {resolution} px on its shorter side: training upscales it"
            problems.append(Problem(str(image.example.image), WARNING, "small_image", message))
    return problems


def _duplicate_problems(usable: list[_Image]) -> list[Problem]:
    """One finding per extra copy of a file, naming the first copy (in source order)."""
    first_by_digest: dict[str, Path] = {}
    problems = []
    for image in usable:
        path = image.example.image
        first = first_by_digest.get(image.digest)
        if first is None:
            first_by_digest[image.digest] = path
        elif first == path:  # a .jsonl can list a file twice
            problems.append(Problem(str(path), WARNING, "duplicate", "listed more than once"))
        else:
            problems.append(Problem(str(path), WARNING, "duplicate", f"same file contents as {first}"))
    return problems


def _orphan_captions(folder: Path, images: list[Path]) -> list[Problem]:
    """`.txt` files that no image's caption lookup reads, found by the same walk as images (hidden files and
    folders skipped)."""
    read = {image.with_suffix(".txt") for image in images}
    problems = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            path = Path(directory, name)
            if path.suffix.lower() == ".txt" and not name.startswith(".") and path not in read:
                message = f"no image named {path.stem}.* beside this caption file (renamed image, or a stray file?)"
                problems.append(Problem(str(path), WARNING, "orphan_caption", message))
    return problems


def _resolutions(sizes: list[Size]) -> dict[str, Any]:
    edges = (0, *SHORTER_SIDE_EDGES)
    ranges = []
    for index, low in enumerate(edges):
        high = edges[index + 1] if index + 1 < len(edges) else None
        count = sum(low <= min(size) and (high is None or min(size) < high) for size in sizes)
        if count:
            ranges.append({"min": low, "max": None if high is None else high - 1, "count": count})
    by_area = sorted(sizes, key=lambda size: (size[0] * size[1], size))
    return {
        "shorter_side": ranges,
        "most_common": [_size_count(size, n) for size, n in Counter(sizes).most_common(MOST_COMMON_SIZES)],
        "smallest": _size_dict(by_area[0]) if sizes else None,
        "largest": _size_dict(by_area[-1]) if sizes else None,
    }


def _bucket_counts(sizes: list[Size], buckets: list[Size], resolution: int, step: int) -> dict[str, Any]:
    counts = Counter(assign_bucket(size, buckets) for size in sizes)
    used = [_size_count(bucket, counts[bucket]) for bucket in buckets if counts[bucket]]
    return {"resolution": resolution, "step": step, "counts": used}


def _size_dict(size: Size) -> dict[str, int]:
    return {"height": size[0], "width": size[1]}


def _size_count(size: Size, count: int) -> dict[str, int]:
    return {**_size_dict(size), "count": count}


def _size_text(size: Size) -> str:
    """Width x height, as image editors and file browsers show sizes."""
    return f"{size[1]}x{size[0]}"


def _sizes_text(counts: list[dict[str, int]]) -> str:
    return ", ".join(f"{_size_text((c['height'], c['width']))}: {c['count']}" for c in counts)


def _range_text(size_range: dict[str, Any]) -> str:
    if size_range["max"] is None:
        return f"{size_range['min']}+ px"
    return f"{size_range['min']}-{size_range['max']} px"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
