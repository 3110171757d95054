"""LoRA / DoRA weights in one neutral form, shared by training, the file writers/readers and `conjure convert`.

`LoraWeights` maps (component, module path) to one `LoraModule`:
- component: "unet", "text_encoder" or "text_encoder_2" (the pipeline attribute names);
- module path: the name of the adapted `nn.Linear` / `nn.Conv2d` exactly as `named_modules()` of the loaded
  diffusers / transformers model gives it (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
  "encoder.layers.0.self_attn.q_proj" for CLIPTextModel, "text_model.encoder.layers.0.self_attn.q_proj" for
  CLIPTextModelWithProjection under transformers 5). File writers normalise these to the names apps expect.

The applied update (what every app computes, and what conjure trains):
    W' = W + (alpha / rank) * up @ down          (conv: up[:, :, 0, 0] @ down.flatten(1), reshaped)
    DoRA, input-column (kohya/LyCORIS, `dora_scale` [1, in] / [1, in, 1, 1]):
        W'' = dora_scale * W' / ||W'||_col   (norm of each input column over the output dim and kernel dims)
    DoRA, output-row (PEFT, `magnitude` [out]):
        W'' = magnitude[:, None] * W' / ||W'||_row
    Input-column DoRA of a fused layer (`dora_group`: FLUX.1's q|k|v, export/kohya_flux.py): the modules of one
    group share one `dora_scale`, and ||W'||_col is taken over all their rows stacked (the fused weight apps hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraModule:
    down: torch.Tensor  # [r, in] (conv: [r, in, kh, kw])
    up: torch.Tensor  # [out, r] (conv: [out, r, 1, 1])
    alpha: float
    dora_scale: torch.Tensor | None = None  # input-column DoRA (kohya/LyCORIS layout): [1, in] / [1, in, 1, 1]
    magnitude: torch.Tensor | None = None  # output-row DoRA (PEFT layout): [out]
    dora_group: str | None = None  # the fused layer this module's dora_scale decomposes with its peers

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LoraWeights = dict[tuple[str, str], LoraModule]
