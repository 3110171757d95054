"""The toy tokenizer: every toy word is one token, other text still tokenizes like CLIP, save/load round-trips."""

import json
import os
import subprocess
import sys

import pytest
from transformers import CLIPTokenizer

from conjure.models.tokenizer import _bytes_to_unicode
from conjure.toy.tokenizer import (
    EXTRA_WORDS,
    TOY_WORDS,
    _vocab_and_merges,
    toy_tokenizer,
    toy_vocab_size,
    write_toy_tokenizer,
)
from conjure.toy.world import vocabulary

EOT = "<|endoftext|>"
SAMPLE = "a large red circle in the top left on a white background"
TRICKY = "Hello, World!! it's 12 naïve café 🐱 <|endoftext|> x  a photo of a cat"


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def test_toy_words_cover_the_world_and_the_extras():
    assert set(vocabulary()) <= set(TOY_WORDS)
    assert set(EXTRA_WORDS) <= set(TOY_WORDS)
    assert len(TOY_WORDS) == len(set(TOY_WORDS))


def test_every_toy_word_is_exactly_one_token(tok):
    vocab = tok.get_vocab()
    ids = {}
    for word in TOY_WORDS:
        word_ids = tok(word, add_special_tokens=False).input_ids
        assert word_ids == [vocab[word + "</w>"]], (word, tok.convert_ids_to_tokens(word_ids))
        # Also inside a sentence, capitalised and next to punctuation (lower-casing and CLIP's regex split).
        in_context = tok(f"The {word.capitalize()}, then", add_special_tokens=False).input_ids
        assert in_context[1] == word_ids[0], word
        ids[word] = word_ids[0]
    assert len(set(ids.values())) == len(TOY_WORDS)


def test_sample_caption_is_bos_twelve_words_eos(tok):
    vocab = tok.get_vocab()
    ids = tok(SAMPLE).input_ids
    words = SAMPLE.split()
    assert len(words) == 12
    assert ids == [tok.bos_token_id, *(vocab[w + "</w>"] for w in words), tok.eos_token_id]


def test_layout_like_clip(tok):
    vocab = tok.get_vocab()
    size = toy_vocab_size()
    assert len(tok) == size == len(vocab)
    assert 512 < size < 800  # 512 byte tokens + a few hundred merges + 2 specials
    byte_chars = list(_bytes_to_unicode().values())
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in byte_chars] == list(range(256, 512))
    _, merges = _vocab_and_merges()
    assert [vocab["".join(m)] for m in merges] == list(range(512, 512 + len(merges)))
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", size - 2)
    assert (tok.eos_token, tok.eos_token_id) == (EOT, size - 1)
    assert (tok.pad_token, tok.pad_token_id) == (EOT, size - 1)
    assert tok.model_max_length == 77


OTHER_TEXTS = ["zebra-crossing 123 ünïcode", "Ünïcode ÆØÅ ∑ 🐱 naïve café", "xyzzy qwerty's"]


@pytest.mark.parametrize("text", OTHER_TEXTS)
def test_other_text_tokenizes_without_unk_and_round_trips(tok, text):
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    inner = ids[1:-1]
    assert inner and tok.unk_token_id not in inner and all(i < toy_vocab_size() - 2 for i in inner)
    decoded = tok.decode(ids, skip_special_tokens=True)
    # CLIP decodes with a space after every pre-token ("zebra - crossing 1 2 3"): compare without whitespace.
    assert "".join(decoded.split()) == "".join(text.lower().split())


def test_same_decoding_as_the_real_clip_tokenizer(tok):
    from conjure.models.tokenizer import clip_tokenizer

    real = clip_tokenizer()
    for text in (TRICKY, SAMPLE, "zebra-crossing 123 ünïcode", "A  PHOTO\tof   the Dog!"):
        assert tok.decode(tok(text).input_ids) == real.decode(real(text).input_ids)


def test_added_placeholder_tokens(tok):
    fresh = toy_tokenizer()
    assert fresh is not tok
    assert fresh.add_tokens(["<yellow-star>"]) == 1
    new_id = fresh.convert_tokens_to_ids("<yellow-star>")
    assert new_id == toy_vocab_size() and len(fresh) == toy_vocab_size() + 1
    vocab = fresh.get_vocab()
    ids = fresh("a photo of <yellow-star> on a table").input_ids
    expected_words = [vocab[w + "</w>"] for w in ("a", "photo", "of")]
    expected_tail = [vocab[w + "</w>"] for w in ("on", "a", "table")]
    assert ids == [fresh.bos_token_id, *expected_words, new_id, *expected_tail, fresh.eos_token_id]
    assert fresh("a <yellow-star>shape").input_ids[2] == new_id
    assert len(tok) == len(toy_tokenizer()) == toy_vocab_size()  # other objects unaffected


@pytest.mark.parametrize("pad", [EOT, "!"])
def test_pad_tokens(pad):
    tok = toy_tokenizer(pad)
    expected = 0 if pad == "!" else toy_vocab_size() - 1
    assert (tok.pad_token, tok.pad_token_id) == (pad, expected)
    assert tok.convert_tokens_to_ids(pad) == expected
    ids = tok("a red star", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[5:] == [expected] * 72
    assert ids[:5] == toy_tokenizer()("a red star").input_ids


def test_unknown_pad_token_rejected():
    with pytest.raises(ValueError, match="not in the toy vocabulary"):
        toy_tokenizer("<pad>")


@pytest.mark.parametrize("pad", [EOT, "!"])
def test_write_round_trip(tmp_path, pad):
    folder = tmp_path / "tok"
    write_toy_tokenizer(folder, pad)
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"} <= names
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == pad
    original = toy_tokenizer(pad)
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == original.get_vocab()
    merges_lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges_lines[0].startswith("#version") and len(merges_lines) - 1 == len(_vocab_and_merges()[1])

    loaded = CLIPTokenizer.from_pretrained(folder)
    assert (loaded.pad_token, loaded.pad_token_id, loaded.model_max_length) == (
        original.pad_token,
        original.pad_token_id,
        77,
    )
    assert (loaded.bos_token_id, loaded.eos_token_id) == (original.bos_token_id, original.eos_token_id)
    assert loaded.get_vocab() == original.get_vocab()
    kwargs = dict(padding="max_length", truncation=True, max_length=77)
    for text in (TRICKY, SAMPLE, " ".join(TOY_WORDS)):
        assert loaded(text, **kwargs).input_ids == original(text, **kwargs).input_ids


def test_build_is_deterministic():
    vocab, merges = _vocab_and_merges()
    _vocab_and_merges.cache_clear()
    try:
        assert _vocab_and_merges() == (vocab, merges)
    finally:
        _vocab_and_merges.cache_clear()
    assert toy_tokenizer().get_vocab() == toy_tokenizer().get_vocab() == vocab
    # Also across processes with different string-hash seeds (no dependence on set/dict hashing order).
    code = "from conjure.toy.tokenizer import _vocab_and_merges as f; v, m = f(); print(repr((sorted(v.items()), m)))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout)
    assert outputs == {repr((sorted(vocab.items()), merges)) + "\n"}
