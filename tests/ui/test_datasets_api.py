"""The data-set tab's API (docs/ui.md, "Data set tab"): every endpoint's answers and errors, and what each leaves
on disk (atomic captions, thumbnails only in the workspace, uploads that never overwrite, trash that never
deletes)."""

import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conjure.data.check import check_source
from conjure.data.sources import scan_source
from conjure.errors import ConjureError
from conjure.ui import dataset_files
from conjure.ui.app import create_app

BASE = "http://127.0.0.1:7860"


def _image(path: Path, size=(80, 60), colour=(200, 30, 30), caption: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _png_bytes(size=(40, 30), colour=(10, 200, 10)) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Api:
    def __init__(self, tmp_path: Path):
        self.folder = tmp_path / "data" / "set"
        self.folder.mkdir(parents=True)
        self.workspace = tmp_path / "ws"
        self.client = TestClient(create_app(self.workspace, start_runner=False), base_url=BASE)

    def open(self, folder: Path | None = None):
        return self.client.post("/api/datasets/open", json={"path": str(folder or self.folder)})

    def get(self, endpoint: str, **params):
        return self.client.get(f"/api/datasets/{endpoint}", params={"folder": str(self.folder), **params})

    def post(self, endpoint: str, **body):
        return self.client.post(f"/api/datasets/{endpoint}", json={"folder": str(self.folder), **body})

    def put_caption(self, name: str, caption: str):
        return self.client.put("/api/datasets/caption", json={"folder": str(self.folder), "name": name, "caption": caption})

    def upload(self, *files: tuple[str, bytes]):
        return self.client.post("/api/datasets/upload", data={"folder": str(self.folder)},
                                files=[("files", (name, content)) for name, content in files])

    def listing(self) -> dict[str, dict]:
        answer = self.get("images")
        assert answer.status_code == 200, answer.text
        return {image["name"]: image for image in answer.json()["images"]}


@pytest.fixture
def api(tmp_path):
    return Api(tmp_path)


@pytest.fixture
def opened(api):
    """A data set of three captioned/uncaptioned images, one in a subfolder, one with a mask; opened."""
    _image(api.folder / "a.png", caption="\ufeffa red cat, sitting\n")  # Notepad's BOM, an editor's newline
    _image(api.folder / "b.jpg", (60, 90), (20, 20, 200))
    _image(api.folder / "sub dir" / "c.png", caption="a blue dog, sitting", colour=(0, 0, 255))
    _image(api.folder / "a-masklabel.png", colour=(255, 255, 255))
    assert api.open().status_code == 200
    return api


# --- open and list ---------------------------------------------------------------------------------------


def test_open_and_list_data_sets(opened, tmp_path):
    answer = opened.open()  # again: listed once
    assert answer.json() == {"path": str(opened.folder), "images": 3}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert opened.open(empty).json() == {"path": str(empty), "images": 0}  # a folder to upload into
    assert opened.client.get("/api/datasets").json() == {
        "datasets": [{"path": str(opened.folder), "images": 3}, {"path": str(empty), "images": 0}]
    }
    empty.rmdir()  # gone since: still listed (the user sees it), its images cannot be
    assert opened.client.get("/api/datasets").json()["datasets"][1] == {"path": str(empty), "images": 0}
    answer = opened.client.get("/api/datasets/images", params={"folder": str(empty)})
    assert answer.status_code == 400 and answer.json()["error"].startswith(f"no such folder: {empty}")


def test_open_refuses_what_is_not_a_data_set_folder(api, tmp_path):
    def error(path: str) -> str:
        answer = api.client.post("/api/datasets/open", json={"path": path})
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]

    assert "full path" in error("data/set")
    assert "no such folder" in error(str(tmp_path / "nowhere"))
    _image(tmp_path / "file.png")
    assert "no such folder" in error(str(tmp_path / "file.png"))
    assert "whole drive" in error("/")
    assert "no such folder" in error("~no-such-user-here/x")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "dataset_dict.json").write_text("{}")
    assert "Hugging Face" in error(str(hf))
    assert api.client.post("/api/datasets/open", json={}).json() == {"error": "path: Field required"}
    assert api.client.get("/api/datasets").json() == {"datasets": []}


