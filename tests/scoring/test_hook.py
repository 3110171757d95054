"""conjure.scoring.hook: the scores of each validation logged by a run, the prompts alignment reads, the training
images fidelity compares with, and validation.image_scores' three modes."""

from pathlib import Path

import pytest
from PIL import Image

from conjure.config import parse_config
from conjure.data.example import Example
from conjure.errors import ConjureError
from conjure.runs.events import read_events
from conjure.scoring.hook import MAX_REFERENCE_IMAGES, ImageScoring, image_scoring, reference_images
from conjure.scoring.scorer import alignment, fidelity, load_scorer
from conjure.train.settings import LoopSettings


def validation_settings(raw: dict):
    return LoopSettings.of(parse_config(raw), resolution=64, mixed_precision="no", max_steps=6).validation


def test_a_run_logs_the_scores_of_every_validation(ti_config, run_config, tiny_clip):
    raw = ti_config(validation={"image_scores": "on", "score_model": str(tiny_clip)})
    result = run_config(raw)
    events = read_events(result.run_dir / "events.jsonl").events
    scores = [e for e in events if e["event"] == "image_scores"]
    validated = [e["step"] for e in events if e["event"] == "validation"]
    assert [e["step"] for e in scores] == validated == [0, 3, 6]
    for event in scores:
        assert event["model"] == str(tiny_clip)
        assert -1 <= event["fidelity"] <= 1 and -1 <= event["alignment"] <= 1
    assert len({e["fidelity"] for e in scores}) > 1  # the token trains, the images change
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(result.run_dir / "logs"))
    board.Reload()
    for name in ("fidelity", "alignment"):
        logged = [(s.step, s.value) for s in board.Scalars(f"validation/{name}")]
        assert logged == [(e["step"], pytest.approx(e[name], abs=1e-6)) for e in scores]


def test_the_scores_are_those_of_the_embeddings(tiny_clip, image_folder, tmp_path):
    scorer = load_scorer(str(tiny_clip), local_only=True)
    training = sorted(image_folder.glob("*.png"))
    generated = []
    for i, colour in enumerate(["red", "blue", "green", "white"]):
        generated.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 64), colour).save(generated[-1])
    prompts = ("a photo of dog", "dog, a painting")
    scores = ImageScoring(scorer, training, prompts).scores(generated)
    images = scorer.images([Image.open(p).convert("RGB") for p in generated])
    # prompt-major, two seeds a prompt: images 0-1 are the first prompt's
    texts = scorer.texts([prompts[0], prompts[0], prompts[1], prompts[1]])
    reference = scorer.images([Image.open(p).convert("RGB") for p in training])
    assert scores["fidelity"] == pytest.approx(fidelity(images, reference), abs=1e-5)
    assert scores["alignment"] == pytest.approx(alignment(images, texts), abs=1e-5)


@pytest.mark.parametrize("fixture, validation, expected", [
    ("ti_config", {}, ("a photo of dog", "a close-up photo of dog on a table")),
    ("ti_config", {"class_word": "puppy"}, ("a photo of puppy", "a close-up photo of puppy on a table")),
    ("pivotal_config", {}, ("a photo of dog", "dog, a painting")),
    ("lora_config", {}, ("a photo of", "a painting")),
    ("lora_config", {"class_word": "dog"}, ("a photo of dog", "dog, a painting")),
])
def test_alignment_reads_the_prompts_with_the_class_word(request, fixture, validation, expected):
    assert validation_settings(request.getfixturevalue(fixture)(validation=validation)).alignment_prompts == expected


def test_reference_images_leave_out_class_images_and_repeats_and_are_capped():
    examples = [Example(Path(f"{i}.png"), None) for i in range(3)] * 2 + [Example(Path("c.png"), "a dog", is_class=True)]
    assert reference_images(examples) == [Path("0.png"), Path("1.png"), Path("2.png")]
    many = reference_images([Example(Path(f"{i}.png"), None) for i in range(1000)])
    assert len(many) == MAX_REFERENCE_IMAGES and many[0] == Path("0.png") and many[-1] == Path("968.png")


def test_auto_without_the_model_says_one_line_and_scores_nothing(ti_config):
    said: list[str] = []
    settings = validation_settings(ti_config(validation={"score_model": "nobody-here/no-such-clip"}))
    assert settings.image_scores == "auto"
    assert image_scoring(settings, [], said.append) is None
    assert len(said) == 1 and said[0].startswith("image scores off:") and "nobody-here/no-such-clip" in said[0]


def test_on_without_the_model_stops_the_run_before_training(ti_config, run_config, tmp_path):
    raw = ti_config(validation={"image_scores": "on", "score_model": str(tmp_path / "missing")})
    with pytest.raises(ConjureError, match="validation.score_model"):
        run_config(raw)
    assert not list((tmp_path / "runs").glob("*/checkpoints/*"))


def test_on_says_what_scores(ti_config, tiny_clip, image_folder):
    said: list[str] = []
    settings = validation_settings(ti_config(validation={"image_scores": "on", "score_model": str(tiny_clip)}))
    examples = [Example(p, None) for p in sorted(image_folder.glob("*.png"))]
    assert image_scoring(settings, examples, said.append) is not None
    assert said == [f"image scores: {tiny_clip} on the CPU; fidelity against 6 training images (embedded at the "
                    "first validation)"]


def test_off_loads_nothing(ti_config, tiny_clip):
    said: list[str] = []
    settings = validation_settings(ti_config(validation={"image_scores": "off", "score_model": str(tiny_clip)}))
    assert image_scoring(settings, [], said.append) is None and said == []
