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


# Cases, spacing, unicode, emoji, special and added tokens, digits, punctuation, and a caption past 77 tokens.
PROMPTS = [TRICKY, "a photo of a cat", "A PHOTO OF <zwx> IN Paris", "  lots   of\twhite\nspace ", "日本語のテキスト",
           "<|startoftext|><zwx><|endoftext|>", "(masterpiece:1.2), best quality, [a|b], 8k uhd, f/1.8",
           "ß ÿ Ω ∑ ≠ 🙂🐱 naïve", "they'll we've she'd I'm", "cat " * 100, ""]


def _ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own (the session's holds what other tests' models wrote)."""
    monkeypatch.setenv("CONJURE_CACHE_DIR", str(tmp_path / "cache"))


def _entries(kind):
    import os
    from pathlib import Path

    return sorted((Path(os.environ["CONJURE_CACHE_DIR"]) / "tokenizers").glob(f"{kind}-*"))


@pytest.mark.parametrize("pad", [EOT, "!"])
def test_the_cached_clip_tokenizer_is_the_built_one(pad, monkeypatch, own_cache):
    """Issue 16: the vocab.json and merges.txt written once to conjure's cache load the tokenizer that the
    dicts build, and a second call reads them instead of building."""
    from conjure.models import tokenizer as module

    vocab, merges = module._vocab_and_merges()
    built = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77)
    clip_tokenizer(pad)  # writes the entry where an earlier test did not
    monkeypatch.setattr(module, "bpe_files", lambda *a: pytest.fail("built again instead of read from the cache"))
    cached = clip_tokenizer(pad)
    assert _entries("clip-bpe") and _ids(cached) == _ids(built) and cached.get_vocab() == built.get_vocab()
    assert (cached.pad_token_id, cached.model_max_length) == (built.pad_token_id, 77)


def test_a_corrupt_or_unwritable_cache_is_ignored(tmp_path, monkeypatch, own_cache):
    clip_tokenizer()
    entry = _entries("clip-bpe")[0]
    vocab = json.loads((entry / "vocab.json").read_text(encoding="utf-8"))
    vocab["cat</w>"], vocab["photo</w>"] = vocab["photo</w>"], vocab["cat</w>"]  # still a valid vocabulary
    (entry / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert json.loads((entry / "vocab.json").read_text(encoding="utf-8"))["cat</w>"] == 2368  # written again
    (entry / "merges.txt").write_bytes(b"\xff\xfe not merges")
    (entry / "manifest.json").write_text("{", encoding="utf-8")
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("CONJURE_CACHE_DIR", str(blocked))
    expected = _ids(CLIPTokenizer.from_pretrained(entry, pad_token=EOT, model_max_length=77))
    assert _ids(clip_tokenizer()) == expected
    monkeypatch.delenv("CONJURE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME")  # and no home folder for ~/.cache either (pathlib raises RuntimeError)
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    assert _ids(clip_tokenizer()) == expected


def test_a_model_folders_tokenizer_loads_through_the_cache_unchanged(tmp_path, own_cache):
    """A folder with a tokenizer.json (which transformers 5 parses in Python at every load) loads from the cache
    with the same ids, vocabulary, added tokens and settings."""
    from conjure.models.tokenizer_cache import clip_tokenizer_from

    folder = tmp_path / "tokenizer"
    with_token = clip_tokenizer()
    with_token.add_tokens(["<zwx>"])
    with_token.save_pretrained(folder)  # as transformers 5 saves a folder: the added token is in tokenizer.json only
    reference = CLIPTokenizer.from_pretrained(folder)
    first, second = clip_tokenizer_from(folder), clip_tokenizer_from(folder)
    entries = _entries("clip-folder")
    for loaded in (first, second):
        assert _ids(loaded) == _ids(reference) and loaded.get_vocab() == reference.get_vocab()
        assert loaded.added_tokens_decoder == reference.added_tokens_decoder and len(loaded) == 49409
        assert (loaded.pad_token, loaded.model_max_length, loaded.name_or_path) == (EOT, 77, str(folder))
    assert len(entries) == 1 and "tokenizer.json" not in {p.name for p in entries[0].iterdir()}
