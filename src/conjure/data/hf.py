"""Hugging Face `datasets` data sets as training sources.

Owns recognising the three forms a user can point a source at, reading their image, caption and mask
columns, and turning their rows into `Example`s:

- a folder written by `Dataset.save_to_disk` (`dataset_info.json` + `state.json`) or `DatasetDict.save_to_disk`
  (`dataset_dict.json`; its "train" split is used);
- an imagefolder with metadata (images plus `metadata.jsonl`, `.csv` or `.parquet` with a `file_name` column,
  at the top of the folder or in its split subfolders), read by datasets' own `imagefolder` builder so that its
  conventions (paths relative to the metadata file, `mask_file_name` columns, split folders) hold exactly;
- `hf:owner/name` or `hf:owner/name:split` (default "train"; a slice such as `train[:500]` works too), a data
  set on the Hub, by `datasets.load_dataset`.

Why images become files: the rest of the data layer (the up-front check, `TrainDataset`, `conjure dataset
check`, anything keyed by file contents) opens `Example.image` as a path. A data set keeps images as encoded
bytes inside Arrow files, so each image (and mask) is written once, byte for byte, to
`<cache>/hf-images/<fingerprint>/<column>/<row>.<ext>` and reused from there on later runs: one code path for
every source, no decoding differences, and the bytes are copied, not re-encoded. The cache is
`$CONJURE_CACHE_DIR`, else `$XDG_CACHE_HOME/conjure`, else `~/.cache/conjure`; never the user's data folder.
Rows that only hold a local file's path (imagefolder data sets) use that file directly.

`datasets` is an optional dependency (`pip install 'conjure[datasets]'`), imported only here and only when an
HF source is read.
"""

import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from conjure.data.example import PROGRESS_MIN_IMAGES, Example, caption_of
from conjure.data.images import IMAGE_EXTENSIONS
from conjure.errors import ConjureError
from conjure.files import atomic_write_bytes, cache_dir

HUB_PREFIX = "hf:"
"""`hf:owner/name` (or `hf:owner/name:split`) names a data set on the Hugging Face Hub."""

IMAGE_COLUMN = "image"
"""The image column when it is an image feature; otherwise the first image-feature column is used."""

CAPTION_COLUMNS = ("text", "caption", "prompt", "description")
"""Caption column names, tried in this order; the first present is used. "text" first: it is the name the HF
image-folder docs and diffusers' text-to-image scripts use. Without any, examples have no caption."""

MASK_COLUMN = "mask"
"""An image-feature column of per-pixel loss masks (an imagefolder's `mask_file_name` becomes this column)."""

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
"""The file names datasets' imagefolder builder reads captions and other columns from."""

DEFAULT_SPLIT = "train"

_INSTALL_HINT = "pip install 'conjure[datasets]'"
_BATCH_ROWS = 64  # rows read from Arrow at a time: bounds memory to a batch of encoded images
_FORMAT_SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                    "TIFF": ".tif"}


@dataclass(frozen=True)
class Columns:
    """Which columns of a data set hold the image, the caption and the loss mask (None: not present).
    Chosen by `pick_columns`; a per-source override would build one from the user's names instead."""

    image: str
    caption: str | None
    mask: str | None


def is_hf_source(path: Path | str) -> bool:
    """Whether `path` is an HF data set: `hf:...`, or a folder holding a saved data set or imagefolder metadata."""
    return _kind(path) is not None


def hf_examples(path: Path | str) -> tuple[list[Example], list[tuple[Path, str]]]:
    """The examples of the HF data set `path` (see `is_hf_source`) in row order, and a (label, reason) for each
    row without a usable image file. Images stored as bytes are written to the cache first (see the module
    docstring). Raises `ConjureError` when `datasets` is missing, the data set cannot be loaded, it has no
    rows, or its columns are not understood."""
    kind = _kind(path)
    if kind is None:
        raise ConjureError(f"{path}: not a Hugging Face data set")
    label = Path(path).as_posix() if kind == "hub" else str(path)
    dataset = _load(Path(path), kind, label)
    if len(dataset) == 0:
        raise ConjureError(f"no images in {label} (the data set has no rows)")
    columns = pick_columns(dataset.features, label)
    return _rows_to_examples(dataset, columns, label)


def pick_columns(features: dict[str, Any], label: str) -> Columns:
    """The image column (`IMAGE_COLUMN` if it is an image feature, else the first image-feature column other
    than the mask), the first of `CAPTION_COLUMNS` present (it must hold text), and `MASK_COLUMN` if present
    (it must be an image feature)."""
    datasets = _import_datasets(label)
    is_image = {name: isinstance(feature, datasets.Image) for name, feature in features.items()}
    listing = ", ".join(f"{name} ({_describe_feature(feature)})" for name, feature in features.items())
    if is_image.get(IMAGE_COLUMN):
        image = IMAGE_COLUMN
    else:
        candidates = [name for name, yes in is_image.items() if yes and name != MASK_COLUMN]
        if not candidates:
            raise ConjureError(f"{label}: no image column (an Image feature) among the columns: {listing}")
        image = candidates[0]
    caption = next((name for name in CAPTION_COLUMNS if name in features), None)
    if caption is not None and not _is_text(features[caption], datasets):
        raise ConjureError(f"{label}: caption column {caption!r} holds {_describe_feature(features[caption])}, "
                           "not text")
    mask = MASK_COLUMN if MASK_COLUMN in features else None
    if mask is not None and not is_image[mask]:
        raise ConjureError(f"{label}: mask column {mask!r} holds {_describe_feature(features[mask])}, "
                           "not images (cast it with datasets.Image())")
    return Columns(image=image, caption=caption, mask=mask)


# --- recognising and loading ------------------------------------------------------------------------------