def test_images_lists_names_captions_sizes_and_masks(opened):
    (opened.folder / "b.txt").write_text("  \n")  # blank: training has no caption, the tab shows ""
    _image(opened.folder / ".hidden" / "x.png")
    _image(opened.folder / ".trash" / "old.png")
    (opened.folder / "broken.png").write_bytes(b"not a png")
    answer = opened.get("images").json()
    assert answer["folder"] == str(opened.folder)
    assert answer["images"] == [
        {"name": "a.png", "caption": "a red cat, sitting", "width": 80, "height": 60, "mask": True},
        {"name": "b.jpg", "caption": "", "width": 60, "height": 90, "mask": False},
        {"name": "broken.png", "caption": None, "width": None, "height": None, "mask": False},
        {"name": "sub dir/c.png", "caption": "a blue dog, sitting", "width": 80, "height": 60, "mask": False},
    ]


def test_a_caption_that_is_not_utf8_is_named_and_can_be_rewritten(opened):
    (opened.folder / "b.txt").write_bytes(b"caf\xe9")  # Latin-1: training refuses it too
    answer = opened.get("images")
    assert answer.status_code == 400 and "b.txt: caption file is not UTF-8" in answer.json()["error"]
    assert opened.put_caption("b.jpg", "café").status_code == 200
    assert opened.listing()["b.jpg"]["caption"] == "café"


def test_a_data_set_under_a_hidden_folder(api, tmp_path):
    api.folder = tmp_path / ".cache" / "set"
    api.folder.mkdir(parents=True)
    assert api.open().json() == {"path": str(api.folder), "images": 0}
    assert api.upload(("a.png", _png_bytes())).json()["added"] == ["a.png"]
    assert set(api.listing()) == {"a.png"}


def test_the_image_itself_and_missing_images(opened):
    answer = opened.get("image", name="sub dir/c.png")
    assert answer.status_code == 200 and answer.content == (opened.folder / "sub dir" / "c.png").read_bytes()
    assert answer.headers["content-type"] == "image/png"
    assert opened.get("image", name="a-masklabel.png").status_code == 200  # masks can be shown too
    for name in ("nope.png", "a.txt", "sub dir"):
        answer = opened.get("image", name=name)
        assert answer.status_code == 404 and answer.json() == {"error": f"no such image: {name}"}
    assert opened.get("image").json() == {"error": "name: Field required"}


# --- thumbnails --------------------------------------------------------------------------------------------


def test_thumbnails_are_upright_jpegs_cached_once_in_the_workspace(opened):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees
    _image(opened.folder / "photo.jpg", (400, 200), exif=exif)
    before = _files(opened.folder)

    answer = opened.get("thumb", name="photo.jpg", size=128)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    from io import BytesIO

    assert Image.open(BytesIO(answer.content)).size == (64, 128)  # upright: 200 wide, 400 tall -> long side 128
    thumbs = opened.workspace / "cache" / "thumbs"
    cached = [p for p in thumbs.rglob("*") if p.is_file()]
    assert len(cached) == 1 and cached[0].suffix == ".jpg"
    stamp = cached[0].stat().st_mtime_ns

    again = opened.get("thumb", name="photo.jpg", size=128)
    assert again.content == answer.content
    assert [p for p in thumbs.rglob("*") if p.is_file()] == cached and cached[0].stat().st_mtime_ns == stamp
    assert Image.open(BytesIO(opened.get("thumb", name="a.png").content)).size == (80, 60)  # never upscaled
    assert len([p for p in thumbs.rglob("*") if p.is_file()]) == 2  # another image: its own entry
    _image(opened.folder / "a.png", colour=(0, 0, 0))  # new content: a new entry, the old one stays valid
    opened.get("thumb", name="a.png")
    assert len([p for p in thumbs.rglob("*") if p.is_file()]) == 3
    _image(opened.folder / "a.png")  # back to the first content: the first entry again
    opened.get("thumb", name="a.png")
    assert len([p for p in thumbs.rglob("*") if p.is_file()]) == 3
    assert _files(opened.folder).keys() == before.keys()  # nothing written into the user's folder


