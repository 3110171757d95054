"""`conjure lora extract BASE TUNED --rank R | --energy E [--conv-rank R] --to OUT.safetensors`: a LoRA that
approximates the difference between a fine-tuned model and its base, in the kohya layout every app loads.

Conventions of kohya sd-scripts networks/extract_lora_from_models.py (read at commit 06e8980, function `svd`): the
difference TUNED - BASE of each adapted weight in float32, its SVD U S Vh, `lora_up` = U[:, :r] * S[:r],
`lora_down` = Vh[:r]; a conv's difference flattened to [out, in * kh * kw] (down [r, in, kh, kw], up [out, r, 1, 1],
the LoCon layout); 3x3 convs take `--conv-rank` (kohya's --conv_dim) and every other layer `--rank` (--dim); the
rank is at most min(out, in * kh * kw). Where conjure differs, and why:
- every Linear/Conv2d of the UNet and the text encoders whose weights differ is extracted (kohya: the layers its
  LoRA network targets, 3x3 convs only with --conv_dim, the text encoders only when some weight differs by more
  than 0.01); a module whose weights are equal is skipped, so an untouched text encoder adds nothing;
- no clamping: kohya clamps up and down to their 0.99 quantile, which changes the update (a known low-rank
  difference would no longer come back exactly); a value float16 cannot hold is refused when written instead;
- `--energy E` picks per module the smallest rank keeping E of the difference's energy (sum of squared singular
  values), capped by `--rank` when given, as `conjure convert --energy` does (export/resize.py `rank_for`);
- one alpha per file (kohya: alpha = each module's rank): the most common rank, the other modules' scale folded
  into `lora_up` (export/kohya.py `one_alpha`), the same update, loaded exactly by diffusers too.
The SVD is torch.linalg.svd of the whole difference, or with `--rank R` alone and R far below the layer's size
torch.svd_lowrank (`_svd`).

Memory: the models are read layer by layer (merging/sources.py: a diffusers folder, or a hub id's cached snapshot,
from its memory-mapped safetensors files, one tensor at a time); only one layer's two weights and their float32
difference exist at once, plus the LoRA factors kept so far. Which tensors are Linear/Conv2d weights comes from
the component built on the meta device (no weights). A single-file checkpoint is loaded whole (its tensors need
converting from the LDM layout first), as models/loading.py loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.resize import Resized, energy_summary, rank_for
from conjure.merging.sources import Source

__all__ = ["Extracted", "extract", "extract_module"]

# svd_lowrank only where R + oversampling is at most a quarter of the layer's smaller side; 10 extra directions and
# 4 power iterations (Halko et al. suggest p = 5-10 and q = 1-3 for slowly decaying spectra; one more for float32)
_LOWRANK_FACTOR, _OVERSAMPLE, _POWER_ITERATIONS = 4, 10, 4


@dataclass
class Extracted:
    path: Path
    family: str
    modules: list[Resized] = field(default_factory=list)  # old_rank: the difference's full rank min(out, in)
    skipped: int = 0  # modules whose weights were equal

    @property
    def min_energy(self) -> Resized:
        return energy_summary(self.modules)[1]

    @property
    def mean_energy(self) -> float:
        return energy_summary(self.modules)[0]


def _svd(mat: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `mat`; with a fixed rank R far below the layer's size only the top R + oversampling directions,
    by torch.svd_lowrank (Halko, Martinsson, Tropp 2011: a randomized range finder with power iterations; the
    random projection seeded, so a file is reproducible). Its factors are an orthogonal projection of `mat`, so the
    energy they keep, against the Frobenius norm, is exact for what is written; a difference of rank <= R comes
    back exactly. torch.linalg.svd otherwise (an SD 1.5 layer's full SVD: seconds on a CPU; measured in
    docs/benchmarks.md)."""
    if rank is None or _LOWRANK_FACTOR * (rank + _OVERSAMPLE) > min(mat.shape):
        return torch.linalg.svd(mat, full_matrices=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(mat, q=rank + _OVERSAMPLE, niter=_POWER_ITERATIONS)
    return u, s, v.T


def extract_module(diff: torch.Tensor, rank: int | None, energy: float | None) -> tuple[LoraModule, float]:
    """The LoRA (alpha = its rank) of one weight difference [out, in] or [out, in, kh, kw], and the energy kept."""
    mat = diff.detach().to(torch.float32).flatten(1)
    u, s, vh = _svd(mat, rank if energy is None else None)
    power = s * s
    total = float(mat.square().sum())  # the Frobenius norm: the whole energy, also when only R values were computed
    cumulative = power.cumsum(0) / total if total > 0 else torch.ones_like(s)
    keep = max(1, min(rank_for(cumulative, rank, energy), s.numel()))
    up = (u[:, :keep] * s[:keep]).reshape(diff.shape[0], keep, *(1,) * (diff.dim() - 2))
    down = vh[:keep].reshape(keep, *diff.shape[1:])
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(keep)), min(float(cumulative[keep - 1]), 1.0)


