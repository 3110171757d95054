"""A small random-weight CLIP (transformers' CLIPModel) written as a folder that `AutoProcessor` /
`CLIPModel.from_pretrained` load offline: the image-scoring model (`conjure.scoring`) of tests and offline trials.
Its embeddings are random projections, so its scores are deterministic numbers without meaning.

Text and vision towers of width 32 (2 layers, 4 heads), 32 x 32 px images in 8 px patches, a 16-wide shared
embedding; the tokenizer is the real CLIP one (`conjure.models.tokenizer`), whose 49,408-row embedding is most of
the ~10 MB on disk. The image processor is the PIL one (the default needs torchvision, which conjure does not
install).
"""

from __future__ import annotations

from pathlib import Path

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
IMAGE_SIDE = 32


def write_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    """Write the model, its tokenizer and its processor into `directory` (created); returns it."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from conjure.models.tiny import seeded
    from conjure.models.tokenizer import MODEL_MAX_LENGTH, clip_tokenizer

    tokenizer = clip_tokenizer()
    # The ids a CLIP text config pools at must be the tokenizer's (STACK_NOTES: a wrong eos_token_id pools an
    # added token).
    text = dict(_TOWER, vocab_size=len(tokenizer), max_position_embeddings=MODEL_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(_TOWER, image_size=IMAGE_SIDE, patch_size=8),
                        projection_dim=16)
    with seeded(seed):
        model = CLIPModel(config).eval()
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIDE},
                                   crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory
