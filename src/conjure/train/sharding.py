"""`advanced.distributed: fsdp`: the trained modules sharded across the processes with torch's FSDP2
(`torch.distributed.fsdp.fully_shard`), so each process holds ~1/N of the parameters, gradients and optimizer
state; checkpoints and validation see them whole.

Why torch's FSDP2 itself, inside the processes accelerate launched (accelerate stays the launcher and owns the
process group), and not accelerate's FSDP plugin: measured with accelerate 1.16.0 and torch 2.13, an
`Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))` in two torchrun processes
reports `DistributedType.MULTI_CPU` and `prepare` wraps the model in DDP (the plugin is silently ignored on the
CPU); and its FSDP2 `prepare` takes one model together with its optimizer (accelerator.py, `prepare`: "Only one
model is supported when using FSDP2"), where conjure prepares each trained module and then the optimizer.

What FSDP2 changes for the rest of the run: each trained parameter becomes a DTensor holding this process's
rows (dim 0), the optimizer is built on those, and a forward gathers each unit's parameters and frees them
after it. So every process takes part (collectives) when the main process saves (`whole_weights`,
`full_optimizer_state`) or validates (`gathered`), and a checkpoint holds the full tensors: the same training
state and model files as a DDP run's, resumable by either (`copy_into`, `shard_optimizer_state`). What is
sharded: a full fine-tune's UNet (the finetune config refuses fsdp with an EMA or a trained text encoder).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def shard(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Shard each of `modules` over every process: first each block its model names unsplittable
    (`_no_split_modules`: diffusers' UNet names its ResnetBlock2D, BasicTransformerBlock and up blocks,
    transformers' CLIP its encoder layers), innermost first, then the module itself for what is left (the
    embeddings, conv_in/conv_out). The blocks are the units a forward gathers one at a time: the whole model is
    never gathered at once. This is accelerate's own FSDP2 wrapping (`fsdp2_prepare_model` with the
    TRANSFORMER_BASED_WRAP policy, accelerate/utils/fsdp_utils.py, 1.16.0). The root keeps its parameters
    gathered after the forward (torch's default for the root: its backward needs them at once)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in modules:
        blocks = set(getattr(module, "_no_split_modules", None) or ())
        for sub in reversed(list(module.modules())[1:]):
            if type(sub).__name__ in blocks:
                fully_shard(sub, mesh=mesh, reshard_after_forward=True)
        fully_shard(module, mesh=mesh, reshard_after_forward=False)


def sharded(modules: Iterable[nn.Module]) -> bool:
    """Whether any of `modules` was sharded (`shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in modules)


def sync_gradients(modules: Iterable[nn.Module], sync: bool) -> None:
    """Whether this micro-batch's backward reduces the sharded modules' gradients across the processes: only the
    one that completes an accumulated step (accelerate's `accumulate` skips DDP's all-reduce, not FSDP's
    reduce-scatter). Between them each process sums its own unsharded gradients: less communication, but a
    whole gradient per process during accumulation (FSDP2's `set_requires_gradient_sync`)."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync)


@contextmanager
def gathered(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every sharded one of `modules` gathered whole on every process until exit, for the main process's
    validation (a collective: every process enters at the same step). Their forward then gathers nothing (no
    reshard after it), so the main process's images and held-out loss run no collective the others would have to
    join. On exit each process drops its gathered copy (no communication). Not for saving: FSDP2 reshards a
    module whose `state_dict()` is asked for (its pre-save hook, torch/distributed/fsdp/_fully_shard/
    _fsdp_param_group.py `_register_state_dict_hooks`, torch 2.13); see `whole_weights`."""
    from torch.distributed.fsdp import FSDPModule

    roots = [module for module in modules if isinstance(module, FSDPModule)]
    units = [sub for root in roots for sub in root.modules() if isinstance(sub, FSDPModule)]
    for unit in units:
        unit.unshard()
    for root in roots:
        root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for root in roots:  # as `shard` set them: the blocks reshard after their forward, the root does not
            root.set_reshard_after_forward(True)
            root.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.reshard()


@contextmanager
def whole_weights(modules: Iterable[nn.Module], keep: bool) -> Iterator[None]:
    """Until exit, where `keep` (the main process, which saves), every sharded parameter of `modules` is
    replaced in its module's parameter table by its full tensor, gathered one at a time (a collective: every
    process enters at the same step; the others drop each tensor at once). FSDP2 still counts the modules sharded,
    so `state_dict()`, `save_pretrained` and the recipe's state read the full tensors; a forward would gather
    (see `gathered`). The table swap is `conjure.methods.finetune.cast_to_cpu`'s, for the same reason. The
    modules also get back their own classes (fully_shard made a `FSDP<class>` subclass of each:
    `cls_to_fsdp_cls`, torch/distributed/fsdp/_fully_shard/_fully_shard.py), which diffusers and transformers
    write into the saved config.json and model_index.json."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    kept: list[tuple[dict[str, Any], str, Any]] = []
    classes = {sub: type(sub) for module in modules for sub in module.modules() if isinstance(sub, FSDPModule)}
    full: dict[int, nn.Parameter | None] = {}  # tied parameters stay tied
    try:
        for sub in {id(m): m for module in modules for m in module.modules()}.values():
            for name, param in sub._parameters.items():
                if not isinstance(param, DTensor):
                    continue
                if id(param) not in full:  # the same gathers in the same order on every process
                    gathered = param.full_tensor()
                    full[id(param)] = nn.Parameter(gathered, requires_grad=param.requires_grad) if keep else None
                if keep:
                    kept.append((sub._parameters, name, param))
                    sub._parameters[name] = full[id(param)]
        for sub, cls in classes.items() if keep else ():
            sub.__class__ = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
        yield
    finally:
        for sub, cls in classes.items():
            sub.__class__ = cls
        for table, name, param in reversed(kept):
            table[name] = param


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in full: a DTensor gathered from every process (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """The optimizer's `state_dict()` with each sharded state tensor (Adam's moments) gathered whole, one tensor
    at a time (a collective when sharded), as a one-process run's; kept only where `keep` (the main process, which
    writes it), so no other process ever holds more than one gathered tensor."""
    state = optimizer.state_dict()

    def gather(value: Any) -> Any:
        value = whole(value) if isinstance(value, torch.Tensor) else value
        return value if keep else None  # gathered by every process, dropped at once by the others

    full = {index: {key: gather(value) for key, value in per.items()} for index, per in state["state"].items()}
    return {**state, "state": full} if keep else None


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full `value` into `param`: into this process's rows where `param` is sharded (every process
    read the whole checkpoint, so each takes its own rows without communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            rows = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(rows.to_local())
        else:
            param.copy_(value)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a full state (`full_optimizer_state`, or a DDP run's): each state tensor of a
    sharded parameter's shape becomes a DTensor of that parameter's rows, as the optimizer's own steps made them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
