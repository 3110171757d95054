"""Finding the training examples a user points conjure at.

Owns the two source formats (a folder of images with optional same-stem `.txt` captions, and a `.jsonl`
file of {"image": ..., "text": ...} lines), the order examples come in, and the up-front check that every
image decodes, so that a broken file is reported once at the start instead of failing a run midway.
Hugging Face data sets are a third kind of source, read by `conjure.data.hf`.
Training only reads sources: nothing is written into the user's data folder. `write_jsonl`, the `.jsonl`
format's inverse, writes a folder's listing where the user asks (`conjure dataset jsonl`).
"""

import errno
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Any

from tqdm import tqdm

from conjure.data import hf
from conjure.data.example import PROGRESS_MIN_IMAGES, Example, caption_of
from conjure.data.images import IMAGE_EXTENSIONS, ImageError, is_image_file, load_image, load_mask
from conjure.errors import ConjureError, refuse_overwrite
from conjure.files import atomic_write_text

MASK_SUFFIX = "-masklabel.png"
"""A folder image `x.jpg` takes its loss mask from `x-masklabel.png` beside it (OneTrainer's convention);
such files are masks, not training images."""


@dataclass
class ScanResult:
    """The usable examples of a source, in a stable order, and the (path, reason) of each image left out."""

    examples: list[Example]
    skipped: list[tuple[Path, str]]


def scan_source(path: Path, *, check_images: bool = True, confine: Path | None = None) -> ScanResult:
    """List the examples in `path`, a folder of images, a `.jsonl` file or a Hugging Face data set (a saved
    or imagefolder one, or `hf:owner/name`: see `conjure.data.hf`).

    With `check_images`, every image is decoded once; those that fail are moved to `skipped` with the
    reason, for the caller to warn about. Raises `ConjureError` when the source is missing, has no images,
    or has none left that can be read.

    `confine` (a folder's real path): files whose real path lies outside it are treated as absent: such an
    image is not listed, such a caption or mask file is not read. The web app passes the opened folder, so
    that a link pointing out of it is not a way to read other files (docs/ui.md); training and the CLI
    follow links wherever they go (the user's own folders).
    """
    path = Path(path)
    skipped: list[tuple[Path, str]] = []
    if hf.is_hf_source(path):
        examples, skipped = hf.hf_examples(path)
    elif path.is_dir():
        examples = _folder_examples(path, confine)
        if not examples:
            suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ConjureError(f"no images in {path} (looked for {suffixes}, in subfolders too)")
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        examples = _jsonl_examples(path)
        if not examples:
            raise ConjureError(f"no images in {path} (the file lists none)")
    elif path.exists():
        raise ConjureError(f"{path}: a data source must be a folder of images or a .jsonl file")
    else:
        raise ConjureError(f"data source not found: {path}")
    if confine is not None:
        examples = [example for example in examples if within(example.image, confine)]
    result = _check(examples) if check_images else _check_exist(examples)
    result.skipped[:0] = skipped
    if not result.examples:
        first_path, first_reason = result.skipped[0]
        raise ConjureError(
            f"no usable images in {path}: all {len(result.skipped)} were unreadable "
            f"(first: {first_path}: {first_reason})"
        )
    return result


def scan_sources(sources: Sequence[Any], *, check_images: bool = True) -> ScanResult:
    """All examples of several sources (objects with `path`, `repeats`, `loss_weight`, `class_images` and
    `caption`, as `conjure.config.sections.SourceConfig`), in source order, each example listed `repeats`
    times in a row (each copy is its own item, with its own crop, flip and caption draw). A source's
    `caption` replaces its images' own captions."""
    examples: list[Example] = []
    skipped: list[tuple[Path, str]] = []
    for source in sources:
        scan = scan_source(Path(source.path).expanduser(), check_images=check_images)
        skipped += scan.skipped
        for example in scan.examples:
            caption = caption_of(source.caption) if source.caption is not None else example.caption
            made = replace(example, caption=caption, loss_weight=float(source.loss_weight),
                           is_class=bool(source.class_images))
            examples += [made] * source.repeats
    return ScanResult(examples=examples, skipped=skipped)


def _folder_examples(root: Path, confine: Path | None = None) -> list[Example]:
    """Images under `root` at any depth, sorted by their path relative to it, each with its caption file
    (caption and mask files whose real path lies outside `confine`, when given, count as absent)."""
    images = sorted(_image_files(root), key=lambda image: image.relative_to(root).as_posix())
    readable = (lambda file: True) if confine is None else (lambda file: within(file, confine))
    examples = []
    for image in images:
        mask, caption = image.with_name(image.stem + MASK_SUFFIX), image.with_suffix(".txt")
        text = _read_caption_file(caption) if readable(caption) else None
        examples.append(Example(image, text, mask=mask if mask.is_file() and readable(mask) else None))
    return examples


def within(path: Path, folder: Path) -> bool:
    """Whether `path`'s real path (links followed) lies inside `folder`, itself a real path. A link that
    cannot be followed (a loop) stays where it is: inside, to be reported as unreadable there."""
    real = Path(os.path.realpath(path))
    return real == folder or real.is_relative_to(folder)


