"""Where a CLIP text encoder takes its pooled output: at the end-of-text token.

Published SD text-encoder configs (SDXL's second encoder, SD 1.x's) say `eos_token_id: 2`, a value from before
transformers fixed it; with it, transformers pools at the *largest token id* of the prompt. That is the
end-of-text token only until tokens are added: with an embedding's token in the prompt it is the new token, and
SDXL's pooled embedding (which conditions the whole image) is read at the wrong place. The apps (A1111/Forge,
ComfyUI) pool at the end-of-text token. conjure trains that way (`pool_at_end_of_text` on every encoder it adds
tokens to), and `use_end_of_text_pooling(pipe)` makes a diffusers pipeline do the same before loading an
embedding. Prompts without added tokens give the same result under both rules.
"""

from __future__ import annotations

from typing import Any


def pool_at_end_of_text(encoder: Any, eos_token_id: int) -> None:
    """Make `encoder` (a transformers CLIP text model) pool at the first `eos_token_id` of each prompt."""
    for module in encoder.modules():
        if isinstance(getattr(module, "eos_token_id", None), int) and module.eos_token_id != eos_token_id:
            module.eos_token_id = eos_token_id
    if getattr(encoder.config, "eos_token_id", None) != eos_token_id:
        encoder.config.eos_token_id = eos_token_id


def use_end_of_text_pooling(pipe: Any) -> Any:
    """Every text encoder of a diffusers pipeline pools at its tokenizer's end-of-text token (as apps do, and as
    conjure trains embeddings). Returns the pipeline."""
    for encoder_name, tokenizer_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        encoder, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
        if encoder is not None and tokenizer is not None and tokenizer.eos_token_id is not None:
            pool_at_end_of_text(encoder, tokenizer.eos_token_id)
    return pipe
