"""CLIP tokenizers built once, then loaded from conjure's cache folder (`cache_dir()/tokenizers`).

transformers 5 (5.25.0, `tokenization_utils_base._from_pretrained` and
`tokenization_utils_tokenizers.convert_to_native_format`) builds a CLIPTokenizer's BPE from Python objects: from
the dicts `clip_tokenizer` passes, or from a folder's tokenizer.json, which it parses with Python's json twice
(its added tokens, then its vocabulary and merges). That is 0.15-0.4 s at every start. Given vocab.json and
merges.txt as paths, the tokenizers library reads them in Rust instead (~0.05 s), and an SD model folder without
a tokenizer.json (SD 1.5's, SDXL's) already loads that way.

So the first build writes those two files (and, for a folder, its tokenizer_config.json with the added tokens
written out) under a key of what it was built from and of the transformers and tokenizers versions; later runs
load them. An entry is written atomically with a manifest of its files' sha256, checked before every use; an
entry that is missing, corrupt, or cannot be written is ignored, and the tokenizer is built as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conjure.files import atomic_folder, cache_dir
from conjure.models.tokenizer import bpe_files

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MANIFEST = "manifest.json"
FORMAT = 1  # bump when what an entry holds changes
# What a folder's cached tokenizer must tokenize exactly as the one built from the folder (besides its vocabulary,
# added tokens and settings), before its entry is published: case, unicode, spacing, special and added tokens.
PROBE_PROMPTS = (
    "a photo of a cat", "A Photo Of <zwx>, 4K, HDR!!", "ÜNÏCÖDE ß 日本語 🙂 naïve café", "  many   spaces\tand\nlines ",
    "<|startoftext|>x<|endoftext|>", "it's they're I'll we'd", "1234567890 $%^&*() [brackets] {braces}", "word " * 60,
)


def _key(kind: str, sources: Iterable[bytes]) -> str:
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"{kind}\0{FORMAT}\0{transformers.__version__}\0{tokenizers.__version__}".encode())
    for part in sources:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:32]


def _checked(entry: Path) -> bool:
    """Whether every file the entry's manifest lists is there with its sha256."""
    try:
        files = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))["files"]
        return bool(files) and all(hashlib.sha256((entry / name).read_bytes()).hexdigest() == digest
                                   for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_folder(kind: str, sources: Iterable[bytes], make: Callable[[], dict[str, bytes]],
                  check: Callable[[Path], None] | None = None) -> Path | None:
    """The cache folder of `make()`'s files (name -> bytes) for this `kind` and `sources`: the one written before
    if it checks out, else written now (published only if `check(folder)` does not raise). None where the cache
    cannot be written or `check` refused it: the caller builds its tokenizer without it."""
    try:
        entry = cache_dir() / "tokenizers" / f"{kind}-{_key(kind, sources)}"
    except RuntimeError:  # no home folder (pathlib's Path.home()) and no CONJURE_CACHE_DIR / XDG_CACHE_HOME
        return None
    if _checked(entry):
        return entry

    def write(tmp: Path) -> None:
        files = make()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if check is not None:
            check(tmp)
        manifest = {"files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")  # last: it vouches for the rest

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_folder(entry, write)
    except (OSError, ValueError):  # a read-only or full cache, another process publishing the same entry
        return None
    return entry


def _fingerprint(tokenizer: CLIPTokenizer) -> tuple[Any, ...]:
    backend = tokenizer.backend_tokenizer
    return (tokenizer.get_vocab(), tokenizer.added_tokens_decoder, tokenizer.special_tokens_map,
            tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side, backend.padding,
            backend.truncation, [tokenizer(p).input_ids for p in PROBE_PROMPTS])


def clip_tokenizer_from(folder: Path) -> CLIPTokenizer:
    """`CLIPTokenizer.from_pretrained(folder)`, through the cache where the folder has a tokenizer.json (which
    transformers would parse in Python at every load). The entry is published only once the tokenizer it loads
    has the same vocabulary, added tokens, settings and ids on PROBE_PROMPTS as the one built from the folder."""
    from transformers import CLIPTokenizer

    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if "tokenizer.json" not in names:
        return CLIPTokenizer.from_pretrained(folder)
    built: list[CLIPTokenizer] = []

    def make() -> dict[str, bytes]:
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        built.append(tokenizer)
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        settings = folder / "tokenizer_config.json"
        config = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
        config["added_tokens_decoder"] = {str(i): token.__getstate__()
                                          for i, token in tokenizer.added_tokens_decoder.items()}
        return {**bpe_files(model["vocab"], merges), "tokenizer_config.json": json.dumps(config).encode("utf-8")}

    def check(tmp: Path) -> None:
        if _fingerprint(CLIPTokenizer.from_pretrained(tmp)) != _fingerprint(built[0]):
            raise ValueError(f"the tokenizer cached for {folder} differs from the one built from it")

    entry = cached_folder("clip-folder", [n.encode() + b"\0" + (folder / n).read_bytes() for n in names], make, check)
    if built:
        return built[0]
    if entry is not None:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(entry)
            tokenizer.name_or_path = str(folder)
            return tokenizer
        except Exception:  # noqa: BLE001 - an entry removed or replaced while it was read: build as without a cache
            pass
    return CLIPTokenizer.from_pretrained(folder)
