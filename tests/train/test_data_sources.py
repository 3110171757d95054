"""Several data sources in one run: repeats, loss weights and class images reach training as configured."""

import pytest
from PIL import Image

from conjure.config import parse_config
from conjure.errors import ConjureError
from conjure.train.loop import train


@pytest.fixture
def two_sources(tiny_models, image_folder, tmp_path):
    class_folder = tmp_path / "class"
    class_folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (20, 20, 200)).save(class_folder / f"c{i}.png")
        (class_folder / f"c{i}.txt").write_text("a blue thing")

    def make(**data):
        return {
            "type": "lora",
            "basic": {"base_model": str(tiny_models("sd1")), "output_dir": str(tmp_path / "runs"), "run_name": "run",
                      "max_train_steps": 4, "save_every_n_steps": 4, "validate_every_n_steps": None, "seed": 1},
            "data": {"sources": [
                {"path": str(image_folder), "repeats": 2, "loss_weight": 3.0},
                {"path": str(class_folder), "class_images": True, "caption": "a photo of a thing"},
            ], "caption_prefix": "zwx", "resolution": 64, "batch_size": 2, **data},
            "lora": {"trigger_word": "zwx", "rank": 2},
            "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        }

    return make


def test_class_images_keep_their_caption_and_weights_reach_the_loss(two_sources, monkeypatch):
    import conjure.train.conditioning as conditioning
    import conjure.train.loss as loss

    seen_captions, seen_weights = [], []
    encode, denoise = conditioning.encode_captions, loss.denoising_loss

    def spy_encode(pairs, captions, *args, **kwargs):
        seen_captions.extend(captions)
        return encode(pairs, captions, *args, **kwargs)

    def spy_loss(*args, weights=None, **kwargs):
        seen_weights.extend(weights.tolist())
        return denoise(*args, weights=weights, **kwargs)

    monkeypatch.setattr(conditioning, "encode_captions", spy_encode)
    monkeypatch.setattr(loss, "denoising_loss", spy_loss)
    result = train(parse_config(two_sources(batch_size=7)))  # 6 images x 2 repeats + 2 class images = 14
    assert result.step == 4
    assert len(seen_captions) == 4 * 7
    pairs = list(zip(seen_captions, seen_weights))
    assert {p for p in pairs if p[1] == 1.0} == {("a photo of a thing", 1.0)}  # no trigger prefix on class images
    assert {p for p in pairs if p[1] != 1.0} == {("zwx", 3.0)}  # uncaptioned images: the prefix alone
    assert sum(c == "a photo of a thing" for c in seen_captions) == 2 * 2  # 2 epochs (2 steps each), 2 class images


def test_caption_dropout_empties_captions_but_not_the_trigger_check(two_sources, monkeypatch):
    import conjure.train.conditioning as conditioning

    seen = []
    encode = conditioning.encode_captions
    monkeypatch.setattr(conditioning, "encode_captions",
                        lambda pairs, captions, *a, **k: (seen.extend(captions), encode(pairs, captions, *a, **k))[1])
    train(parse_config(two_sources(batch_size=7, caption_dropout=0.5)))
    assert "" in seen and "zwx" in seen


def test_only_class_images_is_an_error(two_sources):
    raw = two_sources()
    for source in raw["data"]["sources"]:
        source["class_images"] = True
    with pytest.raises(ConjureError, match="class_images"):
        train(parse_config(raw))
