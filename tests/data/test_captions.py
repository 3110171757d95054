"""CaptionTransform: templates, shuffling and prefix, in the documented order and deterministic per rng."""

import random

import pytest

from conjure.data.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES, CaptionTransform


def test_templates_are_the_textual_inversion_lists():
    assert OBJECT_TEMPLATES[0] == "a photo of a {}" and len(OBJECT_TEMPLATES) == 27
    assert STYLE_TEMPLATES[0] == "a painting in the style of {}" and len(STYLE_TEMPLATES) == 19
    assert all(template.count("{}") == 1 for template in OBJECT_TEMPLATES + STYLE_TEMPLATES)


def test_no_caption_and_no_preset_gives_empty_text():
    assert CaptionTransform()(None, random.Random(0)) == ""


def test_caption_is_used_as_is_by_default():
    assert CaptionTransform()("a cat, on a mat", random.Random(0)) == "a cat, on a mat"


@pytest.mark.parametrize("preset, templates", [("object", OBJECT_TEMPLATES), ("style", STYLE_TEMPLATES)])
def test_preset_fills_a_template_chosen_with_the_rng(preset, templates):
    transform = CaptionTransform(preset=preset, placeholder="<tok>")
    texts = [transform(None, random.Random(seed)) for seed in range(40)]
    expected = [random.Random(seed).choice(templates).format("<tok>") for seed in range(40)]
    assert texts == expected
    assert texts == [transform(None, random.Random(seed)) for seed in range(40)]
    assert len(set(texts)) > 5


def test_preset_is_not_used_when_there_is_a_caption():
    transform = CaptionTransform(preset="object", placeholder="<tok>")
    assert transform("my own words", random.Random(0)) == "my own words"


def test_shuffle_keeps_first_tokens_and_drops_empty_parts():
    transform = CaptionTransform(shuffle_delimiter=",", keep_tokens=1)
    caption = "sks dog ,  red,, blue ,green,  ,hat"
    results = {transform(caption, random.Random(seed)) for seed in range(30)}
    for text in results:
        parts = text.split(", ")
        assert parts[0] == "sks dog"
        assert sorted(parts[1:]) == ["blue", "green", "hat", "red"]
    assert len(results) > 1


def test_shuffle_is_deterministic_given_the_rng():
    transform = CaptionTransform(shuffle_delimiter=",", keep_tokens=2)
    caption = "a, b, c, d, e, f"
    assert transform(caption, random.Random(7)) == transform(caption, random.Random(7))
    rest = ["c", "d", "e", "f"]
    random.Random(7).shuffle(rest)
    assert transform(caption, random.Random(7)) == ", ".join(["a", "b", *rest])


def test_keep_tokens_larger_than_the_caption_keeps_everything():
    transform = CaptionTransform(shuffle_delimiter=",", keep_tokens=5)
    assert transform("b,a", random.Random(0)) == "b, a"


@pytest.mark.parametrize("delimiter, expected", [(",", "x, y"), (", ", "x, y"), ("|", "x| y"), (" ", "x y")])
def test_separator_is_the_delimiter_and_one_space(delimiter, expected):
    transform = CaptionTransform(shuffle_delimiter=delimiter, keep_tokens=2)
    assert transform(delimiter.join(["x", "y"]), random.Random(0)) == expected


def test_prefix_joins_with_a_space_without_delimiter_and_is_not_doubled():
    transform = CaptionTransform(prefix="<tok>")
    assert transform("on a beach", random.Random(0)) == "<tok> on a beach"
    assert transform("<tok> on a beach", random.Random(0)) == "<tok> on a beach"
    assert transform("<tok>, on a beach", random.Random(0)) == "<tok>, on a beach"
    assert transform("<tok>s on a beach", random.Random(0)) == "<tok> <tok>s on a beach"  # not a whole word
    assert transform(None, random.Random(0)) == "<tok>"


def test_prefix_comes_after_shuffling_so_it_stays_first():
    transform = CaptionTransform(prefix="<tok>", shuffle_delimiter=",", keep_tokens=1)
    for seed in range(10):
        text = transform("photo, red, blue, green", random.Random(seed))
        assert text.startswith("<tok>, photo, ")
        assert sorted(text.split(", ")[2:]) == ["blue", "green", "red"]


def test_prefix_equal_to_placeholder_is_not_added_to_templates():
    transform = CaptionTransform(prefix="<tok>", preset="object", placeholder="<tok>")
    assert transform(None, random.Random(0)) == random.Random(0).choice(OBJECT_TEMPLATES).format("<tok>")
    assert transform("on a beach", random.Random(0)) == "<tok> on a beach"


def test_other_prefix_is_added_to_templates():
    transform = CaptionTransform(prefix="photo", preset="style", placeholder="<tok>")
    template = random.Random(3).choice(STYLE_TEMPLATES).format("<tok>")
    assert transform(None, random.Random(3)) == f"photo {template}"


