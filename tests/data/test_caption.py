"""`conjure caption` (conjure.data.autocaption): captions written beside the images, with the trigger word, never
over an existing caption unless --overwrite, resumed after a crash midway, bad images skipped with the reason,
batches that give each image its own caption, one-line errors. Offline, on a random-weight tiny Florence-2
(conjure.models.tiny_captioner); one slow test uses the real default model when it is in the Hugging Face cache."""

import os
from pathlib import Path

import pytest
from PIL import Image

from conjure.data import autocaption
from conjure.data.autocaption import Captioner, caption_images, folder_images, load_captioner, with_prefix
from conjure.data.caption_settings import DEFAULT_CAPTION_MODEL, CaptionSettings
from conjure.errors import ConjureError
from conjure.models.tiny_captioner import write_tiny_captioner

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (250, 250, 250), (0, 0, 0)]
FAST = ("--max-new-tokens", "6", "--device", "cpu")  # the same answers on a machine with a GPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_captioner(tmp_path_factory.mktemp("captioner"))


def _folder(root: Path, count: int = 5) -> list[Path]:
    paths = []
    for n in range(count):
        path = root / ("sub" if n == count - 1 else "") / f"img{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), COLOURS[n % len(COLOURS)]).save(path)
        paths.append(path)
    return paths


def _captions(paths: list[Path]) -> dict[str, str | None]:
    return {p.name: p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").exists() else None
            for p in paths}


def test_captions_every_image_with_the_trigger_word(tmp_path, tiny, run_cli):
    images = _folder(tmp_path / "set")
    code, out, err = run_cli("caption", tmp_path / "set", "--model", tiny, "--trigger", "ohwx", "--batch-size", "2",
                             *FAST)
    assert code == 0, err
    captions = _captions(images)
    assert all(c is not None and c.startswith("ohwx, ") and len(c) > len("ohwx, ") for c in captions.values())
    assert "5 written, 0 kept (captioned already), 0 skipped" in out
    assert not list((tmp_path / "set").rglob("*.part"))  # atomic writes leave no temporary file


def test_existing_captions_stay_unless_overwrite(tmp_path, tiny, run_cli):
    images = _folder(tmp_path, 3)
    images[1].with_suffix(".txt").write_text("my own words", encoding="utf-8")
    images[2].with_suffix(".txt").write_text("  \n", encoding="utf-8")  # blank: training reads no caption
    code, out, _ = run_cli("caption", tmp_path, "--model", tiny, *FAST)
    assert code == 0
    captions = _captions(images)
    assert captions["img1.png"] == "my own words"
    assert captions["img0.png"] and captions["img2.png"].strip()
    assert "2 written, 1 kept (captioned already)" in out
    code, out, _ = run_cli("caption", tmp_path, "--model", tiny, "--overwrite", "--prefix", "sks", *FAST)
    assert code == 0 and "3 written" in out
    assert all(c.startswith("sks, ") for c in _captions(images).values())


def test_a_crash_midway_resumes_where_it_stopped(tmp_path, tiny, monkeypatch, run_cli):
    images = _folder(tmp_path, 5)
    real = Captioner.caption
    calls = []

    def crash_on_second_batch(self, pictures):
        calls.append(len(pictures))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or the process killed, after the first batch was written
        return real(self, pictures)

    monkeypatch.setattr(Captioner, "caption", crash_on_second_batch)
    code, _, err = run_cli("caption", tmp_path, "--model", tiny, "--batch-size", "2", *FAST)
    assert code == 130, err
    first = _captions(images)
    assert [name for name, c in first.items() if c is not None] == ["img0.png", "img1.png"]
    stamps = {p.name: p.with_suffix(".txt").stat().st_mtime_ns for p in images[:2]}
    monkeypatch.setattr(Captioner, "caption", real)
    code, out, _ = run_cli("caption", tmp_path, "--model", tiny, "--batch-size", "2", *FAST)
    assert code == 0 and "3 written, 2 kept (captioned already)" in out
    assert all(c is not None for c in _captions(images).values())
    assert {p.name: p.with_suffix(".txt").stat().st_mtime_ns for p in images[:2]} == stamps


