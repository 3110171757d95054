"""The merge formulas, one tensor at a time (every model's tensor of one key, in float32).

- LERP (weighted sum): sum_i w_i x_i with the weights normalised to sum to 1 (A1111's "weighted sum" A(1-M) + BM
  for two models; mergekit's `linear` normalises by default).
- SLERP (two models): spherical interpolation of the flattened tensors at t, falling back to LERP where they are
  nearly parallel (|cos| > 0.9995), as mergekit's `slerp` (merge_methods/slerp.py, read at 4596827) and the gist it
  cites do; the norms are interpolated by the same weights (the formula uses the unnormalised tensors).
- add-difference: A + sum_i w_i (M_i - C) (A1111's "Add difference": A + (B - C) M).
- TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", arXiv:2306.01708): task
  vectors t_i = M_i - base; trim each to its top `density` fraction by magnitude (the paper's k = 20%); elect the
  sign per element as the sign of the sum of the trimmed (weighted) vectors; average only the entries that agree with
  it (disjoint mean, weighted as mergekit's `ties` does with normalize: true); base + lambda * that (the paper's
  lambda = 1 default). As mergekit (generalized_task_arithmetic.py at 9f9b9d4, sparsify.py `magnitude` at f76a516), the top-k
  is taken per tensor (the paper's code takes it over the whole flattened model: a streaming merge cannot), a zero
  sum elects +, and an element no vector keeps stays the base's.
- DARE (Yu et al. 2023, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
  Lunch", arXiv:2311.03099): drop each task-vector entry with probability p = 1 - density and rescale the kept ones
  by 1 / (1 - p), then add them with task arithmetic: base + lambda * sum_i w_i t_i (mergekit's `dare_linear`:
  bernoulli sparsification with rescale, no normalisation). The default p = 0.9 is the paper's headline drop rate.
  The drop mask is seeded per tensor name and model, so a merge is reproducible whatever order tensors are read in.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

__all__ = [
    "DARE_DENSITY", "SLERP_DOT_THRESHOLD", "TIES_DENSITY", "add_difference", "dare", "lerp", "slerp", "ties",
]

TIES_DENSITY = 0.2  # Yadav et al. 2023: "keep the top-k% values (k = 20)"
DARE_DENSITY = 0.1  # Yu et al. 2023: drop rate p = 0.9
SLERP_DOT_THRESHOLD = 0.9995  # mergekit slerp(): above this |cos| the tensors are taken as colinear
_EPS = 1e-8


def lerp(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        out += (weight / total) * tensor
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) of the flattened tensors."""
    na, nb = a.norm(), b.norm()
    ua = a / na if na > _EPS else a
    ub = b / nb if nb > _EPS else b
    dot = float((ua * ub).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    sin = torch.sin(theta)
    s0 = float(torch.sin((1 - t) * theta) / sin)
    s1 = float(torch.sin(t * theta) / sin)
    return s0 * a + s1 * b


def add_difference(a: torch.Tensor, others: Sequence[torch.Tensor], base: torch.Tensor,
                   weights: Sequence[float]) -> torch.Tensor:
    out = a.clone()
    for other, weight in zip(others, weights, strict=True):
        out += weight * (other - base)
    return out


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its top `density` fraction of entries by magnitude set to zero (at least one kept)."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view(delta.shape)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
         density: float = TIES_DENSITY, lam: float = 1.0) -> torch.Tensor:
    # model by model rather than stacked: a few tensors of the size of one, not several of n times that
    deltas = [weight * _trim(tensor - base, density) for tensor, weight in zip(tensors, weights, strict=True)]
    total = torch.zeros_like(base)
    for delta in deltas:
        total += delta
    elected = torch.where(total >= 0, 1.0, -1.0)
    merged, divisor = total.zero_(), torch.zeros_like(base)
    for delta, weight in zip(deltas, weights):
        agree = delta.sign() == elected
        merged += delta * agree
        divisor += weight * agree
    return base + lam * merged / torch.where(divisor == 0, 1.0, divisor)


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{index}:{name}".encode()))


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, name: str,
         density: float = DARE_DENSITY, lam: float = 1.0, seed: int = 0) -> torch.Tensor:
    """`name`: the tensor's key, which with `seed` and the model's index seeds its drop mask."""
    merged = torch.zeros_like(base)
    for index, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
        delta = tensor - base
        if density < 1:
            keep = torch.rand(delta.shape, generator=_generator(seed, name, index)) < density
            delta = delta * keep / density
        merged += weight * delta
    return base + lam * merged