def _skeleton(folder: Path, component: str) -> torch.nn.Module:
    """The folder's component built from its config on the meta device: its module tree, without weights."""
    import importlib

    try:
        library, name = json.loads((folder / "model_index.json").read_text())[component]
        cls = getattr(importlib.import_module(library), name)
        with torch.device("meta"):
            if hasattr(cls, "load_config"):  # a diffusers model
                return cls.from_config(cls.load_config(folder / component))
            return cls(cls.config_class.from_pretrained(folder / component))  # a transformers model
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise ConjureError(f"cannot build {folder}'s {component} from its config: {exc}") from None


def _layers(source: Source, component: str) -> list[str]:
    """Paths of the component's Linear/Conv2d layers."""
    module = source.loaded.components[component] if source.folder is None else _skeleton(source.folder, component)
    return [path for path, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _pairs(base: Source, tuned: Source, component: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(path, base weight, tuned weight) of every Linear/Conv2d of one component, read one layer at a time."""
    from conjure.export.single_file import canonical_text_key

    for path in _layers(base, component):
        key = canonical_text_key(f"{path}.weight") if component.startswith("text_encoder") else f"{path}.weight"
        shape = base.shapes[component][key]
        if tuned.shapes[component].get(key) != shape:
            raise ConjureError(f"the tuned model's {component} has no module {path} of shape "
                               f"{list(shape)}: it is not a fine-tune of this base")
        yield path, base.tensor(component, key), tuned.tensor(component, key)


def _metadata(rank: int | None, energy: float | None, conv_rank: int | None, alpha: float,
              base: str, tuned: str) -> dict[str, str]:
    """kohya extract_lora_from_models.py's minimum metadata, and what was extracted from what."""
    args = {} if conv_rank is None else {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))}
    how = f"rank {rank}" if energy is None else f"{energy:g} of the energy" + (f", rank <= {rank}" if rank else "")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank) if energy is None and rank is not None else "Dynamic",
        "ss_network_alpha": str(alpha),
        "ss_network_args": str(args).replace("'", '"'),
        # names, not paths: a shared file should not carry the folders it was made in
        "ss_training_comment": f"extracted by conjure lora extract ({how}): {Path(tuned).name} minus {Path(base).name}",
    }


def _check(rank: int | None, energy: float | None, conv_rank: int | None) -> None:
    if rank is None and energy is None:
        raise ConjureError("give --rank R or --energy E (or both: the energy's rank capped by R)")
    for name, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise ConjureError(f"{name} must be at least 1, not {value}")
    if energy is not None and not 0 < energy <= 1:
        raise ConjureError(f"--energy must be in (0, 1], not {energy}")


def extract(base: str, tuned: str, out: Path, *, rank: int | None = None, energy: float | None = None,
            conv_rank: int | None = None, save_dtype: str = "fp16") -> Extracted:
    """Extract the LoRA of `tuned` - `base` into `out` (see the module docstring); returns the energy report."""
    from conjure.export.convert import cast_weights
    from conjure.export.kohya import save_kohya
    from conjure.export.lora import file_dtype
    from conjure.export.sharing import finish_shared_file
    from conjure.merging.sources import open_source
    from conjure.export.kohya import one_alpha

    _check(rank, energy, conv_rank)
    base_model = open_source(base)
    fam = base_model.family
    if fam.denoiser != "unet":
        raise ConjureError(f"extract reads UNet models (SD 1.x/2.x/SDXL), not {fam.title}")
    tuned_model = open_source(tuned)
    if tuned_model.family is not fam:
        raise ConjureError(f"{tuned} is a {tuned_model.family.title} model, but the base {base} is {fam.title}")
    result = Extracted(Path(out), fam.name)
    weights: LoraWeights = {}
    for component in (fam.denoiser, *(slot.encoder for slot in fam.text_encoders)):
        for path, w_base, w_tuned in _pairs(base_model, tuned_model, component):
            diff = w_tuned.float() - w_base.float()  # the files' own dtypes may differ (fp16 base, fp32 tune)
            if not diff.any():
                result.skipped += 1
                continue
            conv3 = w_base.dim() == 4 and tuple(w_base.shape[2:]) != (1, 1)
            want = conv_rank if conv3 and conv_rank is not None else rank
            module, kept = extract_module(diff, want, energy)
            weights[(component, path)] = module
            full = min(w_base.shape[0], w_base[0].numel())
            result.modules.append(Resized(f"{component}.{path}", full, module.rank, kept))
    if not weights:
        raise ConjureError(f"{tuned} and {base} have the same weights: nothing to extract")
    weights, alpha = one_alpha(weights)
    meta = _metadata(rank, energy, conv_rank, alpha, base, tuned)
    weights = cast_weights(weights, file_dtype(save_dtype))  # refuses values beyond float16's range
    save_kohya(Path(out), weights, meta, fam, base_model.unet_config, dtype=None)
    finish_shared_file(Path(out))  # its own hashes
    return result
