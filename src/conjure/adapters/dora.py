"""Input-column DoRA layers: the decomposition that kohya, LyCORIS and every app apply from a `dora_scale`
of shape [1, in] (FORMATS.md). PEFT's DoRA normalises per output row instead (a different function), so
kohya-format DoRA is trained with these layers and PEFT-format DoRA with PEFT's own.

Why not LyCORIS's `LoConModule` (which implements this decomposition): it hooks `forward` of the original
module instead of replacing it (invisible to DDP wrapping of the UNet), computes the merged weight in the
frozen weight's dtype (a bf16 base rounds the small update away) and takes ~6 s to import. The function is
small enough to own, and it is checked against `conjure.export.convert.apply_lora` (how the apps merge a file).

The apps compute W'' = dora_scale * W' / ||W'||_col with W' = W + (alpha/r) up @ down, the norm taken per
input column (over the output dim and kernel dims). A per-input-column factor on the weight equals the
same factor on the input channels, so the forward never materialises W'':

    y = base(x * s) + (alpha/r) * up(down(dropout(x * s))),    s = dora_scale / ||W'||_col

The norm is treated as a constant for the gradient, as the DoRA paper (sec. 4.3) and PEFT do; it is computed
in float32 without autograd, so no extra activations are kept.

Fused layers (`share_decomposition`): where the apps hold several of the model's Linears as one weight (FLUX.1's
q|k|v and single-block q|k|v|mlp, export/kohya_flux.py), they decompose that fused weight: one `dora_scale` [1, in]
and one norm per input column over all the parts' rows. The parts read the same input, so the same input scale
applies to each; they share one scale parameter and each computes the norm over the whole group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conjure.models.quantize import dequantized


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_col: [1, in] for a linear weight [out, in], [1, in, 1, 1] for a conv weight [out, in, kh, kw]."""
    dims = [0] + list(range(2, weight.dim()))
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


class InputColumnDora(nn.Module):
    """A frozen nn.Linear / nn.Conv2d plus a trainable low-rank update and input-column magnitude."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"DoRA adapts nn.Linear and nn.Conv2d layers, not {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise TypeError("DoRA cannot adapt a grouped convolution")
        self.base = base
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        device = base.weight.device
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=device)
        else:
            self.lora_down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
                device=device,
            )
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        # The usual LoRA start: down random (Kaiming, as PEFT and kohya), up zero, so W' == W at step 0,
        # and the magnitude starts at the base weight's own column norms, so W'' == W too.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        with torch.no_grad():
            weight = self.base_weight()
            self.weight_shape = weight.shape
            self.dora_scale = nn.Parameter(column_norm(weight))
        # the layers decomposed together with this one (itself included) and the fused layer's name
        # (`share_decomposition`); a plain tuple, so the peers are not registered as submodules
        self.peers: tuple[InputColumnDora, ...] = (self,)
        self.group: str | None = None

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in float32, unpacked where advanced.base_weights_dtype stores it quantised."""
        return dequantized(self.base.weight).float()

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) * up @ down in float32, shaped like the base weight."""
        up = self.lora_up.weight.float().flatten(1)
        down = self.lora_down.weight.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.weight_shape)

    def new_weight(self) -> torch.Tensor:
        """W' = W + (alpha/r) up @ down in float32."""
        return self.base_weight() + self.delta_weight()

    def input_scale(self) -> torch.Tensor:
        with torch.no_grad():
            norm = group_column_norm([peer.new_weight() for peer in self.peers])
        return self.dora_scale / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_scale()
        if isinstance(self.base, nn.Linear):
            s = s.reshape(-1)  # broadcasts over the last (feature) dim
        xs = x * s.to(x.dtype)
        update = self.lora_up(self.lora_down(self.dropout(xs).to(self.lora_down.weight.dtype)))
        out = self.base(xs)
        return out + (self.scale * update).to(out.dtype)


def group_column_norm(weights: list[torch.Tensor]) -> torch.Tensor:
    """||W||_col of the weights stacked on the output dim (the fused weight apps decompose)."""
    if len(weights) == 1:
        return column_norm(weights[0])  # bit for bit what a lone layer computed before groups existed
    return torch.sqrt(sum(column_norm(w).square() for w in weights))


def share_decomposition(layers: list[InputColumnDora], group: str) -> None:
    """Decompose `layers` as the one fused weight apps hold them as (`group`: its name): one shared `dora_scale`,
    starting at the fused weight's column norms (W'' == W at step 0), and the norm over all their rows."""
    for layer in layers[1:]:
        if layer.weight_shape[1:] != layers[0].weight_shape[1:]:
            raise ValueError(f"{group}: the parts of a fused layer read the same input")
    with torch.no_grad():
        scale = nn.Parameter(group_column_norm([layer.base_weight() for layer in layers]))
    for layer in layers:
        layer.dora_scale, layer.peers, layer.group = scale, tuple(layers), group


def merged_weight(layer: InputColumnDora) -> torch.Tensor:
    """W'' as the apps compute it (for tests and merging)."""
    return layer.dora_scale.detach() * layer.new_weight() / group_column_norm([p.new_weight() for p in layer.peers])

