"""A small CLIP-compatible BPE tokenizer for the toy models: every toy word is exactly one token.

The real CLIP vocabulary (49,408 tokens) would make a hidden-64 text encoder's embedding table alone ~12 MB and
spread what it learns over tokens it never sees. This tokenizer keeps CLIP's machinery (transformers'
`CLIPTokenizer`: NFC + whitespace-collapse + lower-casing, CLIP's regex pre-tokenization, byte-level alphabet,
`</w>` end-of-word suffix, `<|startoftext|>`/`<|endoftext|>`) with a vocabulary of a few hundred merges in which
every word in `TOY_WORDS` (the toy captions' words plus `EXTRA_WORDS` for prompts and initializers) is a single
token. Any other text still tokenizes, byte by byte at worst, and never gives `unk`.

Layout, like CLIP's: ids 0..255 are the 256 byte characters (GPT-2/CLIP byte-to-unicode order), 256..511 the same
with `</w>`, then one token per merge in merge order, then `<|startoftext|>` and `<|endoftext|>` (bos/eos are the
last two ids). Placeholder tokens such as `<yellow-star>` are added later with `tokenizer.add_tokens`.

How the merges are built (`_train_merges`, deterministic, ~10 ms, cached): plain BPE training on the corpus of
the distinct words of `TOY_WORDS`, each split into byte characters with `</w>` on its last one. At each step the
most frequent adjacent pair (counted over word types; ties broken by the smaller pair of strings) is merged,
left to right and without overlap, in every word, until every word is one symbol. Why encoding then gives every
word as one token: BPE encoding (the `tokenizers` BPE model merges the lowest-rank adjacent pair first, leftmost
first on ties) replays training exactly on a training word, because
  - after merge k is applied to all its occurrences no pair of rank k is left (left-to-right non-overlapping
    merging leaves no adjacent (x, y), also when x == y), and
  - merge k creates a symbol that did not exist before (checked: every merged string is new), so it can only take
    part in merges of rank > k.
Hence at every point of encoding the lowest-rank pair present is exactly the one training merged next, the
encoder goes through the same states as training, and ends with the single symbol training ended with. (A naive
hand-made chain per word breaks this: an early merge meant for one word fires inside another and derails its
chain.) The tests check the property with the real `CLIPTokenizer` for every word.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from conjure.models.tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, _bytes_to_unicode, save_tokenizer_folder
from conjure.toy.world import vocabulary

if TYPE_CHECKING:  # importing transformers costs seconds; do it only when a tokenizer is built
    from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "EXTRA_WORDS",
    "MODEL_MAX_LENGTH",
    "TOY_WORDS",
    "toy_t5_tokenizer",
    "toy_tokenizer",
    "toy_vocab_size",
    "write_toy_t5_tokenizer",
    "write_toy_tokenizer",
]

_EOW = "</w>"

# Words people and tests use in prompts and as textual-inversion initializers, besides the caption words.
EXTRA_WORDS: tuple[str, ...] = (
    "photo", "of", "the", "an", "and", "with", "style", "painting", "picture", "image",
    "shape", "object", "thing", "toy", "dog", "cat", "close", "up", "on", "table",
    "rendering", "drawing", "colour", "color", "bright", "dark", "striped", "pattern", "texture", "figure",
)  # fmt: skip

# Every word that is exactly one token (lower-case letters only, as CLIP's pre-tokenizer keeps letter runs whole).
TOY_WORDS: tuple[str, ...] = tuple(sorted({*vocabulary(), *EXTRA_WORDS}))


def _word_symbols(word: str, byte_chars: dict[int, str]) -> tuple[str, ...]:
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += _EOW
    return tuple(symbols)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every occurrence of `pair` in `symbols`, left to right, without overlap."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _train_merges(words: tuple[str, ...], base_tokens: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """BPE training on the word types `words` until each is a single symbol (see the module docstring)."""
    byte_chars = _bytes_to_unicode()
    for word in words:
        if not word or not word.isalpha() or word != word.lower():
            raise ValueError(f"toy word {word!r} must be a non-empty run of lower-case letters")
    corpus = [_word_symbols(w, byte_chars) for w in sorted(set(words))]
    known = set(base_tokens)
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in corpus:
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest: deterministic
        merged = pair[0] + pair[1]
        if merged in known:  # would break the "each merge makes a new symbol" argument; never happens today
            raise RuntimeError(f"toy BPE training produced {merged!r} twice")
        known.add(merged)
        merges.append(pair)
        corpus = [_merge_pair(symbols, pair) for symbols in corpus]
    return tuple(merges)


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The toy vocabulary (token -> id) and ordered merges, in CLIP's layout (built once, deterministic)."""
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + _EOW for c in byte_chars]
    merges = _train_merges(TOY_WORDS, frozenset(tokens))
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("toy vocabulary has duplicate tokens")
    return vocab, merges


