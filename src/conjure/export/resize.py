"""Lower a LoRA's rank by SVD of each module's update (`conjure convert --resize-rank R [--energy E]`).

As kohya sd-scripts networks/resize_lora.py (read at commit 48d368f, 2026-02): the SVD is of the unscaled update
up @ down (conv kernels flattened to [out, in * kh * kw]); the kept singular values go into `lora_up` (U * S),
`lora_down` is Vh. Unlike kohya, which writes alpha = scale * new rank, each module keeps its alpha and `lora_up`
takes the factor new rank / old rank, the same applied update: a file with one alpha keeps one alpha, which
diffusers' kohya reader needs (it applies the most common alpha to every attention projection: docs/
architecture.md), and a module whose rank is already <= R is copied as it is, bit for bit. The retained energy is
sum(kept S^2) / sum(S^2) (kohya prints its square root, "fro retained"). `--energy E` picks per module the smallest
rank that keeps E of the energy (kohya's `sv_fro` with dynamic_param sqrt(E)), capped by R when given.

The SVD is of the small core: up = Qu Ru, down^T = Qd Rd (QR), up @ down = Qu (Ru Rd^T) Qd^T, so a module costs
an r x r SVD and two thin QRs instead of an SVD of the full [out, in] update (FLUX.1's fused linear1 is 21504 x 3072).

DoRA (kohya `dora_scale` or PEFT `magnitude`): the magnitude is kept as trained and the app renormalises the
resized direction W + delta', so the result is as approximate as delta' (the energy reported), never exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError

__all__ = ["Resized", "energy_summary", "pad_fused", "rank_for", "resize_weights"]

MIN_SV = 1e-6  # kohya resize_lora.py: an update whose largest singular value is below this is zero (rank 1)


@dataclass(frozen=True)
class Resized:
    """What happened to one module: its rank before and after and the energy kept (1.0: copied as it was)."""

    module: str
    old_rank: int
    new_rank: int
    energy: float

    @property
    def copied(self) -> bool:
        return self.new_rank == self.old_rank


def energy_summary(records: Sequence[Resized]) -> tuple[float, Resized]:
    """The mean energy kept over `records` (not empty) and the module that kept the least: the summary line of
    `conjure convert --resize-rank` and `conjure lora extract|combine`."""
    return sum(r.energy for r in records) / len(records), min(records, key=lambda r: r.energy)


def _core_svd(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, r], S [r], Vh [r, in * kh * kw] of the unscaled update up @ down, in float32."""
    up = m.up.detach().to(torch.float32).flatten(1)
    down = m.down.detach().to(torch.float32).flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def rank_for(energy_left: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The new rank: R, or the smallest rank keeping `energy` of the total (capped by R)."""
    if energy is None:
        assert rank is not None
        return rank
    new = int(torch.searchsorted(energy_left, torch.tensor(energy, dtype=energy_left.dtype))) + 1
    return min(new, rank) if rank is not None else new


def resize_module(where: str, m: LoraModule, rank: int | None, energy: float | None) -> tuple[LoraModule, Resized]:
    """`m` at the new rank (its own tensors when that is not lower) and the record of it."""
    u, s, vh = _core_svd(m)
    total = float((s * s).sum())
    cumulative = (s * s).cumsum(0) / total if total > 0 else torch.ones_like(s)
    new = 1 if float(s[0]) <= MIN_SV else min(rank_for(cumulative, rank, energy), m.rank)
    if new >= m.rank:
        return m, Resized(where, m.rank, m.rank, 1.0)
    up = (u[:, :new] * (s[:new] * new / m.rank)).reshape(m.up.shape[0], new, *m.up.shape[2:])
    down = vh[:new].reshape(new, *m.down.shape[1:])
    resized = dataclasses.replace(m, up=up.to(m.up.dtype).contiguous(), down=down.to(m.down.dtype).contiguous())
    return resized, Resized(where, m.rank, new, float(cumulative[new - 1]))


def _pad(m: LoraModule, rank: int) -> LoraModule:
    """`m` at a higher rank with zero rows/columns, the same update (alpha kept, `lora_up` times the rank ratio)."""
    extra = rank - m.rank
    if extra == 0:
        return m
    down = torch.cat([m.down, m.down.new_zeros((extra, *m.down.shape[1:]))])
    up = torch.cat([m.up * (rank / m.rank), m.up.new_zeros((m.up.shape[0], extra, *m.up.shape[2:]))], dim=1)
    return dataclasses.replace(m, down=down, up=up.to(m.up.dtype))


def resize_weights(
    weights: LoraWeights, rank: int | None, energy: float | None, fused: Iterable[Iterable[tuple[str, str]]] = ()
) -> tuple[LoraWeights, list[Resized]]:
    """Every module resized (see the module docstring); `fused`: groups of modules a file fuses into one layer
    (FLUX.1's q|k|v), which must keep one rank: the lower ranks of a group are padded with zeros to its highest."""
    if rank is None and energy is None:
        raise ConjureError("resizing needs a rank (--resize-rank R) or an energy (--energy E)")
    if rank is not None and rank < 1:
        raise ConjureError(f"--resize-rank must be at least 1, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConjureError(f"--energy must be in (0, 1], not {energy}")
    out: LoraWeights = {}
    report = []
    for key, m in weights.items():
        out[key], record = resize_module(f"{key[0]}.{key[1]}", m, rank, energy)
        report.append(record)
    return pad_fused(out, fused), report


def pad_fused(weights: LoraWeights, fused: Iterable[Iterable[tuple[str, str]]]) -> LoraWeights:
    """`weights` with the lower ranks of each fused group padded with zeros to its highest (the same updates)."""
    out = dict(weights)
    for group in fused:
        present = [key for key in group if key in out]
        top = max((out[key].rank for key in present), default=0)
        for key in present:
            out[key] = _pad(out[key], top)
    return out