def test_thumbnail_errors(opened):
    for size in (63, 1025):
        assert opened.get("thumb", name="a.png", size=size).status_code == 400
    assert opened.get("thumb", name="a.png", size="big").json()["error"].startswith("size: ")
    assert opened.get("thumb", name="nope.png").status_code == 404
    (opened.folder / "broken.png").write_bytes(b"not a png")
    answer = opened.get("thumb", name="broken.png")
    assert answer.status_code == 400 and "cannot read image" in answer.json()["error"]


# --- captions ------------------------------------------------------------------------------------------------


def test_caption_write_is_atomic_and_exact(opened):
    answer = opened.put_caption("b.jpg", "a blue square, ünïcode")
    assert answer.json() == {"name": "b.jpg", "caption": "a blue square, ünïcode"}
    assert (opened.folder / "b.txt").read_bytes() == "a blue square, ünïcode".encode()
    os.chmod(opened.folder / "a.txt", 0o640)
    assert opened.put_caption("a.png", "").status_code == 200
    assert (opened.folder / "a.txt").read_bytes() == b""  # an empty caption is an empty file
    assert (opened.folder / "a.txt").stat().st_mode & 0o777 == 0o640  # permissions kept
    opened.put_caption("sub dir/c.png", "line one\nline two")
    assert (opened.folder / "sub dir" / "c.txt").read_text() == "line one\nline two"
    assert not [p for p in opened.folder.rglob("*") if p.name.startswith(".")]  # no temporary files left
    assert opened.listing()["b.jpg"]["caption"] == "a blue square, ünïcode"


def test_caption_errors(opened):
    assert opened.put_caption("nope.png", "x").status_code == 404
    assert opened.put_caption("a-masklabel.png", "x").status_code == 404  # a mask has no caption
    assert not (opened.folder / "nope.txt").exists() and not (opened.folder / "a-masklabel.txt").exists()
    bad = opened.client.put("/api/datasets/caption", json={"folder": str(opened.folder), "name": "a.png"})
    assert bad.status_code == 400 and bad.json() == {"error": "caption: Field required"}
    extra = {"folder": str(opened.folder), "name": "a.png", "caption": "x", "captoin": "y"}
    assert opened.client.put("/api/datasets/caption", json=extra).status_code == 400


# --- bulk edits and tags -----------------------------------------------------------------------------------


def test_bulk_prefix_suffix_and_replace(opened):
    assert opened.post("bulk", names=None, op="prefix", text="zwx, ").json() == {"changed": 3}
    captions = {name: image["caption"] for name, image in opened.listing().items()}
    assert captions == {"a.png": "zwx, a red cat, sitting", "b.jpg": "zwx,", "sub dir/c.png": "zwx, a blue dog, sitting"}
    assert (opened.folder / "b.txt").read_text() == "zwx, "  # an image without a caption gets a file
    assert opened.post("bulk", op="prefix", text="zwx, ").json() == {"changed": 0}  # added once only

    assert opened.post("bulk", names=["a.png"], op="suffix", text=", 4k").json() == {"changed": 1}
    assert (opened.folder / "a.txt").read_text() == "zwx, a red cat, sitting, 4k"
    assert opened.post("bulk", names=["a.png", "sub dir/c.png"], op="replace", find="sitting", text="standing").json() == {"changed": 2}
    assert (opened.folder / "sub dir" / "c.txt").read_text() == "zwx, a blue dog, standing"
    assert opened.post("bulk", op="replace", find="zwx, ", text="").json() == {"changed": 3}
    assert (opened.folder / "b.txt").read_text() == ""
    assert opened.post("bulk", op="replace", find="absent", text="x").json() == {"changed": 0}
    assert not [p for p in opened.folder.rglob(".*")]  # no temporary files left


def test_bulk_errors_change_nothing(opened):
    before = _files(opened.folder)
    cases = [
        (dict(op="replace", text="x"), 400, "find: give the text to replace"),
        (dict(op="prefix", text=""), 400, "text: give the prefix to add"),
        (dict(op="suffix", text="x", find="y"), 400, "find: only replace takes it, not suffix"),
        (dict(op="shout", text="x"), 400, None),
        (dict(op="prefix", text="x", names=["a.png", "nope.png"]), 404, "no such image: nope.png"),
    ]
    for body, status, message in cases:
        answer = opened.post("bulk", **body)
        assert answer.status_code == status, (body, answer.text)
        if message:
            assert answer.json() == {"error": message}
    assert _files(opened.folder) == before


