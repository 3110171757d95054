"""scan_source finds examples in folders and JSONL files, reports unreadable images, and only reads."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from conjure.data.images import load_image
from conjure.data.example import Example
from conjure.data.sources import scan_source, scan_sources
from conjure.errors import ConjureError


def _image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_folder_examples_are_sorted_recursive_and_captioned(tmp_path):
    _image(tmp_path / "b.png")
    _image(tmp_path / "a.JPG")
    _image(tmp_path / "sub" / "c.webp")
    (tmp_path / "a.txt").write_text("  a red square \n", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("   \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    result = scan_source(tmp_path)
    assert result.examples == [
        Example(tmp_path / "a.JPG", "a red square"),
        Example(tmp_path / "b.png", None),  # no caption file
        Example(tmp_path / "sub" / "c.webp", None),  # blank caption file
    ]
    assert result.skipped == []


def test_caption_with_byte_order_mark_and_unicode(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffcafé, ☕".encode())
    assert scan_source(tmp_path).examples[0].caption == "café, ☕"


def test_caption_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConjureError, match=r"a\.txt: caption file is not UTF-8"):
        scan_source(tmp_path)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / ".b.png")
    _image(tmp_path / ".thumbnails" / "c.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork next to a.png
    assert [example.image.name for example in scan_source(tmp_path).examples] == ["a.png"]


def test_unreadable_images_are_skipped_with_reasons_and_good_ones_kept(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    truncated = _image(tmp_path / "truncated.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "text.png").write_text("hello")
    result = scan_source(tmp_path)
    assert [example.image.name for example in result.examples] == ["good.png"]
    reasons = dict(result.skipped)
    assert set(reasons) == {tmp_path / "empty.jpg", tmp_path / "truncated.png", tmp_path / "text.png"}
    assert reasons[tmp_path / "empty.jpg"] == "cannot read image (empty file)"
    assert "truncated" in reasons[tmp_path / "truncated.png"]
    assert "not an image" in reasons[tmp_path / "text.png"]
    assert all(str(tmp_path) not in reason for reason in reasons.values())


def test_without_check_images_nothing_is_decoded(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = scan_source(tmp_path, check_images=False)
    assert [example.image.name for example in result.examples] == ["empty.jpg", "good.png"]


def test_nothing_usable_says_how_many_and_the_first_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("x")
    expected = r"no usable images in .*: all 2 were unreadable \(first: .*a\.png: cannot read image \(empty"
    with pytest.raises(ConjureError, match=expected):
        scan_source(tmp_path)


def test_many_images_are_checked_with_a_progress_bar(tmp_path, capsys):
    for number in range(60):
        _image(tmp_path / f"{number:03d}.png")
    assert len(scan_source(tmp_path).examples) == 60
    assert "Checking images" not in capsys.readouterr().err  # hidden: stderr is not a terminal here


def test_missing_path(tmp_path):
    with pytest.raises(ConjureError, match="data source not found: .*nowhere"):
        scan_source(tmp_path / "nowhere")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ConjureError, match=f"no images in {re.escape(str(tmp_path))}"):
        scan_source(tmp_path)


def test_a_file_that_is_not_jsonl_is_refused(tmp_path):
    image = _image(tmp_path / "a.png")
    with pytest.raises(ConjureError, match="must be a folder of images or a .jsonl file"):
        scan_source(image)


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_paths_are_relative_to_its_folder_and_absolute_paths_work(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    elsewhere = _image(tmp_path / "other" / "b.png")
    source = _jsonl(
        tmp_path / "train.jsonl",
        [
            json.dumps({"image": "imgs/a.png", "text": " a square "}),
            "",
            json.dumps({"image": str(elsewhere)}),
            json.dumps({"image": "imgs/a.png", "text": "  "}),
        ],
    )
    assert scan_source(source).examples == [
        Example(tmp_path / "imgs" / "a.png", "a square"),
        Example(elsewhere, None),
        Example(tmp_path / "imgs" / "a.png", None),
    ]


def test_jsonl_missing_image_file_is_skipped(tmp_path):
    _image(tmp_path / "a.png")
    source = _jsonl(tmp_path / "t.jsonl", ['{"image": "a.png"}', '{"image": "gone.png"}'])
    for check_images in (True, False):
        result = scan_source(source, check_images=check_images)
        assert result.skipped == [(tmp_path / "gone.png", "file not found")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "a.png", "text": ', "not valid JSON"),
        ('["a.png"]', "expected an object"),
        ('{"text": "no image"}', 'needs an "image" field'),
        ('{"image": "a.png", "text": 3}', '"text" must be a string'),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    _image(tmp_path / "a.png")
    source = _jsonl(tmp_path / "t.jsonl", ['{"image": "a.png"}', "", bad_line])
    with pytest.raises(ConjureError, match=f"t.jsonl line 3: {message}"):
        scan_source(source)


def test_empty_jsonl(tmp_path):
    with pytest.raises(ConjureError, match="no images in"):
        scan_source(_jsonl(tmp_path / "t.jsonl", [""]))


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in sorted(root.rglob("*"))
    }


def test_scanning_and_loading_leave_the_folder_unchanged(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "broken.png").write_bytes(b"")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4)).save(tmp_path / "rotated.jpg", exif=exif)
    past = 1_000_000_000
    for path in tmp_path.rglob("*"):
        os.utime(path, (past, past))
    before = _listing(tmp_path)
    result = scan_source(tmp_path)
    for example in result.examples:
        load_image(example.image)
    assert _listing(tmp_path) == before


def test_several_sources_with_repeats_weights_class_images_and_caption_override(tmp_path):
    from conjure.config.sections import SourceConfig

    _image(tmp_path / "mine" / "a.png")
    (tmp_path / "mine" / "a.txt").write_text("zwx dog")
    _image(tmp_path / "mine" / "b.png")
    _image(tmp_path / "class" / "c.png")
    (tmp_path / "class" / "c.txt").write_text("its own caption")
    sources = [SourceConfig(path=str(tmp_path / "mine"), repeats=3, loss_weight=2.0),
               SourceConfig(path=str(tmp_path / "class"), class_images=True, caption=" a photo of a dog ")]
    result = scan_sources(sources)
    mine_a = Example(tmp_path / "mine" / "a.png", "zwx dog", 2.0, False)
    mine_b = Example(tmp_path / "mine" / "b.png", None, 2.0, False)
    assert result.examples == [mine_a] * 3 + [mine_b] * 3 + [
        Example(tmp_path / "class" / "c.png", "a photo of a dog", 1.0, True)]
    with pytest.raises(ConjureError, match="not found"):
        scan_sources(sources + [SourceConfig(path=str(tmp_path / "nowhere"))])


def _loops(folder: Path) -> None:
    """Every kind of symlink loop a data folder can hold: a link to itself (with an image suffix and without),
    two links to each other, and a folder link back to the folder itself."""
    (folder / "self.png").symlink_to("self.png")
    (folder / "self").symlink_to("self")
    (folder / "loop1").symlink_to("loop2")
    (folder / "loop2").symlink_to("loop1")
    (folder / "loopa.jpg").symlink_to("loopb.jpg")
    (folder / "loopb.jpg").symlink_to("loopa.jpg")
    (folder / "again").symlink_to(folder, target_is_directory=True)
    (folder / "x.txt").symlink_to("x.txt")


def test_symlink_loops_are_skipped_as_one_finding_each(tmp_path):
    """A loop once ended the scan with a raw "[Errno 40] Too many levels of symbolic links" (issue 21, D6)."""
    _image(tmp_path / "a.png")
    _loops(tmp_path)
    for check_images in (True, False):
        scan = scan_source(tmp_path, check_images=check_images)
        assert [e.image.name for e in scan.examples] == ["a.png"]
        assert sorted((p.name, reason) for p, reason in scan.skipped) == [
            ("loopa.jpg", "symlink loop (the link leads back to itself)"),
            ("loopb.jpg", "symlink loop (the link leads back to itself)"),
            ("self.png", "symlink loop (the link leads back to itself)"),
        ]
