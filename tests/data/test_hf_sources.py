"""Hugging Face data sets as sources: saved data sets and DatasetDicts, imagefolders with metadata, Hub names;
images come back pixel for pixel from the conjure cache, and the user's data folder is never written to."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conjure.config.sections import SourceConfig
from conjure.data import hf
from conjure.data.images import load_image, load_mask
from conjure.data.sources import scan_source, scan_sources
from conjure.errors import ConjureError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """conjure's and datasets' caches in the test's own folder: nothing from or to the real home."""
    monkeypatch.setenv("CONJURE_CACHE_DIR", str(tmp_path / "conjure-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "conjure-cache"


def _pixels(seed: int, size=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _dataset(n=3, captions=True, masks=False):
    """An in-memory data set of `n` random images (PNG bytes once cast), captions "caption i" (row 1 blank)."""
    columns = {"image": [Image.fromarray(_pixels(i)) for i in range(n)]}
    if captions:
        columns["text"] = [f"  caption {i} " if i != 1 else "  " for i in range(n)]
    if masks:
        columns["mask"] = [Image.fromarray(_pixels(100 + i)[..., 0]) for i in range(n)]
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    return dataset.cast_column("mask", datasets.Image()) if masks else dataset


def _listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its contents: to show a folder was only read."""
    return {str(file.relative_to(folder)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(folder.rglob("*")) if file.is_file()}


def test_saved_dataset_gives_the_original_pixels_from_the_cache_and_leaves_the_folder_alone(tmp_path, caches):
    folder = tmp_path / "data" / "my-set"
    _dataset().save_to_disk(str(folder))
    before = _listing(tmp_path / "data")
    result = scan_source(folder)
    assert [example.caption for example in result.examples] == ["caption 0", None, "caption 2"]
    assert result.skipped == []
    for i, example in enumerate(result.examples):
        assert example.image.is_relative_to(caches / "hf-images") and example.image.suffix == ".png"
        assert np.array_equal(np.asarray(load_image(example.image)), _pixels(i))
        assert example.mask is None
    assert _listing(tmp_path / "data") == before
    # a second scan reuses the files it wrote
    stamps = [example.image.stat().st_mtime_ns for example in result.examples]
    again = scan_source(folder)
    assert again.examples == result.examples
    assert [example.image.stat().st_mtime_ns for example in again.examples] == stamps


def test_dataset_dict_uses_its_train_split(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict({"test": _dataset(1), "train": _dataset(2)}).save_to_disk(str(folder))
    assert [example.caption for example in scan_source(folder).examples] == ["caption 0", None]


def test_dataset_dict_without_train_names_its_splits(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict({"test": _dataset(1), "validation": _dataset(1)}).save_to_disk(str(folder))
    with pytest.raises(ConjureError, match=r"no 'train' split \(splits: test, validation\).*dict/test"):
        scan_source(folder)
    assert len(scan_source(folder / "test").examples) == 1  # a split's own folder is a saved data set


def test_no_caption_column_means_no_captions(tmp_path):
    _dataset(2, captions=False).save_to_disk(str(tmp_path / "d"))
    assert [example.caption for example in scan_source(tmp_path / "d").examples] == [None, None]


def test_caption_column_names_are_tried_in_order(tmp_path):
    dataset = _dataset(1, captions=False).add_column("prompt", ["a prompt"]).add_column("caption", ["a caption"])
    assert hf.pick_columns(dataset.features, "x") == hf.Columns(image="image", caption="caption", mask=None)


def test_image_column_need_not_be_called_image_but_image_wins(tmp_path):
    picture = [Image.fromarray(_pixels(0))]
    other = datasets.Dataset.from_dict({"id": [7], "picture": picture}).cast_column("picture", datasets.Image())
    assert hf.pick_columns(other.features, "x").image == "picture"
    # a ControlNet-style set: "image" is what to learn, whichever image column comes first
    both = datasets.Dataset.from_dict({"conditioning_image": picture, "image": picture})
    features = both.cast_column("conditioning_image", datasets.Image()).cast_column("image", datasets.Image()).features
    assert hf.pick_columns(features, "x").image == "image"


def test_columns_that_are_not_understood_are_errors(tmp_path):
    no_image = datasets.Dataset.from_dict({"id": [1], "text": ["a"]})
    with pytest.raises(ConjureError, match=r"no image column .* id \(Value\(int64\)\), text \(Value\(string\)\)"):
        hf.pick_columns(no_image.features, "x")
    bad_caption = _dataset(1, captions=False).add_column("caption", [3])
    with pytest.raises(ConjureError, match=r"caption column 'caption' holds Value\(int64\), not text"):
        hf.pick_columns(bad_caption.features, "x")


def test_mask_column_becomes_example_masks(tmp_path, caches):
    _dataset(2, masks=True).save_to_disk(str(tmp_path / "d"))
    examples = scan_source(tmp_path / "d").examples
    for i, example in enumerate(examples):
        assert example.mask.is_relative_to(caches / "hf-images") and example.mask != example.image
        assert np.array_equal(np.asarray(load_mask(example.mask)), _pixels(100 + i)[..., 0])


def test_rows_without_an_image_are_skipped_with_the_reason(tmp_path):
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(_pixels(0)), None], "text": ["a", "b"]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "d"))
    result = scan_source(tmp_path / "d")
    assert [example.caption for example in result.examples] == ["a"]
    assert result.skipped == [(Path(f"{tmp_path / 'd'} row 1"), "no image in this row")]


def test_bytes_that_are_no_image_are_reported_by_the_check(tmp_path):
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": "x.png"},
                                                    Image.fromarray(_pixels(0))]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "d"))
    result = scan_source(tmp_path / "d")
    assert len(result.examples) == 1
    [(path, reason)] = result.skipped
    assert path.name == "000000.png" and "cannot read image" in reason


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_with_metadata_uses_the_files_in_place(tmp_path, metadata):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    names = ["b.png", "a.png", "sub/c.png"]
    for i, name in enumerate(names):
        Image.fromarray(_pixels(i)).save(folder / name)
    rows = [("b.png", "second"), ("a.png", ""), ("sub/c.png", "third, with a comma")]
    if metadata.endswith(".jsonl"):
        text = "".join(json.dumps({"file_name": name, "caption": caption}) + "\n" for name, caption in rows)
    else:
        text = "file_name,caption\n" + "".join(f'{name},"{caption}"\n' for name, caption in rows)
    (folder / metadata).write_text(text, encoding="utf-8")
    before = _listing(folder)
    result = scan_source(folder)
    assert [(example.image, example.caption) for example in result.examples] == [
        (folder / "b.png", "second"), (folder / "a.png", None), (folder / "sub" / "c.png", "third, with a comma")]
    assert _listing(folder) == before


def test_imagefolder_masks_from_a_mask_file_name_column(tmp_path):
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    Image.fromarray(_pixels(1)[..., 0]).save(tmp_path / "a-mask.png")
    line = {"file_name": "a.png", "mask_file_name": "a-mask.png", "text": "a"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    [example] = scan_source(tmp_path).examples
    assert (example.image, example.mask, example.caption) == (tmp_path / "a.png", tmp_path / "a-mask.png", "a")


def test_imagefolder_splits_in_subfolders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        Image.fromarray(_pixels(0)).save(tmp_path / split / "a.png")
        (tmp_path / split / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": split}) + "\n")
    assert [example.caption for example in scan_source(tmp_path).examples] == ["train"]


def test_hub_name_goes_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        return _dataset(2)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    result = scan_source("hf:someone/pictures")
    assert [example.caption for example in result.examples] == ["caption 0", None]
    assert np.array_equal(np.asarray(load_image(result.examples[0].image)), _pixels(0))
    scan_source("hf:someone/pictures:test[:2]")
    assert calls == [("someone/pictures", "train"), ("someone/pictures", "test[:2]")]
    # and as one of several sources, as a config names it
    scan = scan_sources([SourceConfig(path="hf:someone/pictures", repeats=2)])
    assert len(scan.examples) == 4


def test_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # both read once, at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConjureError) as error:
        scan_source("hf:someone/not-downloaded")
    message = str(error.value)
    assert message.startswith("hf:someone/not-downloaded: cannot load the data set from the Hub: ")
    assert message.endswith("(offline mode is on: only data sets already in the HF cache load)")
    assert "\n" not in message


def test_badly_written_hub_name(monkeypatch):
    with pytest.raises(ConjureError, match=r"write a Hub data set as hf:owner/name or hf:owner/name:split"):
        scan_source("hf:a/b/c")


def test_without_datasets_installed_the_error_says_what_to_install(tmp_path, monkeypatch):
    _dataset(1).save_to_disk(str(tmp_path / "d"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ConjureError, match=r"needs the datasets package: pip install 'conjure\[datasets\]'"):
        scan_source(tmp_path / "d")


def test_plain_folders_are_not_hf_sources(tmp_path):
    Image.fromarray(_pixels(0)).save(tmp_path / "a.png")
    assert not hf.is_hf_source(tmp_path) and not hf.is_hf_source(tmp_path / "a.png")
    assert scan_source(tmp_path).examples[0].image == tmp_path / "a.png"


def test_many_rows_keep_their_order_across_arrow_batches(tmp_path):
    n = hf._BATCH_ROWS + 7
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(n)]
    dataset = datasets.Dataset.from_dict({"image": images, "text": [str(i) for i in range(n)]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "d"))
    examples = scan_source(tmp_path / "d").examples
    assert [example.caption for example in examples] == [str(i) for i in range(n)]
    assert [load_image(example.image).getpixel((0, 0))[0] for example in examples] == list(range(n))