def test_tags_are_counted_per_caption_most_common_first(opened):
    opened.put_caption("b.jpg", "a blue square , sitting, sitting,, ")
    assert opened.get("tags").json() == {"tags": [
        {"tag": "sitting", "count": 3}, {"tag": "a blue dog", "count": 1}, {"tag": "a blue square", "count": 1},
        {"tag": "a red cat", "count": 1},
    ]}
    assert opened.get("tags", delimiter=" ").json()["tags"][0] == {"tag": "a", "count": 3}
    assert opened.get("tags", delimiter="").json() == {"error": "delimiter: give the text that separates tags (e.g. ,)"}


# --- uploads ---------------------------------------------------------------------------------------------------


def test_upload_adds_images_under_safe_names_without_overwriting(opened):
    a_before = (opened.folder / "a.png").read_bytes()
    png = _png_bytes()
    answer = opened.upload(("a.png", png), ("new.png", png), ("new.png", png), ("a.jpg", png),
                           ("../../escape.png", png), ("C:\\Users\\me\\win.png", png), (".hidden.png", png),
                           ("CON.png", png), ("noext", png), ('a<b>?%2e.PNG', png))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"added": ["a-1.png", "new.png", "new-1.png", "a-2.jpg", "escape.png", "win.png",
                                       "hidden.png", "_CON.png", "noext.png", "ab2e.PNG"], "refused": []}
    assert (opened.folder / "a.png").read_bytes() == a_before
    assert (opened.folder / "new-1.png").read_bytes() == png
    assert not (opened.folder.parent / "escape.png").exists()
    assert not [p for p in opened.folder.rglob(".*")]  # no temporary files, nothing hidden
    assert "a-2.jpg" in opened.listing()  # (an a.jpg would have shared a.txt with a.png)


def test_safe_names():
    assert dataset_files.safe_name("a\x01b\u200b\tc.png") == "abc.png"  # control and invisible characters
    assert dataset_files.safe_name(" .. x. ") == "x"
    assert dataset_files.safe_name("x" * 300 + ".png") == "x" * 120 + ".png"
    for name in ("", "...", "a/", "..\\"):
        with pytest.raises(ConjureError, match="no usable file name"):
            dataset_files.safe_name(name)


def test_upload_refuses_what_is_not_an_image(opened, monkeypatch):
    before = _files(opened.folder)
    answer = opened.upload(("notes.txt", b"hello"), ("fake.png", b"\x89PNG not really"), ("ok.png", _png_bytes()))
    assert answer.status_code == 200
    assert answer.json()["added"] == ["ok.png"]
    refused = {item["name"]: item["reason"] for item in answer.json()["refused"]}
    assert refused.keys() == {"notes.txt", "fake.png"} and all("cannot read image" in r for r in refused.values())

    answer = opened.upload(("notes.txt", b"hello"))
    assert answer.status_code == 400 and answer.json()["error"].startswith("nothing added: notes.txt: cannot read")
    monkeypatch.setattr(dataset_files, "MAX_UPLOAD_BYTES", 100)
    answer = opened.upload(("big.png", _png_bytes((200, 200))))
    assert answer.status_code == 400 and answer.json() == {"error": "nothing added: big.png: over 0 MB"}
    assert set(_files(opened.folder)) == set(before) | {"ok.png"}


def test_upload_needs_a_folder_and_files(opened):
    client = opened.client
    assert client.post("/api/datasets/upload", data={"folder": str(opened.folder)}).json() == {
        "error": "files: give one or more image files"}
    assert client.post("/api/datasets/upload", files=[("files", ("x.png", _png_bytes()))]).json() == {
        "error": "folder: give the data set's folder"}
    assert client.post("/api/datasets/upload", data={"folder": str(opened.folder), "files": "text"}).status_code == 400


# --- trash ---------------------------------------------------------------------------------------------------------