def test_full_order_template_then_shuffle_then_prefix():
    transform = CaptionTransform(prefix="pre", shuffle_delimiter=",", preset="object", placeholder="<tok>")
    rng = random.Random(11)
    expected = "pre, " + rng.choice(OBJECT_TEMPLATES).format("<tok>")  # templates hold no comma to shuffle
    assert transform(None, random.Random(11)) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_tokens": -1},
        {"shuffle_delimiter": ""},
        {"preset": "object"},  # no placeholder to fill the templates with
        {"preset": "scene", "placeholder": "x"},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        CaptionTransform(**kwargs)


def test_replace_word_becomes_the_placeholder_as_a_whole_word_only():
    transform = CaptionTransform(placeholder="<tok>", replace_word="sks")
    rng = random.Random(0)
    assert transform("a sks dog, sks. (sks)", rng) == "a <tok> dog, <tok>. (<tok>)"
    assert transform("a task on skSs and sksx", rng) == "a task on skSs and sksx"  # not inside other words
    assert transform("a red square", rng) == "a red square"  # regularisation captions stay as they are


def test_replacement_comes_before_shuffling_and_the_prefix():
    transform = CaptionTransform(prefix="photo", shuffle_delimiter=",", keep_tokens=1, placeholder="<tok>",
                                 replace_word="sks")
    text = transform("sks dog, grass, sky", random.Random(1))
    assert text.startswith("photo, <tok> dog, ") and "sks" not in text


def test_ensure_placeholder_puts_the_token_in_front_of_captions_without_it():
    transform = CaptionTransform(shuffle_delimiter=",", prefix="style", placeholder="<tok>", ensure_placeholder=True)
    assert transform("a dog, grass", random.Random(0)).startswith("<tok>, style, ")
    assert transform("a <tok>, grass", random.Random(0)).count("<tok>") == 1
    assert transform("", random.Random(0)) == "<tok>, style"
    assert CaptionTransform(placeholder="<tok>", ensure_placeholder=True)("", random.Random(0)) == "<tok>"
    templated = CaptionTransform(preset="object", placeholder="<tok>", ensure_placeholder=True)
    assert templated(None, random.Random(0)).count("<tok>") == 1


def test_replace_and_ensure_need_a_placeholder():
    with pytest.raises(ValueError, match="placeholder"):
        CaptionTransform(replace_word="sks")
    with pytest.raises(ValueError, match="placeholder"):
        CaptionTransform(ensure_placeholder=True)


def test_dropout_empties_that_share_of_captions_and_draws_last():
    plain = CaptionTransform(prefix="zwx", shuffle_delimiter=",")
    dropping = CaptionTransform(prefix="zwx", shuffle_delimiter=",", dropout=0.3)
    texts = [dropping("a, b, c, d", random.Random(seed)) for seed in range(2000)]
    assert 0.26 < texts.count("") / len(texts) < 0.34
    # the captions that survive are the ones the same rng gives without dropout
    kept = [(seed, t) for seed, t in enumerate(texts) if t]
    assert all(t == plain("a, b, c, d", random.Random(seed)) for seed, t in kept)
    with pytest.raises(ValueError, match="dropout"):
        CaptionTransform(dropout=1.0)


# --- caption_transform(): the one constructor for training, class images and the token check ---------------------


def _data(**values):
    from conjure.config.sections import DataConfig

    return DataConfig(source="d", caption_prefix="pfx", shuffle_caption_delimiter=",", keep_tokens=1,
                      caption_dropout=0.1, **values)


def test_caption_transform_for_a_method_with_a_token():
    from conjure.data.captions import TokenRule, caption_transform

    data = _data()
    built = caption_transform(data, TokenRule("<t>", preset="style"))
    assert built == CaptionTransform(prefix="pfx", shuffle_delimiter=",", keep_tokens=1, preset="style",
                                     placeholder="<t>", ensure_placeholder=True, dropout=0.1)
    # with a word to replace, captions without it are left as they are (regularisation images)
    replaced = caption_transform(data, TokenRule("<t>", replace_word="sks", preset="object"))
    assert replaced.replace_word == "sks" and not replaced.ensure_placeholder
    assert caption_transform(data, TokenRule("<t>"), dropout=False).dropout == 0.0  # the token check sees every one


def test_caption_transform_without_a_token_and_for_class_images():
    from conjure.data.captions import TokenRule, caption_transform

    data = _data()
    assert caption_transform(data, None) == CaptionTransform(prefix="pfx", shuffle_delimiter=",", keep_tokens=1,
                                                            dropout=0.1)
    # class images keep their captions (no prefix, token or shuffling); dropout still trains the unconditional case
    for token in (None, TokenRule("<t>", preset="object")):
        assert caption_transform(data, token, class_images=True) == CaptionTransform(dropout=0.1)