def test_bad_images_are_skipped_with_the_reason(tmp_path, tiny, run_cli):
    images = _folder(tmp_path, 2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    good = Path(images[0]).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    code, out, err = run_cli("caption", tmp_path, "--model", tiny, "--batch-size", "3", *FAST)
    assert code == 0, err
    assert "Traceback" not in err
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 3, err
    assert skipped[0].startswith(f"skipped {tmp_path / 'cut.png'}: cannot read image (")
    assert skipped[1] == f"skipped {tmp_path / 'empty.jpg'}: cannot read image (empty file)"
    assert skipped[2] == f"skipped {tmp_path / 'notes.png'}: cannot read image (not an image format PIL recognises)"
    assert "2 written, 0 kept (captioned already), 3 skipped" in out
    assert not any(tmp_path.glob("empty.txt")) and not any(tmp_path.glob("notes.txt"))


def test_a_batch_gives_each_image_its_own_caption(tmp_path, tiny):
    images = _folder(tmp_path, 5)
    captioner = load_captioner(CaptionSettings(model=str(tiny), max_new_tokens=6, device="cpu"))
    one_by_one = [captioner.caption([Image.open(p).convert("RGB")])[0] for p in images]
    assert len(set(one_by_one)) > 1  # the tiny model tells these images apart: a mix-up would show
    written = {}
    report = caption_images(images, captioner, CaptionSettings(model=str(tiny), batch_size=3),
                            write=lambda image, caption: written.__setitem__(image, caption))
    assert [written[p] for p in images] == one_by_one
    assert report.written == images and not report.skipped


def test_tags_are_the_detected_objects_once_each(tiny):
    captioner = load_captioner(CaptionSettings(model=str(tiny), style="tags", device="cpu"))
    assert captioner.prompt == "<OD>"
    # An answer as Florence-2 gives it for <OD>: a name, then four box corners, per object.
    answer = "</s><s>car<loc_52><loc_333><loc_932><loc_774>tree<loc_1><loc_2><loc_3><loc_4>car<loc_5><loc_6>" \
             "<loc_7><loc_8></s>"
    labels = captioner.read_tags(captioner.processor, answer, "<OD>", (64, 64))
    assert labels == ["car", "tree", "car"]
    assert autocaption._unique(labels) == ["car", "tree"]


def test_tags_need_a_model_with_a_detection_task(tiny, monkeypatch):
    monkeypatch.setattr(autocaption, "MODEL_TASKS", {})  # as for BLIP or GIT
    with pytest.raises(ConjureError, match="style: tags needs a model with an object-detection task"):
        load_captioner(CaptionSettings(model=str(tiny), style="tags"))
    assert load_captioner(CaptionSettings(model=str(tiny))).prompt is None  # sentences: the images alone


def test_a_model_that_repeats_the_prompt_has_it_cut(tiny):
    import torch

    prompt = torch.tensor([[5, 6, 7]])
    assert autocaption._answer_tokens(torch.tensor([[5, 6, 7, 9, 2]]), prompt).tolist() == [[9, 2]]
    assert autocaption._answer_tokens(torch.tensor([[0, 6, 7, 9, 2]]), prompt).tolist() == [[0, 6, 7, 9, 2]]


def test_prefix_is_added_once():
    assert with_prefix("a cat", "ohwx") == "ohwx, a cat"
    assert with_prefix("ohwx, a cat", "ohwx") == "ohwx, a cat"
    assert with_prefix("ohwx a cat", "ohwx") == "ohwx a cat"
    assert with_prefix("ohwxy cat", "ohwx") == "ohwx, ohwxy cat"
    assert with_prefix("a cat", "") == "a cat"


def test_a_model_that_cannot_load_is_one_line(tmp_path, monkeypatch, run_cli, assert_one_line_error):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    _folder(tmp_path / "set", 1)
    code, _, err = run_cli("caption", tmp_path / "set", "--model", "someone/no-such-captioner")
    assert_one_line_error(code, err, "cannot load captioning model 'someone/no-such-captioner'", "--model DIR")
    code, _, err = run_cli("caption", tmp_path / "set", "--model", tmp_path / "no-folder")
    assert_one_line_error(code, err, "cannot load captioning model", "--model DIR")


def test_no_images_and_no_gpu_are_one_line(tmp_path, tiny, monkeypatch, run_cli, assert_one_line_error):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("caption", tmp_path / "empty", "--model", tiny)
    assert_one_line_error(code, err, "no images in")
    (tmp_path / "list.jsonl").write_text('{"image": "a.png"}\n', encoding="utf-8")
    code, _, err = run_cli("caption", tmp_path / "list.jsonl", "--model", tiny)
    assert_one_line_error(code, err, "not a folder")
    _folder(tmp_path / "set", 1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = run_cli("caption", tmp_path / "set", "--model", tiny, "--device", "cuda")
    assert_one_line_error(code, err, "device: cuda")


def test_folder_images_are_the_ones_training_reads(tmp_path):
    images = _folder(tmp_path, 2)
    Image.new("L", (48, 40)).save(tmp_path / "img0-masklabel.png")
    (tmp_path / ".hidden.png").write_bytes(images[0].read_bytes())
    assert folder_images(tmp_path) == images


def _default_model_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(DEFAULT_CAPTION_MODEL, "config.json"), str)


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_cached(), reason=f"{DEFAULT_CAPTION_MODEL} is not in the Hugging Face cache")
def test_the_default_model_describes_a_picture(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "red.png"
    Image.new("RGB", (256, 256), (220, 20, 20)).save(image)
    code, _, err = run_cli("caption", tmp_path, "--batch-size", "1")
    assert code == 0, err
    caption = image.with_suffix(".txt").read_text(encoding="utf-8")
    assert 2 <= len(caption.split()) <= 40 and "<" not in caption
    assert "red" in caption.lower(), caption
    os.remove(image.with_suffix(".txt"))
    code, _, err = run_cli("caption", tmp_path, "--style", "tags", "--batch-size", "1")
    assert code == 0 or "skipped" in err
