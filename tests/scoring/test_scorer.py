"""conjure.scoring.scorer: the two scores against a hand computation, the class-word prompts, and the tiny CLIP
loaded and refused the way a run loads `validation.score_model`."""

import math

import pytest
import torch
from PIL import Image

from conjure.errors import ConjureError
from conjure.scoring.scorer import alignment, fidelity, load_scorer, with_class_word


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_fidelity_is_the_mean_cosine_over_every_generated_and_training_pair():
    generated = unit([1.0, 0.0], [0.0, 1.0])
    training = unit([1.0, 1.0], [1.0, 0.0], [-1.0, 0.0])
    # cosines: first row 1/sqrt2, 1, -1; second row 1/sqrt2, 0, 0
    by_hand = (2 / math.sqrt(2) + 1 - 1 + 0 + 0) / 6
    assert fidelity(generated, training) == pytest.approx(by_hand, abs=1e-6)


def test_alignment_pairs_each_image_with_its_own_text_only():
    images = unit([1.0, 0.0], [0.0, 1.0])
    texts = unit([1.0, 1.0], [0.0, -1.0])
    assert alignment(images, texts) == pytest.approx((1 / math.sqrt(2) - 1) / 2, abs=1e-6)


@pytest.mark.parametrize("prompt, word, class_word, expected", [
    ("a photo of <zq-thing>", "<zq-thing>", "dog", "a photo of dog"),
    ("<zq-thing>, a painting", "<zq-thing>", "dog", "dog, a painting"),
    ("zwx, a painting", "zwx", "", "a painting"),
    ("a photo of zwx dog", "zwx", "", "a photo of dog"),
    ("a photo of zwxy", "zwx", "cat", "a photo of zwxy"),  # whole words only
    ("a photo of <zq-thing>-2", "<zq-thing>", "dog", "a photo of <zq-thing>-2"),
])
def test_with_class_word_replaces_whole_words(prompt, word, class_word, expected):
    assert with_class_word(prompt, word, class_word) == expected


def test_tiny_clip_gives_unit_embeddings_that_tell_images_and_texts_apart(tiny_clip):
    scorer = load_scorer(str(tiny_clip), local_only=True)
    images = scorer.images([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (48, 80), "blue")])
    texts = scorer.texts(["a photo of a dog", "a painting " * 40])  # longer than 77 tokens: cut, not refused
    assert images.shape == texts.shape == (2, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2)) and torch.allclose(texts.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(texts[0], texts[1])
    again = load_scorer(str(tiny_clip), local_only=True).images([Image.new("RGB", (64, 64), "red")])
    assert torch.allclose(again[0], images[0], atol=1e-5)  # batched alone or with others: float rounding


@pytest.mark.parametrize("source, needle", [
    ("/no/such/clip", "no such folder"),
    ("nobody-here/no-such-clip", "is not on this machine (not a folder, not in the Hugging Face cache)"),
    ("no/such/thing", "Repo id must be in the form"),
])
def test_a_model_that_cannot_load_is_one_line_naming_the_setting(source, needle):
    with pytest.raises(ConjureError) as error:
        load_scorer(source, local_only=True)
    assert "validation.score_model" in str(error.value) and needle in str(error.value)
    assert "\n" not in str(error.value)


def test_a_model_that_is_not_a_clip_is_refused(tiny_models, tmp_path):
    # a Stable Diffusion folder has no config transformers reads at its top; a text encoder is a CLIP's half
    with pytest.raises(ConjureError, match="validation.score_model"):
        load_scorer(str(tiny_models("sd1")), local_only=True)
    with pytest.raises(ConjureError, match="is a clip_text_model model; image scores need a CLIP"):
        load_scorer(str(tiny_models("sd1") / "text_encoder"), local_only=True)