def _kind(path: Path | str) -> str | None:
    """"hub", "saved_dict", "saved", "imagefolder" or None (not an HF data set)."""
    if Path(path).as_posix().startswith(HUB_PREFIX):
        return "hub"
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return "saved_dict"
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return "saved"
    with os.scandir(path) as entries:
        subfolders = [Path(entry.path) for entry in entries if not entry.name.startswith(".") and _is_folder(entry)]
    if any((folder / name).is_file() for folder in [path, *subfolders] for name in METADATA_FILES):
        return "imagefolder"
    return None


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; False for a link that cannot be followed (a symlink loop raises ELOOP, which
    would end the whole scan: the folder walk skips such an entry as it skips a dangling link)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _import_datasets(label: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConjureError(f"{label}: reading a Hugging Face data set needs the datasets package: "
                           f"{_INSTALL_HINT}") from None
    return datasets


def _load(path: Path, kind: str, label: str) -> Any:
    """The `datasets.Dataset` to train on."""
    datasets = _import_datasets(label)
    if kind == "hub":
        return _load_hub(label, datasets)
    if kind == "saved_dict":
        splits = _saved_splits(path)
        if DEFAULT_SPLIT not in splits:
            raise ConjureError(f"{label}: this DatasetDict has no {DEFAULT_SPLIT!r} split (splits: "
                               f"{', '.join(splits) or 'none'}); point the source at a split's folder, "
                               f"e.g. {path / splits[0] if splits else path}")
        path = path / DEFAULT_SPLIT
    if kind in ("saved", "saved_dict"):
        try:
            # keep_in_memory=False: memory-mapped, so a large data set costs no RAM up front.
            return datasets.Dataset.load_from_disk(str(path), keep_in_memory=False)
        except Exception as error:  # datasets raises many types for a damaged folder; all mean "cannot read"
            raise ConjureError(f"{label}: cannot load the saved data set: {_first_line(error)}") from error
    try:
        # datasets' own builder (not a reimplementation), so the folder means what it means to datasets; it
        # keeps paths, not copies, and writes its Arrow index to the HF cache, not into the folder.
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as error:
        raise ConjureError(f"{label}: cannot read the imagefolder metadata: {_first_line(error)}") from error
    if DEFAULT_SPLIT not in loaded:
        raise ConjureError(f"{label}: this imagefolder has no {DEFAULT_SPLIT!r} split (splits: "
                           f"{', '.join(loaded)}); point the source at a split's folder")
    return loaded[DEFAULT_SPLIT]


def _saved_splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConjureError(f"{path / 'dataset_dict.json'}: not a DatasetDict index ({error})") from None
    return [str(split) for split in splits]


def _load_hub(label: str, datasets: Any) -> Any:
    """`hf:owner/name[:split]` through `datasets.load_dataset` (downloaded once into the HF cache)."""
    name, _, split = label.removeprefix(HUB_PREFIX).partition(":")
    if not name or name.count("/") > 1:
        raise ConjureError(f"{label}: write a Hub data set as hf:owner/name or hf:owner/name:split")
    split = split or DEFAULT_SPLIT
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, auth, missing data set or split: all surface as one line
        hint = ""
        if isinstance(error, ConnectionError):
            offline = datasets.config.HF_HUB_OFFLINE
            hint = (" (offline mode is on: only data sets already in the HF cache load)" if offline
                    else " (no network? a data set loaded before also loads offline, with HF_HUB_OFFLINE=1)")
        raise ConjureError(f"{label}: cannot load the data set from the Hub: {_first_line(error)}{hint}") from error
    return loaded


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _is_text(feature: Any, datasets: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _describe_feature(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__}({dtype})" if isinstance(dtype, str) else type(feature).__name__


# --- rows to examples -------------------------------------------------------------------------------------


def _rows_to_examples(dataset: Any, columns: Columns, label: str) -> tuple[list[Example], list[tuple[Path, str]]]:
    """One example per row with an image; rows whose image is missing or not a local file are skipped."""
    # datasets' own fingerprint identifies a table and the operations that made it: saved in state.json by
    # save_to_disk and derived from the cache files for Hub downloads, so it is stable across runs.
    folder = cache_dir() / "hf-images" / dataset._fingerprint
    examples: list[Example] = []
    skipped: list[tuple[Path, str]] = []
    disable = None if len(dataset) > PROGRESS_MIN_IMAGES else True  # None: hidden when stderr is no terminal
    rows = tqdm(_iter_rows(dataset, columns), total=len(dataset), desc=f"Unpacking images of {label}",
                unit="image", file=sys.stderr, disable=disable)
    for index, image_value, caption, mask_value in rows:
        image, reason = _image_file(image_value, folder / columns.image, index)
        if image is None:
            skipped.append((Path(f"{label} row {index}"), reason))
            continue
        mask = None
        if mask_value is not None:
            mask, reason = _image_file(mask_value, folder / columns.mask, index)
            if mask is None:
                skipped.append((image, f"mask: {reason}"))
                continue
        examples.append(Example(image, caption_of(caption), mask=mask))
    return examples, skipped


def _iter_rows(dataset: Any, columns: Columns) -> Iterator[tuple[int, Any, Any, Any]]:
    """(row index, image value, caption, mask value) per row, read as Arrow without decoding any image."""
    names = [name for name in (columns.image, columns.caption, columns.mask) if name is not None]
    index = 0
    # Formatting as Arrow reads the stored {"bytes", "path"} structs as they are; no map/cast, which would
    # write cache files next to a saved data set's own.
    for batch in dataset.with_format("arrow", columns=names).iter(batch_size=_BATCH_ROWS):
        images = batch.column(columns.image).to_pylist()
        captions = batch.column(columns.caption).to_pylist() if columns.caption else [None] * len(images)
        masks = batch.column(columns.mask).to_pylist() if columns.mask else [None] * len(images)
        for image, caption, mask in zip(images, captions, masks):
            yield index, image, caption, mask
            index += 1


def _image_file(value: Any, folder: Path, index: int) -> tuple[Path | None, str]:
    """The file holding a stored image `{"bytes", "path"}`: written to `folder` when it has bytes, the local
    file itself when it only has a path; else None and why."""
    data = value.get("bytes") if isinstance(value, dict) else None
    source = value.get("path") if isinstance(value, dict) else None
    if data:
        return _write_once(folder, f"{index:06d}{_suffix(data, source)}", data), ""
    if not source:
        return None, "no image in this row"
    if "://" in source:
        return None, f"the image is not in the data set but at {source}, which is not a local file"
    return Path(source), ""


def _suffix(data: bytes, source: str | None) -> str:
    """The file suffix for encoded image bytes: from their format (PIL reads only the header), else from the
    row's original file name; ".bin" for bytes that are no image (the check then reports them)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        image_format = ""
    if image_format:
        return _FORMAT_SUFFIXES.get(image_format, f".{image_format.lower()}")
    suffix = Path(source).suffix.lower() if source else ""
    return suffix if suffix in IMAGE_EXTENSIONS else ".bin"


def _write_once(folder: Path, name: str, data: bytes) -> Path:
    """`folder / name` holding `data`, written atomically (temporary file, then rename) unless a file of that
    size is already there: another run, or another process of this one, wrote it."""
    target = folder / name
    if target.is_file() and target.stat().st_size == len(data):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_bytes(target, data)
    except OSError as error:
        raise ConjureError(f"cannot write {target} (the HF image cache; set CONJURE_CACHE_DIR to move it): "
                           f"{error.strerror or error}") from None
    return target
