"""The bundled demo set is what scripts/make_demo_images.py draws, small, and loadable by the package."""

import importlib.resources
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from conjure.data.sources import scan_source

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_images.py"


def _demo_folder() -> Path:
    return Path(str(importlib.resources.files("conjure") / "assets" / "demo" / "ti"))


def test_demo_set_is_twelve_small_captioned_images():
    folder = _demo_folder()
    files = sorted(folder.glob("*.png"))
    assert [file.name for file in files] == [f"{number:02d}.png" for number in range(12)]
    assert sum(file.stat().st_size for file in folder.iterdir()) < 100_000
    result = scan_source(folder)
    assert len(result.examples) == 12 and result.skipped == []
    assert all("<yellow-star>" in example.caption for example in result.examples)
    assert all(Image.open(file).size == (64, 64) for file in files)


def test_demo_set_matches_the_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_images", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.write_demo_images(tmp_path)
    assert len(written) == 12
    for path in written:
        bundled = np.asarray(Image.open(_demo_folder() / path.name))
        assert np.array_equal(np.asarray(Image.open(path)), bundled), path.name
        caption = path.with_suffix(".txt")
        assert caption.read_text() == (_demo_folder() / caption.name).read_text()
