"""LyCORIS LoHa and LoKr modules as exact LoRA factors of a higher rank, for `conjure convert --resize-rank` /
`--energy`: the only way such a file becomes a LoRA, approximate, with the energy kept reported (export/resize.py).

The updates, as ComfyUI applies them (comfy/weight_adapter/loha.py and lokr.py calculate_weight, read 2026-12):
    LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank    (rank = w1_b.shape[0]; Tucker: each product is
          einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a), a conv kernel)
    LoKr: kron(w1, w2) * alpha / dim                      (w1 = lokr_w1 or w1_a @ w1_b, w2 likewise or its Tucker
          form; dim = the rank of the decomposed factor, w2's first; scale 1 when neither is decomposed)
Both have exact low-rank factors. An elementwise product of two products is the product of their face-splitting
products: up[:, i r + j] = u1[:, i] * u2[:, j], down[i r + j] = d1[i] * d2[j] (rank r^2). And kron(w1, a @ b) =
kron(w1, a) @ kron(I, b) (rank cols(w1) * r). resize.py then takes these to rank R by an SVD of their small core, so
the energy reported is that of the true update, and a module whose exact rank is <= R converts exactly.

Flattened conv factors (LoHa without Tucker) do not say the kernel size, so the update takes the shape of the
layer in the real model (models/reference.py on the meta device: no weights); one that does not fit is refused.
"""

from __future__ import annotations

from typing import Mapping

import torch

from conjure.adapters import LoraModule
from conjure.errors import ConjureError
from conjure.inspection.model import Module

__all__ = ["lycoris_module"]


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in, kh, kw]) of einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)."""
    return w_a.T, torch.einsum("i j k l, j r -> i r k l", t, w_b)


def _face_split(u1, d1, u2, d2) -> tuple[torch.Tensor, torch.Tensor]:
    up = (u1[:, :, None] * u2[:, None, :]).flatten(1)
    down = (d1[:, None] * d2[None, :]).flatten(0, 1)
    return up, down


def _loha(p: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    if "hada_t1" in p:
        (u1, d1), (u2, d2) = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]), _tucker(
            p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        u1, d1, u2, d2 = p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]
    up, down = _face_split(u1, d1, u2, d2)
    return up, down, (alpha / p["hada_w1_b"].shape[0]) if alpha is not None else 1.0


def _lokr(p: Mapping[str, torch.Tensor], alpha: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    dim = None if "lokr_w1" in p else p["lokr_w1_b"].shape[0]
    if "lokr_t2" in p:
        a2, b2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    elif "lokr_w2_a" in p:
        a2, b2 = p["lokr_w2_a"], p["lokr_w2_b"]
    else:  # w2 whole: the identity on its narrower side
        w2 = p["lokr_w2"]
        a2, b2 = (w2.new_ones(1).expand(w2.shape[0]).diag(), w2) if w2.shape[0] <= w2[0].numel() else (
            w2.flatten(1), w2.new_ones(1).expand(w2[0].numel()).diag().reshape(-1, *w2.shape[1:]))
    if "lokr_w2_b" in p:
        dim = p["lokr_w2_b"].shape[0]
    # kron(w1, a2 @ b2) = kron(w1, a2) @ kron(I_b, b2); b2's kernel dims stay: the conv kron of ComfyUI
    n = w1.shape[1]
    up = torch.kron(w1, a2)
    down = torch.kron(torch.eye(n, dtype=b2.dtype).reshape(n, n, *(1,) * (b2.dim() - 2)), b2)
    return up, down, (alpha / dim) if alpha is not None and dim is not None else 1.0


def lycoris_module(
    m: Module, tensors: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...], where: str
) -> LoraModule:
    """Module `m` of the file (`m.algorithm` "loha" or "lokr"), adapting a weight of `weight_shape` (the real model's:
    flattened factors do not say a conv kernel), as an exact LoRA of rank r^2 (LoHa) or cols(w1) * r (LoKr): the
    same update as the apps compute."""
    p = {role: tensors[key].to(torch.float32) for role, key in m.parts.items() if role not in ("alpha", "dora_scale")}
    if any(v.dim() not in (2, 4) for v in p.values()):
        raise ConjureError(f"{where}: {m.name}'s factors are not shaped as the LoHa/LoKr modules conjure reads")
    up, down, scale = (_loha if m.algorithm == "loha" else _lokr)(p, m.alpha)
    up, down = up.flatten(1), down.flatten(1)
    if up.shape[0] != weight_shape[0] or down.shape[1] != torch.Size(weight_shape[1:]).numel():
        raise ConjureError(
            f"{where}: {m.name}'s update is {up.shape[0]} x {down.shape[1]}, not the {list(weight_shape)} weight of "
            "the real model's layer"
        )
    rank, conv = down.shape[0], len(weight_shape) == 4
    dora_scale = tensors[m.parts["dora_scale"]] if "dora_scale" in m.parts else None
    return LoraModule(
        down=down.reshape(rank, *weight_shape[1:]).contiguous(),
        up=up.reshape(up.shape[0], rank, *((1, 1) if conv else ())).contiguous(),
        alpha=scale * rank, dora_scale=dora_scale,
    )
