"""The data-set tab's Auto-caption buttons in a real browser against a real `conjure ui`: "Caption missing"
fills the images without a caption (with the trigger word), shows its progress and result, and the new captions
are editable in the viewer like any other; "Caption selected" with "replace" redoes a caption. (What each button
may write is tested on the API: tests/ui/test_captioning_api.py.)"""

from pathlib import Path

import pytest
from PIL import Image

from conjure.models.tiny_captioner import write_tiny_captioner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.mark.slow  # ~10 s of its own server and browser, mostly importing transformers in the server
def test_caption_buttons(page, ui_server, tiny, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for n, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{n}.png")
    (folder / "img0.txt").write_text("mine", encoding="utf-8")
    page.fill("#ds-path", str(folder))
    page.click("#ds-open button[type=submit]")
    page.locator("#ds-grid li.tile").nth(2).wait_for()
    assert page.get_attribute("#ds-autocap-model", "placeholder") == "florence-community/Florence-2-base"
    page.fill("#ds-autocap-model", str(tiny))
    page.fill("#ds-autocap-prefix", "ohwx")
    page.click("#ds-autocap-missing")
    page.locator("#ds-autocap-msg", has_text="2 captions written, 1 kept").wait_for(timeout=60_000)
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "mine"
    new = (folder / "img1.txt").read_text(encoding="utf-8")
    assert new.startswith("ohwx, ")
    tile = page.locator("#ds-grid li.tile[data-name='img1.png']")
    assert tile.locator(".caption").inner_text() == new  # the grid reloaded
    tile.locator("button.thumb").click()
    assert page.input_value("#ds-caption") == new
    page.fill("#ds-caption", "ohwx, corrected by hand")
    page.click("#ds-caption-save")
    page.locator("#ds-caption-state", has_text="saved").wait_for()
    page.keyboard.press("Escape")
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "ohwx, corrected by hand"

    page.locator("#ds-grid li.tile[data-name='img0.png'] input[type=checkbox]").check()
    page.check("#ds-autocap-overwrite")
    page.click("#ds-autocap-selected")
    page.locator("#ds-autocap-msg", has_text="1 caption written, 0 kept").wait_for()
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("ohwx, ")
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "ohwx, corrected by hand"