def test_trash_moves_image_caption_and_mask_and_never_deletes(opened):
    everything = _files(opened.folder)
    answer = opened.post("trash", names=["a.png", "sub dir/c.png"])
    assert answer.json() == {"moved": ["a.png", "sub dir/c.png"]}
    after = _files(opened.folder)
    assert set(after) == {"b.jpg", ".trash/a.png", ".trash/a.txt", ".trash/a-masklabel.png",
                          ".trash/sub dir/c.png", ".trash/sub dir/c.txt"}
    assert sorted(after.values()) == sorted(everything.values())  # every byte still there
    assert set(opened.listing()) == {"b.jpg"}

    _image(opened.folder / "a.png", caption="another a")  # the same names again: trashed beside, suffixed
    _image(opened.folder / "a-masklabel.png")
    opened.post("trash", names=["a.png"])
    assert {".trash/a-1.png", ".trash/a-1.txt", ".trash/a-1-masklabel.png"} <= set(_files(opened.folder))
    assert (opened.folder / ".trash" / "a-1.txt").read_text() == "another a"


def test_trash_refuses_before_moving_anything(opened):
    before = _files(opened.folder)
    answer = opened.post("trash", names=["a.png", "nope.png"])
    assert answer.status_code == 404 and answer.json() == {"error": "no such image: nope.png"}
    assert opened.post("trash", names=["a.png", "../x.png"]).status_code == 403
    assert opened.post("trash", names=["a-masklabel.png"]).status_code == 404  # a mask goes with its image
    assert _files(opened.folder) == before


# --- jsonl and check -----------------------------------------------------------------------------------------------


def test_jsonl_round_trips_through_scan_source(opened):
    answer = opened.post("jsonl", out="set.jsonl")
    out = opened.folder / "set.jsonl"
    assert answer.json() == {"path": str(out), "lines": 3}
    expect = [(e.image, e.caption) for e in scan_source(opened.folder, check_images=False).examples]
    assert [(e.image, e.caption) for e in scan_source(out, check_images=False).examples] == expect
    assert json.loads(out.read_text().splitlines()[0]) == {"image": "a.png", "text": "a red cat, sitting"}
    assert opened.post("jsonl", out="lists/set.jsonl").json()["lines"] == 3  # a subfolder is fine
    assert json.loads((opened.folder / "lists" / "set.jsonl").read_text().splitlines()[0])["image"] == "../a.png"

    assert opened.post("jsonl", out="set.jsonl").json() == {"error": "set.jsonl exists: choose another name"}
    assert "must end in .jsonl" in opened.post("jsonl", out="set.txt").json()["error"]
    for out in ("../set.jsonl", ".set.jsonl", "/tmp/set.jsonl"):
        assert opened.post("jsonl", out=out).status_code == 403


def test_check_gives_the_cli_report(opened):
    answer = opened.post("check", resolution=64)
    assert answer.status_code == 200
    assert answer.json() == check_source(opened.folder, resolution=64).to_dict()
    assert answer.json()["counts"]["images"] == 3
    assert opened.post("check").json()["buckets"]["resolution"] == 512
    assert opened.post("check", resolution=10).status_code == 400
    assert opened.post("check", resolution="big").json()["error"].startswith("resolution: ")


def test_the_check_settings_come_from_one_model(opened):
    """CheckSettings is the one source of the check's defaults (issue 14): the CLI's options, check_source's
    keywords, the API's body and the schema the page reads its form's default from."""
    from conjure.cli import build_parser
    from conjure.data.check_settings import CheckSettings

    defaults = CheckSettings().model_dump()
    schema = opened.client.get("/api/datasets/check/schema").json()
    assert {name: field["default"] for name, field in schema["properties"].items()} == defaults
    cli = vars(build_parser().parse_args(["dataset", "check", "somewhere"]))
    assert {name: cli[name] for name in defaults} == defaults
    assert opened.post("check").json() == check_source(opened.folder, **defaults).to_dict()
    answer = opened.post("check", resolution=128, bucket_step=32, max_tokens=5)
    assert answer.json() == check_source(opened.folder, resolution=128, bucket_step=32, max_tokens=5).to_dict()
    assert answer.json()["buckets"]["step"] == 32
    assert opened.post("check", max_tokens=2).json() == {
        "error": "max tokens must be at least 3 (start, end and one word), got 2"}


