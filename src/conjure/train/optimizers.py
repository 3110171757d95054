"""The optimizer a run steps with: AdamW, 8-bit AdamW (bitsandbytes), Adafactor or Prodigy, from `OptimizerConfig`.

Methods hand over parameter groups that each carry their own "lr" (per-component learning rates, e.g. a
text encoder slower than the UNet); every optimizer here honours them. With Prodigy a group's lr is a
multiplier of the step size Prodigy estimates (1.0 is the usual value), so a group at 0.5 moves half as far.
"""

from __future__ import annotations

import contextlib
import io
import math
from functools import cache
from typing import Any

import torch

from conjure.errors import ConjureError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
PRODIGY_MIN_LR = 0.1
"""Below this, a Prodigy learning rate is almost certainly an AdamW value carried over (Prodigy's lr is a
multiplier of its own estimate, normally 1.0)."""


FUSED_DEVICES = ("cpu", "cuda")
"""Where torch's fused AdamW kernel runs (torch/optim/adamw.py, `fused`; CPU since torch 2.4)."""


def _fused_kernel(groups: list[dict[str, Any]]) -> bool | None:
    """Whether AdamW steps with torch's fused kernel: one kernel over every parameter, against a Python loop of
    ~10 ops per tensor in the default single-tensor path. A LoRA's many small tensors (192 at rank 4 on the tiny
    UNet's attention) stepped in 0.8 ms instead of 9 ms on one CPU thread. Its updates agree with the loop's to the
    last float32 bit or so (max 4e-9 after 60 steps); None (torch's default choice) where the kernel cannot run."""
    params = [p for group in groups for p in group["params"]]
    fits = all(p.device.type in FUSED_DEVICES and torch.is_floating_point(p) for p in params)
    return True if params and fits else None


