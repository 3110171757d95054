"""The data-set check finds every kind of problem once, counts what a source holds, and writes JSONL sources
that read back the same."""

import json
from pathlib import Path

import pytest
from PIL import Image

from conjure.data.buckets import assign_bucket, make_buckets
from conjure.data.check import KINDS, check_source
from conjure.data.sources import write_jsonl
from conjure.data.sources import scan_source
from conjure.errors import ConjureError
from conjure.models.tokenizer import clip_tokenizer


def _image(path: Path, size=(512, 512), caption: str | None = None, seed: int = 0) -> Path:
    """A plain image of `size` (width, height) in a colour of its own per `seed` (images that differ in seed or
    size differ in bytes), with a caption file when `caption` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (seed * 37 % 256, 120, 200)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _findings(report, root: Path) -> set[tuple[str, str]]:
    """(path relative to `root`, "." for the source itself; kind) of each finding."""
    return {(Path(p.path).relative_to(root).as_posix(), p.kind) for p in report.problems}


def test_a_clean_folder_has_no_problems(tmp_path):
    _image(tmp_path / "a.png", caption="a photo of a cat")
    _image(tmp_path / "b.png", (768, 512), caption="a photo of a dog", seed=1)
    report = check_source(tmp_path)
    assert report.problems == [] and report.ok
    assert report.counts == {
        "images": 2, "usable": 2, "unreadable": 0, "with_caption": 2, "without_caption": 0, "duplicates": 0,
        "errors": 0, "warnings": 0,
    }
    assert report.text().endswith("result: ok (0 errors, 0 warnings)\n")


def test_every_kind_of_problem_in_a_folder(tmp_path):
    good = _image(tmp_path / "good.png", caption="a photo of a cat")
    (tmp_path / "zero.png").write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "sub dir" / "copy of good.png").write_bytes(good.read_bytes())
    _image(tmp_path / "tiny.png", (100, 80), caption="a small cat", seed=2)
    _image(tmp_path / "long.png", caption="a photo of a cat " * 20, seed=3)
    _image(tmp_path / "blank.png", caption="  \n", seed=4)
    _image(tmp_path / "nocaption.png", seed=5)
    (tmp_path / "stray.txt").write_text("a caption whose image was renamed")

    report = check_source(tmp_path, resolution=512)

    assert _findings(report, tmp_path) == {
        ("zero.png", "unreadable"),
        ("truncated.png", "unreadable"),
        ("text.png", "unreadable"),
        ("sub dir/copy of good.png", "duplicate"),
        ("sub dir/copy of good.png", "missing_caption"),
        ("tiny.png", "small_image"),
        ("long.png", "long_caption"),
        ("blank.png", "empty_caption"),
        ("nocaption.png", "missing_caption"),
        ("stray.txt", "orphan_caption"),
    }
    assert all(problem.severity == KINDS[problem.kind][0] for problem in report.problems)
    severities = [problem.severity for problem in report.problems]
    assert severities == sorted(severities)  # "error" < "warning": errors first
    messages = {Path(p.path).name + " " + p.kind: p.message for p in report.problems}
    assert messages["zero.png unreadable"] == "cannot read image (empty file)"
    assert "truncated" in messages["truncated.png unreadable"]
    assert "not an image" in messages["text.png unreadable"]
    assert messages["copy of good.png duplicate"] == f"same file contents as {good}"
    assert messages["tiny.png small_image"].startswith("100x80 is under 512 px")
    assert messages["blank.png empty_caption"] == "caption file blank.txt is empty"
    assert messages["nocaption.png missing_caption"] == "no caption file (nocaption.txt)"
    tokens = len(clip_tokenizer()("a photo of a cat " * 20).input_ids)
    assert messages["long.png long_caption"].startswith(f"caption is {tokens} tokens, over the text encoder's 77")
    assert not report.ok
    assert report.counts == {
        "images": 9, "usable": 6, "unreadable": 3, "with_caption": 3, "without_caption": 3, "duplicates": 1,
        "errors": 3, "warnings": 7,
    }
    for problem in report.problems:
        assert f"{problem.path}: {problem.severity}: {problem.message}" in report.text()


def test_warnings_alone_are_ok(tmp_path):
    _image(tmp_path / "tiny.png", (64, 64))
    report = check_source(tmp_path)
    assert report.ok and report.counts["warnings"] == 2  # small, and no captions
    assert "result: ok (0 errors, 2 warnings)" in report.text()


def test_nothing_readable_is_an_error_for_the_source(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("hello")
    report = check_source(tmp_path)
    assert _findings(report, tmp_path) == {("a.png", "unreadable"), ("b.jpg", "unreadable"), (".", "no_usable_images")}
    assert not report.ok and report.resolutions["smallest"] is None and report.buckets["counts"] == []
    assert "result: not ready: fix the errors (3 errors, 0 warnings)" in report.text()


def test_no_captions_at_all_is_one_finding_not_one_per_image(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", seed=i)
    report = check_source(tmp_path)
    assert [(p.path, p.kind) for p in report.problems] == [(str(tmp_path), "no_captions")]
    assert "textual inversion uses its prompt templates" in report.problems[0].message


def test_caption_length_limit_counts_start_and_end_tokens(tmp_path):
    _image(tmp_path / "fits.png", caption=" ".join(["cat"] * 75))  # 75 words + start + end = 77
    _image(tmp_path / "over.png", caption=" ".join(["cat"] * 75) + " dog", seed=1)
    report = check_source(tmp_path)
    assert _findings(report, tmp_path) == {("over.png", "long_caption")}
    assert report.problems[0].message.endswith('training ignores the end: "dog"')
    assert _findings(check_source(tmp_path, max_tokens=20), tmp_path) == {
        ("fits.png", "long_caption"), ("over.png", "long_caption")}


def test_jsonl_source_missing_file_listed_twice_and_missing_text(tmp_path):
    _image(tmp_path / "images" / "a.png", caption="ignored: a .jsonl has its own captions")
    lines = [
        {"image": "images/a.png", "text": "a cat"},
        {"image": "images/a.png", "text": "the same cat"},
        {"image": "images/gone.png", "text": "a dog"},
        {"image": "images/a.png"},
    ]
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines))
    report = check_source(source)
    found = [(Path(p.path).name, p.kind, p.message) for p in report.problems]
    assert found == [
        ("gone.png", "missing", "file not found"),
        ("a.png", "missing_caption", 'no caption ("text" is missing or blank)'),
        ("a.png", "duplicate", "listed more than once"),
        ("a.png", "duplicate", "listed more than once"),
    ]
    assert report.counts["images"] == 4 and report.counts["unreadable"] == 1 and not report.ok


def test_sizes_and_buckets(tmp_path):
    sizes = [(512, 512), (512, 512), (1024, 768), (300, 200), (2200, 2100), (640, 360)]  # (width, height)
    for i, size in enumerate(sizes):
        _image(tmp_path / f"{i}.png", size, caption="a photo", seed=i)
    report = check_source(tmp_path, resolution=512)
    assert report.resolutions == {
        "shorter_side": [
            {"min": 0, "max": 255, "count": 1},
            {"min": 256, "max": 511, "count": 1},
            {"min": 512, "max": 767, "count": 2},
            {"min": 768, "max": 1023, "count": 1},
            {"min": 2048, "max": None, "count": 1},
        ],
        "most_common": [
            {"height": 512, "width": 512, "count": 2},
            {"height": 768, "width": 1024, "count": 1},
            {"height": 200, "width": 300, "count": 1},
            {"height": 2100, "width": 2200, "count": 1},
            {"height": 360, "width": 640, "count": 1},
        ],
        "smallest": {"height": 200, "width": 300},
        "largest": {"height": 2100, "width": 2200},
    }
    buckets = make_buckets(512)
    expected = {}
    for width, height in sizes:
        bucket = assign_bucket((height, width), buckets)
        expected[bucket] = expected.get(bucket, 0) + 1
    counts = report.buckets["counts"]
    assert {(c["height"], c["width"]): c["count"] for c in counts} == expected
    assert [(c["height"], c["width"]) for c in counts] == [b for b in buckets if b in expected]
    assert report.buckets["resolution"] == 512 and report.buckets["step"] == 64
    assert _findings(report, tmp_path) == {("3.png", "small_image"), ("5.png", "small_image")}
    assert "buckets at 512 px (width x height): " in report.text()


def test_image_size_is_the_upright_size(tmp_path):
    image = Image.effect_noise((300, 600), 40).convert("RGB")  # 300 wide, 600 high, stored turned on its side
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    image.save(tmp_path / "turned.jpg", exif=exif)
    report = check_source(tmp_path)
    assert report.resolutions["most_common"] == [{"height": 300, "width": 600, "count": 1}]


def test_report_dict_is_json_with_the_stable_keys(tmp_path):
    _image(tmp_path / "a.png", (64, 64))
    data = json.loads(json.dumps(check_source(tmp_path).to_dict()))
    assert list(data) == ["source", "counts", "resolutions", "buckets", "problems", "ok"]
    assert data["ok"] is True and data["source"] == str(tmp_path)
    assert all(list(problem) == ["path", "severity", "kind", "message"] for problem in data["problems"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=500), "resolution 500 must be a positive multiple of the bucket step 64"),
        (dict(bucket_step=0), "step must be positive"),
        (dict(max_tokens=2), "max tokens must be at least 3"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    _image(tmp_path / "a.png")
    with pytest.raises(ConjureError, match=message):
        check_source(tmp_path, **kwargs)


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(ConjureError, match="data source not found"):
        check_source(tmp_path / "nope")
    with pytest.raises(ConjureError, match="no images in"):
        check_source(tmp_path)


def _write_captioned_folder(root: Path) -> Path:
    _image(root / "a cat.png", caption="a cat, on a sofa")
    _image(root / "sub folder" / "b.jpg", caption="café ☕ \"quoted\"\nsecond line", seed=1)
    _image(root / "sub folder" / "deeper" / "c.webp", seed=2)
    (root / "broken.png").write_bytes(b"")  # listed: the JSONL mirrors the folder, the check finds it
    return root


@pytest.mark.parametrize("out_name", ["elsewhere/list.jsonl", "images/data.jsonl", "list.JSONL"])
def test_jsonl_reads_back_as_the_same_examples(tmp_path, out_name):
    folder = _write_captioned_folder(tmp_path / "images")
    out = tmp_path / out_name
    assert write_jsonl(folder, out) == 4
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all("\\" not in line["image"] and not Path(line["image"]).is_absolute() for line in lines)
    assert lines[-1]["text"] is None  # c.webp has no caption
    folder_examples = scan_source(folder, check_images=False).examples
    jsonl_examples = scan_source(out, check_images=False).examples
    assert [(e.image.resolve(), e.caption) for e in jsonl_examples] == [
        (e.image.resolve(), e.caption) for e in folder_examples]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []  # conjure.files temporaries


def test_jsonl_refuses_to_overwrite_without_force(tmp_path):
    folder = _write_captioned_folder(tmp_path / "images")
    out = tmp_path / "data.jsonl"
    out.write_text("precious\n")
    with pytest.raises(ConjureError, match="exists; use --force"):
        write_jsonl(folder, out)
    assert out.read_text() == "precious\n"
    assert write_jsonl(folder, out, force=True) == 4
    assert "a cat.png" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "folder, out, message",
    [
        ("nope", "data.jsonl", "folder not found"),
        ("file.png", "data.jsonl", "not a folder"),
        ("images", "data.txt", "must end in .jsonl"),
        ("images", "folder.jsonl", "is a folder"),
    ],
)
def test_jsonl_bad_arguments(tmp_path, folder, out, message):
    _write_captioned_folder(tmp_path / "images")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConjureError, match=message):
        write_jsonl(tmp_path / folder, tmp_path / out)


def test_symlink_loops_are_findings_not_a_crash(tmp_path):
    """issue 21, D6: one loop ended `dataset check` with a raw errno line."""
    _image(tmp_path / "a.png", caption="a photo")
    (tmp_path / "self.png").symlink_to("self.png")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "again").symlink_to(tmp_path, target_is_directory=True)
    report = check_source(tmp_path)
    assert ("self.png", "missing") in _findings(report, tmp_path)
    assert [p.message for p in report.problems if p.kind == "missing"] == ["symlink loop (the link leads back to itself)"]
    assert report.counts["usable"] == 1
    lines = write_jsonl(tmp_path, tmp_path / "out.jsonl")
    assert lines == 1
