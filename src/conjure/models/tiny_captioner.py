"""A small random-weight Florence-2 captioning model (the architecture of `conjure caption`'s default), written as
a folder that `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained` load offline: for tests and for
trying `conjure caption` without downloading anything. Its captions are random words of its vocabulary.

Florence-2 is a DaViT vision tower, a projector, and a BART encoder-decoder (transformers
models/florence2/modeling_florence2.py, 5.25). The parts here are as small as the layout allows: 4 vision stages of
width 8 with one block each, 1 encoder and 1 decoder layer of width 16 (~37k parameters, 0.1 s to build). The
tokenizer is a byte-level BPE like BART's, built in code (no Hub): the 256 byte characters, a few dozen whole
words, the `<image>` token the processor expands into image features, and Florence-2's `<loc_0>`..`<loc_999>`
box tokens with `<od>`/`</od>`, so object-detection answers parse as the real model's do (its own answers are
words only: its generation config suppresses every other token). Images are resized to
64 x 64, which the vision tower's x32 downsampling turns into 2 x 2 features + 1 pooled: 5 image tokens.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "drawing", "cat", "dog", "person",
    "woman", "man", "car", "tree", "house", "flower", "sky", "grass", "table", "red", "blue", "green", "yellow",
    "black", "white", "small", "large", "sitting", "standing", "near", "under",
)
IMAGE_SIDE = 64
_IMAGE_TOKENS = (IMAGE_SIDE // 32) ** 2 + 1  # the spatial features and one pooled (Florence2MultiModalProjector)
_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")


def tiny_florence2_tokenizer():  # noqa: ANN201 - transformers' BartTokenizer, imported lazily
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import BartTokenizer

    vocab = {token: index for index, token in enumerate(_SPECIAL)}
    for token in [*sorted(ByteLevel.alphabet()), *WORDS, *(f"\u0120{word}" for word in WORDS)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([*(f"<loc_{n}>" for n in range(1000)), "<od>", "</od>"])
    return tokenizer


def write_tiny_captioner(directory: Path, *, seed: int = 0) -> Path:
    """Write the model, its tokenizer and its processor into `directory` (created); returns it."""
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    tokenizer = tiny_florence2_tokenizer()
    # The PIL image processor: the default one needs torchvision, which conjure does not install.
    images = CLIPImageProcessorPil(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}, do_center_crop=False,
                                   image_seq_length=_IMAGE_TOKENS)
    # The parse rules the real processor_config.json carries for the tasks conjure uses.
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}, "description_with_bboxes": {}})
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
    )
    vision = Florence2VisionConfig(depths=[1] * 4, embed_dim=[8] * 4, num_heads=[1] * 4, num_groups=[1] * 4,
                                   window_size=2, projection_dim=16, max_position_embeddings=8)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # at the usual 0.02 init every image gets the same answer; tests tell images apart
        for parameter in model.parameters():
            parameter.mul_(20)
    # Random weights mostly end the answer at once; allowing only the whole words (and the end, after 3) makes
    # every caption a few words.
    allowed = {*tokenizer.convert_tokens_to_ids([f"\u0120{word}" for word in WORDS]), tokenizer.eos_token_id}
    model.generation_config.suppress_tokens = [n for n in range(len(tokenizer)) if n not in allowed]
    model.generation_config.min_new_tokens = 3
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