class FusedBackward(torch.optim.Optimizer):
    """optimizer.fused_backward_pass: one optimizer per parameter, stepped by the parameter's post-accumulate-grad
    hook as soon as its gradient is complete, which then frees that gradient, so the gradients of the whole model
    never exist at once (torch's tutorial "How to save memory by fusing the optimizer step into the backward pass",
    which uses register_post_accumulate_grad_hook the same way; kohya sd-scripts' sdxl_train.py
    --fused_backward_pass steps Adafactor per parameter in such a hook).

    Its own parameter groups carry the learning rates the schedule sets, which each step reads; `step` and
    `zero_grad` have nothing left to do. Its state is the per-parameter optimizers' states, in parameter order."""

    def __init__(self, groups: list[dict[str, Any]], make: Any):
        super().__init__(groups, {})
        self.inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self.inner[p] = make([{"params": [p], "lr": group["lr"]}])
                p.register_post_accumulate_grad_hook(self._stepper(group))

    def _stepper(self, group: dict[str, Any]) -> Any:
        def step(p: torch.Tensor) -> None:
            inner = self.inner[p]
            inner.param_groups[0]["lr"] = group["lr"]
            if p.dtype != torch.bfloat16:
                inner.step()
            else:  # finetune.weights_dtype bf16: the step in float32, this weight only, rounded back stochastically
                p.data, p.grad = p.data.float(), p.grad.float()
                inner.step()
                p.grad = None  # before the weight is bf16 again (a float32 gradient would not fit it)
                p.data = bf16_stochastic_round(p.data)
            p.grad = None

        return step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        return None  # every parameter stepped in the backward pass

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "per_parameter": [opt.state_dict() for opt in self.inner.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = {k: v for k, v in state_dict.items() if k != "per_parameter"}
        super().load_state_dict(own)
        saved = state_dict.get("per_parameter", [])
        if len(saved) != len(self.inner):
            raise ValueError(f"the state holds {len(saved)} per-parameter optimizers, this run has {len(self.inner)}")
        for (p, opt), state in zip(self.inner.items(), saved):
            stored = p.data
            if p.dtype == torch.bfloat16:  # torch casts the moments to the weight's dtype: they are float32
                p.data = stored.float()
            opt.load_state_dict(state)
            p.data = stored


def bf16_stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding up with the probability of the cut-off part (so an update far below bf16's
    resolution still moves the weight on average, where round-to-nearest would drop it): a random 16-bit integer
    added to the float's bits, the low 16 cut. OneTrainer's copy_stochastic_ (modules/util/
    bf16_stochastic_rounding.py) does the same. Draws from torch's global RNG, which checkpoints keep."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def build_optimizer(
    groups: list[dict[str, Any]], config: Any, *, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names over `groups` (each group's own "lr" is kept; groups without
    one get `config.learning_rate`), stepped in the backward pass with `config.fused_backward_pass`. `device`,
    when given, is where training runs: 8-bit AdamW needs CUDA. Raises `ConjureError` when the chosen optimizer
    cannot run here (what to install, or what to use)."""
    if config.fused_backward_pass:
        return FusedBackward(groups, lambda one: _build(one, config, device))
    return _build(groups, config, device)


def _build(groups: list[dict[str, Any]], config: Any, device: torch.device | str | None) -> torch.optim.Optimizer:
    kind = config.optimizer
    betas = (config.adam_beta1, config.adam_beta2)
    common = dict(lr=config.learning_rate, betas=betas, eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, **common, fused=_fused_kernel(groups))
    if kind == "adamw8bit":
        return _adamw8bit(groups, common, device)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        # At the configured rate, as transformers' docstring (optimization.py, 5.25) and kohya's train_util.py
        # (`--optimizer_args scale_parameter=False relative_step=False warmup_init=False`) set it for a given lr:
        # relative_step would replace it with Adafactor's own schedule, scale_parameter rescale it per tensor.
        # beta1 None: no first moment (Adafactor's default), the memory saving it is chosen for.
        return Adafactor(groups, lr=config.learning_rate, weight_decay=config.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if kind == "prodigy":
        prodigy = _prodigy_class()
        with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints a line when weight_decay > 0
            return prodigy(
                groups, **common, d_coef=config.prodigy_d_coef, safeguard_warmup=config.prodigy_safeguard_warmup,
                use_bias_correction=config.prodigy_use_bias_correction,
            )
    raise ConjureError(f"optimizer.optimizer: unknown optimizer {kind!r} (choose one of {', '.join(OPTIMIZERS)})")


def optimizer_warnings(config: Any, groups: list[dict[str, Any]] | None = None) -> list[str]:
    """Settings that run but are probably not what was meant; the loop prints each as a warning.
    `groups`: the recipe's parameter groups; a named group with its own learning rate is checked too."""
    rates = [("optimizer.learning_rate", config.learning_rate)]
    rates += [(f"the {g['name']} learning rate", g["lr"]) for g in groups or []
              if "name" in g and g["lr"] != config.learning_rate]
    warnings = []
    for what, lr in rates:
        if config.optimizer == "prodigy" and lr < PRODIGY_MIN_LR:
            warnings.append(
                f"{what} is {lr:g}, but with prodigy it multiplies the step size Prodigy finds "
                "itself; 1.0 is the usual value (lower it only if training is unstable)"
            )
        elif config.optimizer != "prodigy" and lr >= 0.5:
            warnings.append(
                f"{what} {lr:g} is very high for {config.optimizer} (1.0 is a Prodigy setting; "
                "set optimizer.optimizer: prodigy, or a learning rate like 1e-4)"
            )
    return warnings


def _adamw8bit(groups: list[dict[str, Any]], common: dict[str, Any], device: Any) -> torch.optim.Optimizer:
    where = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (where is not None and where.type != "cuda"):
        raise ConjureError(
            "optimizer.optimizer: adamw8bit (bitsandbytes) needs an NVIDIA GPU with CUDA, and this run is on "
            f"{'the CPU' if where is None or where.type == 'cpu' else where}; set optimizer.optimizer: adamw"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConjureError(
            "optimizer.optimizer: adamw8bit needs the bitsandbytes package: pip install 'conjure[bnb]' "
            "(or pip install bitsandbytes), or set optimizer.optimizer: adamw"
        ) from None
    except Exception as error:  # noqa: BLE001 - a broken CUDA setup fails inside bitsandbytes' import
        raise ConjureError(
            f"optimizer.optimizer: adamw8bit: bitsandbytes could not load ({error}); fix its install or set "
            "optimizer.optimizer: adamw"
        ) from error
    return bnb.optim.AdamW8bit(groups, **common)


@cache
def _prodigy_class() -> type[torch.optim.Optimizer]:
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConjureError(
            "optimizer.optimizer: prodigy needs the prodigyopt package: pip install prodigyopt"
        ) from None

    class GroupLRProdigy(Prodigy):
        """prodigyopt's Prodigy with a learning rate per parameter group.

        prodigyopt refuses groups whose lr differ (other than 0). Here each group steps with
        d * group_lr (times Adam's bias correction when enabled), and its contribution to the estimate of
        d is weighted by its own lr too, so a group at lr 0 drops out of both, as in prodigyopt. With equal
        lrs this is prodigyopt 1.1's step exactly (FSDP sharding is not supported). Prodigy is by
        Mishchenko and Defazio (MIT licence); this step follows prodigyopt's.
        """

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            first = self.param_groups[0]
            beta1, beta2 = first["betas"]
            beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
            k, d, d_max, d_coef, growth_rate = (first[n] for n in ("k", "d", "d_max", "d_coef", "growth_rate"))
            bias_correction = (
                ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1
            )
            d_numerator = first["d_numerator"] * beta3
            delta_numerator, d_denom = _prodigy_gather(self, d, bias_correction, (beta1, beta2, beta3))
            if d_denom == 0:
                return loss  # no gradient yet (or every lr is 0, e.g. the first warmup step)
            global_numerator = d_numerator + delta_numerator
            d_hat = d_coef * global_numerator / d_denom
            step_d = d
            if d == first["d0"]:
                d = max(d, d_hat)
            d_max = max(d_max, d_hat)
            d = min(d_max, d * growth_rate)
            estimate = {"d_numerator": global_numerator, "d_denom": d_denom, "d": d, "d_max": d_max, "d_hat": d_hat}
            _prodigy_apply(self, estimate, step_d, bias_correction, beta1)
            return loss

    return GroupLRProdigy


def _prodigy_init_state(state: dict[str, Any], p: torch.Tensor, slice_p: int, beta1: float) -> None:
    state["step"] = 0
    state["s"] = torch.zeros_like(p.flatten()[::slice_p])
    zero = torch.tensor(0, device=p.device, dtype=p.dtype)  # all-zero p: no copy
    state["p0"] = p.flatten()[::slice_p].clone() if p.any() else zero
    if beta1 > 0:
        state["exp_avg"] = torch.zeros_like(p)
    state["exp_avg_sq"] = torch.zeros_like(p)


def _prodigy_gather(
    opt: torch.optim.Optimizer, d: float, bias_correction: float, betas: tuple[float, float, float]
) -> tuple[float, float]:
    """GroupLRProdigy's first pass: move every parameter's moments and sum its share of the estimate of d, in
    prodigyopt's order (the sums are floats: the order is part of the result). Returns (delta numerator,
    denominator)."""
    beta1, beta2, beta3 = betas
    delta_numerator = d_denom = 0.0
    for group in opt.param_groups:
        dlr, d0, slice_p = d * group["lr"] * bias_correction, group["d0"], group.get("slice_p", 1)
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if group["weight_decay"] != 0 and not group["decouple"]:
                grad.add_(p, alpha=group["weight_decay"])  # in place, as prodigyopt does
            state = opt.state[p]
            if "step" not in state:
                _prodigy_init_state(state, p, slice_p, beta1)
            if group["lr"] <= 0.0:
                continue
            sliced = grad.flatten()[::slice_p]
            delta_numerator += (d / d0) * dlr * torch.dot(sliced, state["p0"] - p.flatten()[::slice_p]).item()
            if beta1 > 0:
                state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
            weight = (d / d0) * d if group["safeguard_warmup"] else (d / d0) * dlr
            state["s"].mul_(beta3).add_(sliced, alpha=weight)
            d_denom += state["s"].abs().sum().item()
    return delta_numerator, d_denom


def _prodigy_apply(
    opt: torch.optim.Optimizer, estimate: dict[str, float], step_d: float, bias_correction: float, beta1: float
) -> None:
    """GroupLRProdigy's second pass: record the new estimate in every group and step each parameter with the d
    this step started from (`step_d`), as prodigyopt does."""
    d = estimate["d"]
    for group in opt.param_groups:
        group.update(estimate)
        dlr = step_d * group["lr"] * bias_correction
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            state["step"] += 1
            denom = state["exp_avg_sq"].sqrt().add_(d * group["eps"])
            if group["weight_decay"] != 0 and group["decouple"]:
                p.add_(p, alpha=-group["weight_decay"] * dlr)
            if beta1 > 0:
                p.addcdiv_(state["exp_avg"], denom, value=-dlr)
            else:
                p.addcdiv_(p.grad, denom, value=-dlr * d)
        group["k"] = group["k"] + 1