def test_symlink_loops_are_skipped_by_every_route(api):
    """issue 21, D6: a loop (two links to each other, one to itself, a folder link back) in an opened folder made
    open, the list of all data sets, images and check answer 500."""
    _image(api.folder / "a.png", caption="a cat")
    assert api.open().status_code == 200
    other = api.folder.parent / "other"
    _image(other / "b.png")
    assert api.open(other).status_code == 200
    # the loops appear after opening (the list of all folders broke) and in a folder opened afterwards
    for folder in (api.folder, other):
        (folder / "loop1").symlink_to("loop2")
        (folder / "loop2").symlink_to("loop1")
        (folder / "self.png").symlink_to("self.png")
        (folder / "self.txt").symlink_to("self.txt")
        (folder / "again").symlink_to(folder, target_is_directory=True)
    third = api.folder.parent / "third"
    _image(third / "c.png")
    (third / "loopa").symlink_to("loopb")
    (third / "loopb").symlink_to("loopa")
    assert api.open(third).json() == {"path": str(third), "images": 1}
    assert api.client.get("/api/datasets").json()["datasets"] == [
        {"path": str(api.folder), "images": 1}, {"path": str(other), "images": 1}, {"path": str(third), "images": 1}]
    assert [image["name"] for image in api.get("images").json()["images"]] == ["a.png"]
    assert api.get("tags").json() == {"tags": [{"tag": "a cat", "count": 1}]}
    for name in ("self.png", "loop1", "self.txt"):
        assert api.get("image", name=name).status_code in (403, 404), name
        assert api.put_caption(name, "x").status_code in (403, 404), name
    report = api.post("check").json()
    assert report["counts"]["usable"] == 1
    assert [(Path(p["path"]).name, p["message"]) for p in report["problems"] if p["kind"] == "missing"] == [
        ("self.png", "symlink loop (the link leads back to itself)")]
    assert api.post("jsonl", out="all.jsonl").json()["lines"] == 1
    assert api.post("bulk", names=None, op="suffix", text=", x").json() == {"changed": 1}
    assert api.post("trash", names=["a.png"]).json() == {"moved": ["a.png"]}


def test_a_caption_write_racing_a_trash_of_its_image_leaves_no_orphan(api, monkeypatch):
    """issue 21, D15: PUT caption checked that the image was there, a trash moved it away, then the caption
    was written: an orphan .txt (2 of 25 races). Here the trash arrives while the caption is being written."""
    import threading

    _image(api.folder / "x.png")
    assert api.open().status_code == 200
    writing, go = threading.Event(), threading.Event()
    original = dataset_files.atomic_write_text

    def slow_write(path, text):
        writing.set()
        go.wait(5)
        original(path, text)

    monkeypatch.setattr(dataset_files, "atomic_write_text", slow_write)
    answers = {}
    caption = threading.Thread(target=lambda: answers.update(caption=api.put_caption("x.png", "a cat")))
    caption.start()
    assert writing.wait(5)
    other = TestClient(api.client.app, base_url=BASE)
    trash = threading.Thread(target=lambda: answers.update(trash=other.post(
        "/api/datasets/trash", json={"folder": str(api.folder), "names": ["x.png"]})))
    trash.start()
    trash.join(0.5)  # without the folder's lock the trash is done by now
    go.set()
    caption.join(10)
    trash.join(10)
    assert answers["caption"].status_code == 200 and answers["trash"].json() == {"moved": ["x.png"]}
    assert not (api.folder / "x.txt").exists() and (api.folder / ".trash" / "x.txt").read_text() == "a cat"


def test_opening_a_symlink_loop_is_one_line(api):
    """Opening a link to itself (or one of two links to each other) answered 500 (RuntimeError from resolve)."""
    (api.folder / "self").symlink_to(api.folder / "self")
    (api.folder / "a").symlink_to(api.folder / "b")
    (api.folder / "b").symlink_to(api.folder / "a")
    for path in ("self", "a", "self/inner"):
        answer = api.open(api.folder / path)
        assert answer.status_code == 400 and "symlink loop" in answer.json()["error"], (path, answer.text)
