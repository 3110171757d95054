"""`advanced.base_weights_dtype`: the frozen FLUX.1 transformer's Linear weights stored in float8 or nf4.

- "float8": torchao's weight-only float8 (`quantize_(module, Float8WeightOnlyConfig())`, torchao 0.18): each
  weight becomes a Float8Tensor (e4m3, one scale per row) that is upcast to the weight's own dtype (the run's
  bf16) for every matmul. No float8 matmul runs, so it needs no Ada/Hopper GPU (torchao checks compute
  capability 8.9 only for its float8 *activation* configs); it halves bf16's 2 bytes a weight.
- "nf4": bitsandbytes' 4-bit NormalFloat (QLoRA), each nn.Linear replaced by `bnb.nn.Linear4bit` whose weight is
  quantised when it moves to the GPU (bitsandbytes' documented use: build the layer, set `Params4bit`, `.cuda()`),
  with matmuls in the run's dtype. PEFT wraps Linear4bit layers with its bnb LoRA layer.

Every nn.Linear of the module is converted, as diffusers' quantizers do when they load FLUX.1 (its
`_keep_in_fp32_modules` excepted: none for FluxTransformer2DModel); the blocks hold 99.9% of its 11.9B
weights. Both run before the adapters are added, so only the base layers are converted; PEFT's LoRA layers
call the converted layers, and conjure's own DoRA layer (kohya layout) reads their weights through
`dequantized` for its column norms (QDoRA).

float8 runs on the CPU too (torchao 0.18's Float8Tensor upcasts on any device; slow, but it is what lets a 24 GB
machine hold FLUX.1-dev's transformer: 11.9 GB against 23.8 in bf16). A training run's transformer is quantised
on the CPU as it streams in (models/transformer_stream.py), then moved to its device. nf4 stays CUDA-only: bitsandbytes 0.50.2's CPU backend quantises and
runs here, but it is not among conjure's tested setups (its CPU kernels are fetched from the Hub at first use).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from conjure.errors import ConjureError

LIBRARIES = {"float8": ("torchao", "conjure[float8]"), "nf4": ("bitsandbytes", "conjure[bnb]")}


def check_base_weights_dtype(choice: str, *, cpu: bool) -> None:
    """Refuse a `choice` this machine cannot run: nf4 without a CUDA GPU, either without its library."""
    if choice == "auto":
        return
    if choice == "nf4" and (cpu or not torch.cuda.is_available()):
        where = "advanced.cpu is set" if cpu else "there is no CUDA GPU"
        raise ConjureError(f"advanced.base_weights_dtype: nf4 stores the frozen transformer to save a CUDA GPU's "
                           f"memory, and {where}; set it to float8 (which runs on the CPU too) or auto")
    library, extra = LIBRARIES[choice]
    if importlib.util.find_spec(library) is None:
        raise ConjureError(f"advanced.base_weights_dtype: {choice} needs {library}; pip install '{extra}'")


def linear_layers(module: torch.nn.Module, keep: tuple[str, ...] | None = None) -> list[str]:
    """The paths of the nn.Linear layers to convert (module docstring): those with a plain weight (not converted
    already), outside `keep` (default: the module's `_keep_in_fp32_modules`)."""
    if keep is None:
        keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return [name for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and not converted(m.weight)
            and not any(k in name.split(".") for k in keep)]


def quantize_frozen(module: torch.nn.Module, choice: str, device: torch.device,
                    keep: tuple[str, ...] | None = None) -> int:
    """Convert `module`'s Linear layers (frozen, in the run's dtype, on the CPU or already on `device`) to
    `choice`, each moved to `device` as it is converted (place_model moves the rest); returns how many were
    converted. Layers converted already (a transformer quantised as it streamed in: models/transformer_stream.py)
    are left as they are. `keep`: linear_layers'."""
    names = linear_layers(module, keep)
    if not names:
        return 0
    if choice == "float8":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        chosen = set(names)
        # set_inductor_config would retune torch.compile's global settings; nothing here compiles
        quantize_(module, Float8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, name: name in chosen,
                  device=device)
    elif choice == "nf4":
        for name in names:
            parent, _, attr = name.rpartition(".")
            holder = module.get_submodule(parent) if parent else module
            setattr(holder, attr, _nf4_linear(getattr(holder, attr), device))
    return len(names) if choice in LIBRARIES else 0


def converted(weight: torch.Tensor) -> bool:
    """Whether a weight is stored converted: a tensor subclass (torchao's Float8Tensor, bitsandbytes' Params4bit)
    rather than a plain tensor or parameter."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A frozen weight as a plain tensor of its real shape, for code that reads the weight itself (DoRA's column
    norms) rather than calling its layer: bitsandbytes' Params4bit (packed bytes with a `quant_state`) and torchao's
    quantised tensors (Float8Tensor) are unpacked; any other weight is returned as it is."""
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, state)
    if converted(weight) and hasattr(weight, "dequantize"):
        return weight.dequantize()
    return weight


def _nf4_linear(linear: torch.nn.Linear, device: torch.device) -> Any:
    import bitsandbytes as bnb

    dtype = linear.weight.dtype
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)  # Params4bit quantises on its way to the GPU