def toy_vocab_size() -> int:
    """Number of tokens in the toy vocabulary before any `add_tokens` (bos/eos are the last two ids)."""
    return len(_vocab_and_merges()[0])


def toy_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A new toy CLIP tokenizer (`model_max_length=77`) padding with `pad_token`.

    Default `"<|endoftext|>"` is SD1-style (and SDXL's first tokenizer); use `"!"` for SD2-style models (and
    SDXL's second tokenizer). Each call returns a fresh object (callers add placeholder tokens to it); only the
    vocabulary build is cached.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the toy vocabulary")
    # transformers 5: `vocab=`/`merges=` (a list of tuples) work; `vocab_file=`/`merges_file=` are ignored.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)


def write_toy_tokenizer(directory: Path, pad_token: str = EOS_TOKEN) -> None:
    """Save `toy_tokenizer(pad_token)` into `directory` (created if needed), laid out like a real SD tokenizer
    folder: tokenizer.json and tokenizer_config.json (save_pretrained), plus vocab.json, merges.txt and
    special_tokens_map.json. `CLIPTokenizer.from_pretrained(directory)` gives back the same ids, pad token and
    `model_max_length` 77."""
    save_tokenizer_folder(toy_tokenizer(pad_token), *_vocab_and_merges(), directory)



# The toy T5 tokenizer (FLUX's second text encoder). T5's is a SentencePiece Unigram model: whitespace splits
# words, each word gets a leading "▁", and the segmentation with the highest total score wins. Giving every toy
# word "▁word" a score far above any split into single characters (which are there so that any other text still
# tokenizes, and never as `unk` for printable ASCII) makes each toy word exactly one token. Ids as T5's:
# <pad> 0, </s> 1, <unk> 2. No sentinel (<extra_id_N>) tokens: nothing here does span corruption.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_MODEL_MAX_LENGTH = 16  # toy captions are at most 13 tokens with </s>; FLUX.1-dev reads 512, schnell 256


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    words = [("▁" + w, -1.0) for w in TOY_WORDS]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("▁", -5.0)] + [(c, -10.0) for c in chars] + [("▁" + c, -10.0) for c in chars]
    known = {piece for piece, _ in words}  # "a" is a word: its "▁a" stays the word's piece
    return ((T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), *words, *(p for p in pieces if p[0] not in known))


def toy_t5_tokenizer() -> T5Tokenizer:
    """A new toy T5 tokenizer (`model_max_length` 16, pads with `<pad>`, ends with `</s>`)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)


def write_toy_t5_tokenizer(directory: Path) -> None:
    """Save `toy_t5_tokenizer()` into `directory` (tokenizer.json + tokenizer_config.json), so that
    `T5TokenizerFast.from_pretrained(directory)` (what FluxPipeline's model_index names) loads it offline."""
    toy_t5_tokenizer().save_pretrained(Path(directory))
