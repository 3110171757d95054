"""The offline CLIP tokenizer gives real SD ids, per-family pad tokens, and survives save/load."""

import json

import pytest
from transformers import CLIPTokenizer

from conjure.models.tokenizer import clip_tokenizer, write_clip_tokenizer

EOT = "<|endoftext|>"
# Covers punctuation, contractions, digits (split one by one), accents, emoji, a literal special token.
TRICKY = "Hello, World!! it's 12 naïve café 🐱 <|endoftext|> x  a photo of a cat"


def test_real_sd_token_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    # First byte char, its end-of-word form, and the last merge sit where open_clip puts them.
    assert tok.convert_tokens_to_ids(["!", "!</w>", "<|startoftext|>"]) == [0, 256, 49406]


@pytest.mark.parametrize(("pad", "pad_id"), [(EOT, 49407), ("!", 0)])
def test_pad_token(pad, pad_id):
    tok = clip_tokenizer(pad)
    assert (tok.pad_token, tok.pad_token_id) == (pad, pad_id)
    ids = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert ids[4:] == [pad_id] * 73


def test_default_pad_is_sd1s():
    assert clip_tokenizer().pad_token == EOT


def test_truncates_to_77():
    tok = clip_tokenizer()
    ids = tok("cat " * 200, padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_each_call_is_a_fresh_object():
    a, b = clip_tokenizer(), clip_tokenizer()
    assert a is not b
    a.add_tokens(["<my-concept>"])
    assert len(a) == 49409 and len(b) == 49408
    assert len(clip_tokenizer()) == 49408


def test_bang_pad_splits_exclamation_marks_like_the_hub_tokenizers():
    # Real SD2/SDXL-2 tokenizers loaded by transformers also turn every "!" into the pad id 0
    # (diffusers issue #4153); staying identical to them matters more than matching open_clip here.
    assert clip_tokenizer("!")("wow!!").input_ids == [49406, 2781, 0, 0, 49407]
    assert clip_tokenizer(EOT)("wow!!").input_ids == [49406, 2781, 748, 49407]  # "!!</w>" is one BPE token


def test_unknown_pad_token_rejected():
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        clip_tokenizer("<pad>")


@pytest.mark.parametrize("pad", [EOT, "!"])
def test_write_round_trip(tmp_path, pad):
    write_clip_tokenizer(tmp_path / "tok", pad)
    names = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"} <= names
    assert json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())["pad_token"] == pad

    original = clip_tokenizer(pad)
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.pad_token, loaded.pad_token_id, loaded.model_max_length) == (
        original.pad_token,
        original.pad_token_id,
        77,
    )
    assert loaded.get_vocab() == original.get_vocab()
    kwargs = dict(padding="max_length", truncation=True, max_length=77)
    assert loaded(TRICKY, **kwargs).input_ids == original(TRICKY, **kwargs).input_ids
    assert loaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocab_files_alone_load_the_same(tmp_path):
    # Folders must also work for loaders that read vocab.json + merges.txt (transformers 4, other tools).
    write_clip_tokenizer(tmp_path, "!")
    (tmp_path / "tokenizer.json").unlink()
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    kwargs = dict(padding="max_length", truncation=True, max_length=77)
    assert loaded(TRICKY, **kwargs).input_ids == clip_tokenizer("!")(TRICKY, **kwargs).input_ids
    assert loaded.pad_token == "!"
