"""`conjure dataset check` and `conjure dataset jsonl`: exit codes, the JSON report, refusing to overwrite, and
a data folder that is byte-for-byte the same afterwards."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image



def _image(path: Path, size=(512, 512), caption: str | None = None, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file and folder under `root`, hidden ones included: content hash, size and modification time."""
    entries = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = Path(folder, name)
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            entries[path.relative_to(root).as_posix()] = (digest, stat.st_size, stat.st_mtime_ns)
    return entries


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """A folder with one error (an empty image) and warnings (duplicate, small, no caption, long caption)."""
    root = tmp_path / "my photos"
    _image(root / "a cat.png", caption="a photo of a cat")
    _image(root / "sub" / "copy.png", caption="the same cat")
    _image(root / "sub" / "small.jpg", (300, 200), colour=(10, 200, 10))
    _image(root / "long.png", caption="a very long caption " * 30, colour=(0, 0, 255))
    (root / "broken.png").write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"not read")
    return root


def test_check_prints_one_line_per_problem_and_exits_1_on_errors(messy_folder, run_cli):
    code, out, err = run_cli("dataset", "check", messy_folder)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == f"{messy_folder / 'broken.png'}: error: cannot read image (empty file)"
    assert f"{messy_folder / 'sub' / 'copy.png'}: warning: same file contents as {messy_folder / 'a cat.png'}" in lines
    assert any(line.startswith(f"{messy_folder / 'long.png'}: warning: caption is ") for line in lines)
    assert f"{messy_folder / 'sub' / 'small.jpg'}: warning: no caption file (small.txt)" in lines
    small = f"{messy_folder / 'sub' / 'small.jpg'}: warning: 300x200 is under 512 px on its shorter side"
    assert any(line.startswith(small) for line in lines)
    assert lines[-1] == "result: not ready: fix the errors (1 error, 4 warnings)"
    assert f"source: {messy_folder}: 5 images, 4 usable, 1 unreadable" in lines


def test_check_json_report(messy_folder, run_cli):
    code, out, _ = run_cli("dataset", "check", messy_folder, "--json", "--resolution", "1024")
    assert code == 1
    report = json.loads(out)
    assert list(report) == ["source", "counts", "resolutions", "buckets", "problems", "ok"]
    assert report["ok"] is False and report["source"] == str(messy_folder)
    assert report["counts"]["images"] == 5 and report["counts"]["errors"] == 1
    assert report["buckets"]["resolution"] == 1024
    assert {"path", "severity", "kind", "message"} == set(report["problems"][0])
    kinds = {(Path(p["path"]).name, p["kind"]) for p in report["problems"]}
    assert ("broken.png", "unreadable") in kinds and ("a cat.png", "small_image") in kinds  # 512 < 1024


def test_check_exits_0_with_warnings_only(tmp_path, run_cli):
    _image(tmp_path / "a.png", (64, 64))
    code, out, _ = run_cli("dataset", "check", tmp_path, "--resolution", "64", "--bucket-step", "32")
    assert code == 0
    assert out.splitlines()[-1] == "result: ok (0 errors, 1 warning)"  # no captions
    code, out, _ = run_cli("dataset", "check", tmp_path, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize(
    "args, needle",
    [
        (["nope"], "data source not found"),
        (["."], "no images in"),
        (["images", "--resolution", "500"], "resolution 500 must be a positive multiple of the bucket step 64"),
        (["images", "--max-tokens", "1"], "max tokens must be at least 3"),
    ],
)
def test_check_bad_arguments_are_one_line_errors(tmp_path, monkeypatch, args, needle, run_cli, assert_one_line_error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _image(tmp_path / "images" / "a.png")
    if args == ["."]:
        monkeypatch.chdir(tmp_path / "empty")
    code, out, err = run_cli("dataset", "check", *args)
    assert out == ""
    assert_one_line_error(code, err, needle)


def test_jsonl_writes_refuses_to_overwrite_and_reads_back(tmp_path, messy_folder, run_cli, assert_one_line_error):
    out_file = tmp_path / "lists" / "data.jsonl"
    code, out, _ = run_cli("dataset", "jsonl", messy_folder, out_file)
    assert code == 0 and out == f"wrote {out_file} (5 images)\n"
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert records[0] == {"image": "../my photos/a cat.png", "text": "a photo of a cat"}
    assert {"image": "../my photos/sub/small.jpg", "text": None} in records
    before = out_file.read_bytes()
    code, _, err = run_cli("dataset", "jsonl", messy_folder, out_file)
    assert_one_line_error(code, err, "exists; use --force to overwrite")
    assert out_file.read_bytes() == before
    assert run_cli("dataset", "jsonl", messy_folder, out_file, "--force")[0] == 0
    # The JSONL is a source like the folder: the same report, but for the paths' spelling.
    code, out, _ = run_cli("dataset", "check", out_file)
    assert code == 1 and out.splitlines()[-1] == "result: not ready: fix the errors (1 error, 4 warnings)"


def test_the_data_folder_is_unchanged_byte_for_byte(tmp_path, messy_folder, run_cli):
    before = _listing(messy_folder)
    run_cli("dataset", "check", messy_folder)
    run_cli("dataset", "check", messy_folder, "--json")
    run_cli("dataset", "jsonl", messy_folder, tmp_path / "data.jsonl")
    run_cli("dataset", "check", tmp_path / "data.jsonl")
    assert _listing(messy_folder) == before


def test_check_and_train_skip_symlink_loops(tmp_path, ti_config, image_folder, run_cli):
    """issue 21, D6: `dataset check` and `train` once exited with "error: [Errno 40] Too many levels of
    symbolic links"; a loop is one finding (check) or one skipped file (train)."""
    (image_folder / "self.png").symlink_to("self.png")
    (image_folder / "loop1").symlink_to("loop2")
    (image_folder / "loop2").symlink_to("loop1")
    (image_folder / "again").symlink_to(image_folder, target_is_directory=True)
    code, out, err = run_cli("dataset", "check", image_folder)
    assert code == 1 and "Errno" not in out + err, (out, err)
    assert f"{image_folder / 'self.png'}: error: symlink loop" in out
    raw = ti_config(basic={"max_train_steps": 1, "validate_every_n_steps": None}, validation={"at_start": False})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(raw))
    code, out, err = run_cli("train", config)
    assert code == 0 and "Errno" not in err, err
    assert f"skipping {image_folder / 'self.png'}: symlink loop" in err