def _image_files(root: Path) -> Iterator[Path]:
    """Image files under `root`, skipping hidden files and folders (.git, .cache, macOS ._ files)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            file = Path(folder, name)
            if not name.startswith(".") and is_image_file(file) and not name.endswith(MASK_SUFFIX):
                yield file


def _read_caption_file(path: Path) -> str | None:
    """The stripped text of a caption file, or None when there is no such file or it is blank."""
    if not path.is_file():
        return None
    try:
        # utf-8-sig: Windows Notepad starts UTF-8 files with a byte-order mark, which would otherwise
        # become an invisible first character of the caption.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConjureError(f"{path}: caption file is not UTF-8 (bad byte at offset {error.start})") from None
    return caption_of(text)


def _jsonl_examples(path: Path) -> list[Example]:
    """The examples a `.jsonl` file lists, in file order; image paths are relative to the file's folder."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise ConjureError(f"{path}: not UTF-8 (bad byte at offset {error.start})") from None
    return [_jsonl_example(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def _jsonl_example(path: Path, number: int, line: str) -> Example:
    """The example on line `number` of the `.jsonl` file `path`."""
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConjureError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ConjureError(f'{where}: expected an object like {{"image": "a.png", "text": "..."}}')
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise ConjureError(f'{where}: needs an "image" field with the image\'s path')
    text = record.get("text")
    if text is not None and not isinstance(text, str):
        raise ConjureError(f'{where}: "text" must be a string, got {type(text).__name__}')
    mask = record.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask):
        raise ConjureError(f'{where}: "mask" must be the path of a greyscale image')
    return Example(path.parent / image, caption_of(text), mask=path.parent / mask if mask else None)


def _check(examples: list[Example]) -> ScanResult:
    """Decode every image once, moving the ones that are missing or fail to decode to `skipped`."""
    result = ScanResult(examples=[], skipped=[])
    # disable=None hides the bar when stderr is not a terminal (logs, the UI's subprocess).
    disable = None if len(examples) > PROGRESS_MIN_IMAGES else True
    for example in tqdm(examples, desc="Checking images", unit="image", file=sys.stderr, disable=disable):
        reason = _problem(example.image) or (_mask_problem(example.mask) if example.mask else None)
        if reason is None:
            result.examples.append(example)
        else:
            result.skipped.append((example.image, reason))
    return result


def _problem(image: Path) -> str | None:
    """Why `image` cannot be trained on, or None when it decodes."""
    if not image.is_file():
        return _missing(image)
    try:
        load_image(image)
    except ImageError as error:
        # load_image's messages are "<path>: <reason>"; the caller shows the path itself.
        return str(error).removeprefix(f"{image}: ")
    return None


def _missing(image: Path) -> str:
    """Why an image path that is no file cannot be read: a symlink loop (a link to itself, or links to each
    other: the OS gives up with ELOOP) is named as such; anything else is "file not found"."""
    try:
        os.stat(image)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
    return "file not found"


def _mask_problem(mask: Path) -> str | None:
    try:
        load_mask(mask)
    except ImageError as error:
        return str(error)  # names the mask file, which is not the image the caller reports
    return None


def _check_exist(examples: list[Example]) -> ScanResult:
    """Without decoding, still leave out files that do not exist (a `.jsonl` can name any path)."""
    result = ScanResult(examples=[], skipped=[])
    for example in examples:
        if example.image.is_file():
            result.examples.append(example)
        else:
            result.skipped.append((example.image, _missing(example.image)))
    return result


def write_jsonl(folder: Path, out: Path, *, force: bool = False, confine: Path | None = None) -> int:
    """Write the `.jsonl` source for an image folder; returns how many images it lists.

    One `{"image": ..., "text": ...}` line per image, in the folder's order; the image path relative to the
    `.jsonl` file's folder with `/` separators (absolute where no relative path exists, e.g. another Windows
    drive), "text" the caption or null. `scan_source(out)` reads back the same images and captions as
    `scan_source(folder)`. Images are listed without decoding them (`conjure dataset check` finds broken ones).
    Refuses an existing `out` unless `force`; the file appears complete or not at all (temporary file + rename).
    `confine`: as `scan_source`'s (the web app's rule: images and captions linking out are left out).
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ConjureError(f"{folder}: not a folder" if folder.exists() else f"folder not found: {folder}")
    if out.suffix.lower() != ".jsonl":
        raise ConjureError(f"{out}: the file name must end in .jsonl (how training recognises the format)")
    if out.is_dir():
        raise ConjureError(f"{out} is a folder")
    refuse_overwrite(out, force)
    examples = scan_source(folder, check_images=False, confine=confine).examples
    base = out.parent.absolute()
    lines = [
        json.dumps({"image": _relative_posix(example.image, base), "text": example.caption}, ensure_ascii=False)
        for example in examples
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines)


def _relative_posix(path: Path, base: Path) -> str:
    """`path` relative to the folder `base`, with `/` separators; absolute when there is no relative path."""
    try:
        relative = os.path.relpath(path.absolute(), base)
    except ValueError:  # Windows: another drive
        relative = str(path.absolute())
    return PurePath(relative).as_posix()
