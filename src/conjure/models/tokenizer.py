"""The CLIP tokenizer that Stable Diffusion uses, built offline from a vocabulary shipped with conjure.

This module owns the one place where conjure makes a CLIP tokenizer without a model folder: the tiny test
and demo models (`conjure.models.tiny`) and any code that needs SD's token ids before a model is loaded.
It never touches the Hugging Face hub. The BPE vocabulary is the real one (`assets/bpe_simple_vocab_16e6.txt.gz`,
copied from open-clip-torch, MIT licence beside it), and the vocabulary/merges table is rebuilt exactly the way
open_clip's `SimpleTokenizer` builds it, so token ids are identical to the tokenizers shipped with real SD1, SD2
and SDXL checkpoints (49,408 tokens; "a photo of a cat" -> 49406 320 1125 539 320 2368 49407). Embeddings and
LoRAs trained against it therefore refer to the same ids as on the real models.

Families differ only in the pad token: SD1 and SDXL's first tokenizer pad with `<|endoftext|>` (id 49407),
SD2 and SDXL's second tokenizer pad with `"!"` (id 0).

Traps handled here (transformers 5):
- `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores both files and gives a 2-token tokenizer;
  we pass `vocab=` (a dict) and `merges=` (a list of *tuples*; strings raise a TypeError in `tokenizers`).
- Without `model_max_length=77` pipelines fail with `OverflowError: int too big to convert`.
- `save_pretrained` writes only tokenizer.json + tokenizer_config.json; `write_clip_tokenizer` also writes
  vocab.json, merges.txt and special_tokens_map.json like the real SD model folders, so the folder also loads
  with transformers 4's slow `CLIPTokenizer` and with tools that read vocab.json/merges.txt directly.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing transformers costs seconds; do it only when a tokenizer is built
    from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "VOCAB_SIZE",
    "clip_tokenizer",
    "save_tokenizer_folder",
    "write_clip_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408

_BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# open_clip's SimpleTokenizer: merges = lines[1 : 49152 - 256 - 2 + 1]
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map (same order as open_clip)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Rebuild CLIP's vocab (token -> id) and ordered merges from the shipped BPE file (~0.1 s, cached)."""
    raw = resources.files("conjure.models").joinpath("assets", _BPE_ASSET).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _N_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or any(len(m) != 2 for m in merges):  # a corrupt or different asset
        raise RuntimeError(f"CLIP BPE asset {_BPE_ASSET} did not give a {VOCAB_SIZE}-token vocabulary")
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A new CLIP tokenizer with SD's ids, `model_max_length=77`, padding with `pad_token`.

    Use the default `"<|endoftext|>"` for SD1 and SDXL's first tokenizer, `"!"` for SD2 and SDXL's second.
    Each call returns a fresh object (callers add placeholder tokens to it). Its vocab.json and merges.txt are
    written once into conjure's cache (`models/tokenizer_cache.py`: the tokenizers library reads them in Rust,
    ~0.05 s, where building from Python dicts takes ~0.3 s); without that cache it is built from the dicts.
    """
    from transformers import CLIPTokenizer

    from conjure.models.tokenizer_cache import cached_folder

    def build(vocab: str | dict[str, int], merges: str | list[tuple[str, str]]) -> CLIPTokenizer:
        # transformers 5 (the project's bound): `vocab=`/`merges=` work; `vocab_file=`/`merges_file=` are ignored.
        return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)

    asset = resources.files("conjure.models").joinpath("assets", _BPE_ASSET).read_bytes()
    entry = cached_folder("clip-bpe", [asset], lambda: bpe_files(*_vocab_and_merges()))
    tokenizer = None
    if entry is not None:
        try:
            tokenizer = build(str(entry / "vocab.json"), str(entry / "merges.txt"))
        except Exception:  # noqa: BLE001 - an entry removed while it was read: build from the dicts instead
            pass
    if tokenizer is None:
        vocab, merges = _vocab_and_merges()
        tokenizer = build(dict(vocab), list(merges))
    if tokenizer.backend_tokenizer.model.token_to_id(pad_token) is None:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    return tokenizer


def write_clip_tokenizer(directory: Path, pad_token: str = EOS_TOKEN) -> None:
    """Save `clip_tokenizer(pad_token)` into `directory` (created if needed), as in a real SD model folder.

    `CLIPTokenizer.from_pretrained(directory)` and diffusers pipelines loading a model folder whose
    `tokenizer`/`tokenizer_2` subfolder was written by this give back the same ids, pad token and
    `model_max_length` 77. Writes tokenizer.json, tokenizer_config.json, vocab.json, merges.txt and
    special_tokens_map.json.
    """
    save_tokenizer_folder(clip_tokenizer(pad_token), *_vocab_and_merges(), directory)


def save_tokenizer_folder(
    tokenizer: CLIPTokenizer, vocab: dict[str, int], merges: tuple[tuple[str, str], ...], directory: Path
) -> None:
    """Write a CLIP tokenizer folder as real SD models have it: save_pretrained's tokenizer.json and
    tokenizer_config.json (all transformers 5 writes), plus vocab.json, merges.txt and special_tokens_map.json
    for transformers 4 and tools that read the files directly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    for name, data in bpe_files(vocab, merges).items():
        (directory / name).write_bytes(data)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": tokenizer.pad_token, "unk_token": EOS_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def bpe_files(vocab: dict[str, int], merges: Iterable[tuple[str, str]]) -> dict[str, bytes]:
    """vocab.json and merges.txt as the real SD model folders have them (and the tokenizers library reads)."""
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"),
    }
