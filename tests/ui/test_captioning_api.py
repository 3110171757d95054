"""The data-set tab's captioning (conjure.ui.captioning): "Caption missing" and "Caption selected" run in the
background and report their progress; captions land in the folder (editable after, as any caption); the gate's
rules hold (opened folders only, names inside them, caption files linking out refused); one run at a time."""

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conjure.data import autocaption
from conjure.models.tiny_captioner import write_tiny_captioner
from conjure.ui.app import create_app

FAST = {"max_new_tokens": 6, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture
def opened(tmp_path):
    folder = tmp_path / "set"
    for name, colour in [("a.png", (200, 20, 20)), ("b.jpg", (20, 200, 20)), ("sub/c.png", (20, 20, 200))]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), colour).save(folder / name)
    (folder / "b.txt").write_text("my own words", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png")
    client = TestClient(create_app(tmp_path / "ws", start_runner=False), base_url="http://127.0.0.1:7860")
    assert client.post("/api/datasets/open", json={"path": str(folder)}).status_code == 200
    return client, folder


def _finish(client: TestClient) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get("/api/datasets/caption").json()
        if progress["state"] not in ("loading", "captioning"):
            return progress
        time.sleep(0.05)
    raise AssertionError("captioning did not finish in 60 s")


def test_caption_missing_writes_the_captions_the_page_then_shows(opened, tiny):
    client, folder = opened
    assert client.get("/api/datasets/caption").json() == {"state": "idle"}
    answer = client.post("/api/datasets/caption", json={"folder": str(folder), "model": str(tiny), "prefix": "ohwx",
                                                         "batch_size": 2, **FAST})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "loading" and answer.json()["total"] == 4
    progress = _finish(client)
    assert progress["state"] == "done", progress
    assert sorted(progress["written"]) == ["a.png", "sub/c.png"] and progress["kept"] == 1
    assert progress["skipped"] == [{"name": "broken.png",
                                    "reason": "cannot read image (not an image format PIL recognises)"}]
    assert progress["done"] == progress["total"] == 3
    listing = {i["name"]: i["caption"] for i in client.get("/api/datasets/images",
                                                             params={"folder": str(folder)}).json()["images"]}
    assert listing["b.jpg"] == "my own words"
    assert listing["a.png"].startswith("ohwx, ") and listing["sub/c.png"].startswith("ohwx, ")
    edited = client.put("/api/datasets/caption", json={"folder": str(folder), "name": "a.png", "caption": "fixed"})
    assert edited.status_code == 200 and (folder / "a.txt").read_text(encoding="utf-8") == "fixed"


def test_caption_selected_replaces_only_with_overwrite(opened, tiny):
    client, folder = opened
    body = {"folder": str(folder), "model": str(tiny), "names": ["b.jpg"], **FAST}
    client.post("/api/datasets/caption", json=body)
    progress = _finish(client)
    assert progress["written"] == [] and progress["kept"] == 1
    assert (folder / "b.txt").read_text(encoding="utf-8") == "my own words"
    client.post("/api/datasets/caption", json={**body, "overwrite": True})
    assert _finish(client)["written"] == ["b.jpg"]
    assert (folder / "b.txt").read_text(encoding="utf-8") != "my own words"
    assert not (folder / "a.txt").exists()


def test_only_opened_folders_and_their_images(opened, tiny, tmp_path):
    client, folder = opened
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (48, 40)).save(other / "x.png")
    for body in ({"folder": str(other)}, {"folder": str(folder), "names": ["../other/x.png"]},
                 {"folder": str(folder), "names": ["/etc/passwd"]}):
        answer = client.post("/api/datasets/caption", json={"model": str(tiny), **body})
        assert answer.status_code == 403, (body, answer.text)
    assert client.post("/api/datasets/caption",
                       json={"folder": str(folder), "names": ["nope.png"]}).status_code == 404
    assert client.get("/api/datasets/caption").json() == {"state": "idle"}
    outside = tmp_path / "outside.txt"
    outside.write_text("", encoding="utf-8")
    (folder / "a.txt").symlink_to(outside)  # a blank caption file that links out of the folder
    client.post("/api/datasets/caption", json={"folder": str(folder), "model": str(tiny), "names": ["a.png"], **FAST})
    progress = _finish(client)
    assert progress["written"] == [] and progress["skipped"][0]["name"] == "a.png"
    assert outside.read_text(encoding="utf-8") == ""


def test_one_run_at_a_time_and_a_failed_load_is_reported(opened, tiny, monkeypatch):
    client, folder = opened
    release = threading.Event()
    real = autocaption.load_captioner

    def slow_load(settings):
        release.wait(10)
        return real(settings)

    monkeypatch.setattr("conjure.ui.captioning.load_captioner", slow_load)
    body = {"folder": str(folder), "model": str(tiny), **FAST}
    assert client.post("/api/datasets/caption", json=body).status_code == 200
    second = client.post("/api/datasets/caption", json=body)
    assert second.status_code == 400 and "running already" in second.json()["error"]
    release.set()
    assert _finish(client)["state"] == "done"
    client.post("/api/datasets/caption", json={**body, "model": str(folder / "no-model")})
    progress = _finish(client)
    assert progress["state"] == "failed" and "cannot load captioning model" in progress["error"]
    bad = client.post("/api/datasets/caption", json={**body, "style": "poem"})
    assert bad.status_code == 400
