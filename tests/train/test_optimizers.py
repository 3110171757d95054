"""build_optimizer: every optimizer steps and honours each parameter group's own learning rate; 8-bit AdamW
explains what is missing; Prodigy's per-group version is prodigyopt's step when the rates agree."""

import sys
import types

import pytest
import torch
from pydantic import ValidationError

from conjure.config.sections import OptimizerConfig
from conjure.errors import ConjureError
from conjure.train.optimizers import build_optimizer, optimizer_warnings


def two_groups(lr_a: float, lr_b: float, *, size: int = 6):
    """Two parameters with the same start; the loss gives them the same (constant) gradient."""
    start = torch.linspace(-1, 1, size, dtype=torch.float64)  # Prodigy's first steps are ~1e-6
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    return a, b, [{"params": [a], "lr": lr_a}, {"params": [b], "lr": lr_b}]


def linear_steps(optimizer, a, b, steps: int) -> None:
    direction = torch.linspace(0.5, 2, a.numel(), dtype=a.dtype)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ((a * direction).sum() + (b * direction).sum()).backward()
        optimizer.step()


@pytest.mark.parametrize(
    "name, lrs", [("adamw", (0.1, 0.05)), ("prodigy", (1.0, 0.5))]
)
def test_steps_with_the_learning_rate_of_each_group(name, lrs):
    a, b, groups = two_groups(*lrs)
    start = a.detach().clone()
    optimizer = build_optimizer(groups, OptimizerConfig(optimizer=name, learning_rate=lrs[0]))
    assert [g["lr"] for g in optimizer.param_groups] == list(lrs)
    linear_steps(optimizer, a, b, steps=4)
    moved_a, moved_b = a.detach() - start, b.detach() - start
    assert (moved_a < 0).all()  # down the gradient
    assert torch.allclose(moved_b, moved_a * lrs[1] / lrs[0], rtol=1e-5, atol=1e-12)


def test_prodigy_adapts_its_step_size():
    """With the default safeguarded warmup Prodigy starts at d0 = 1e-6 and grows its step itself."""
    p = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    target = torch.linspace(-1, 1, 20, dtype=torch.float64)
    optimizer = build_optimizer([{"params": [p], "lr": 1.0}], OptimizerConfig(optimizer="prodigy", learning_rate=1.0))
    d0 = optimizer.param_groups[0]["d"]
    for _ in range(100):
        optimizer.zero_grad(set_to_none=True)
        ((p - target) ** 2).sum().backward()
        optimizer.step()
    assert optimizer.param_groups[0]["d"] > 1000 * d0
    assert ((p - target) ** 2).sum() < 0.1 * (target**2).sum()


def test_prodigy_group_at_zero_lr_stays_put_and_does_not_count():
    a, b, groups = two_groups(1.0, 0.0)
    b_start = b.detach().clone()
    optimizer = build_optimizer(groups, OptimizerConfig(optimizer="prodigy", learning_rate=1.0))
    linear_steps(optimizer, a, b, steps=5)
    assert torch.equal(b.detach(), b_start)
    alone_a, alone_b, alone_groups = two_groups(1.0, 1.0)
    alone = build_optimizer(alone_groups[:1], OptimizerConfig(optimizer="prodigy", learning_rate=1.0))
    linear_steps(alone, alone_a, alone_b, steps=5)
    assert torch.allclose(a.detach(), alone_a.detach())


@pytest.mark.parametrize("safeguard, bias_correction, decay", [(True, True, 0.0), (False, False, 0.01)])
def test_prodigy_with_equal_rates_is_prodigyopts_step(safeguard, bias_correction, decay):
    from prodigyopt import Prodigy

    config = OptimizerConfig(
        optimizer="prodigy", learning_rate=0.7, weight_decay=decay, prodigy_d_coef=2.0,
        prodigy_safeguard_warmup=safeguard, prodigy_use_bias_correction=bias_correction,
    )
    torch.manual_seed(0)
    target = torch.randn(5, 3)
    start = [torch.randn(5, 3), torch.randn(7)]
    params = [[torch.nn.Parameter(t.clone()) for t in start] for _ in range(2)]
    ours = build_optimizer([{"params": [params[0][0]], "lr": 0.7}, {"params": [params[0][1]], "lr": 0.7}], config)
    theirs = Prodigy(
        [{"params": [params[1][0]], "lr": 0.7}, {"params": [params[1][1]], "lr": 0.7}], lr=0.7,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=decay, d_coef=2.0,
        safeguard_warmup=safeguard, use_bias_correction=bias_correction,
    )
    for _ in range(8):
        for (matrix, vector), optimizer in zip(params, (ours, theirs)):
            optimizer.zero_grad(set_to_none=True)
            (((matrix - target) ** 2).sum() + (vector**2).sum()).backward()
            optimizer.step()
    for mine, reference in zip(params[0], params[1]):
        assert torch.allclose(mine, reference, rtol=1e-6, atol=1e-9)
    assert ours.param_groups[0]["d"] == pytest.approx(theirs.param_groups[0]["d"])


def test_adamw_uses_the_config_betas_eps_and_decay():
    _, _, groups = two_groups(0.1, 0.2)
    config = OptimizerConfig(adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6, weight_decay=0.01)
    optimizer = build_optimizer(groups, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[1]
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.8, 0.99), 1e-6, 0.01, 0.2)


def test_adamw_steps_with_the_fused_kernel_as_the_loop_would():
    a, b, groups = two_groups(0.1, 0.05)
    optimizer = build_optimizer(groups, OptimizerConfig(weight_decay=0.01))
    assert optimizer.defaults["fused"] is True  # one kernel for all tensors (train/optimizers.py: _fused_kernel)
    ref_a, ref_b, ref_groups = two_groups(0.1, 0.05)
    loop = torch.optim.AdamW(ref_groups, lr=1e-4, weight_decay=0.01, foreach=False)
    linear_steps(optimizer, a, b, 20)
    linear_steps(loop, ref_a, ref_b, 20)
    assert torch.allclose(a, ref_a, rtol=0, atol=1e-12) and torch.allclose(b, ref_b, rtol=0, atol=1e-12)


def test_adamw_keeps_torchs_choice_where_the_fused_kernel_cannot_run():
    groups = [{"params": [torch.nn.Parameter(torch.ones(3, device="meta"))], "lr": 0.1}]
    assert build_optimizer(groups, OptimizerConfig()).defaults["fused"] is None


def test_adamw8bit_without_cuda_says_to_use_adamw(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, _, groups = two_groups(0.1, 0.2)
    with pytest.raises(ConjureError, match="NVIDIA GPU.*optimizer.optimizer: adamw"):
        build_optimizer(groups, OptimizerConfig(optimizer="adamw8bit"))


def test_adamw8bit_on_a_cpu_device_says_to_use_adamw(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, _, groups = two_groups(0.1, 0.2)
    with pytest.raises(ConjureError, match="CPU.*adamw"):
        build_optimizer(groups, OptimizerConfig(optimizer="adamw8bit"), device="cpu")


def test_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    _, _, groups = two_groups(0.1, 0.2)
    with pytest.raises(ConjureError, match=r"pip install 'conjure\[bnb\]'.*adamw"):
        build_optimizer(groups, OptimizerConfig(optimizer="adamw8bit"))


def test_adamw8bit_builds_bitsandbytes_adamw8bit_with_the_groups(monkeypatch):
    made = {}

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.update(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, _, groups = two_groups(0.1, 0.2)
    optimizer = build_optimizer(groups, OptimizerConfig(optimizer="adamw8bit", weight_decay=0.0), device="cuda")
    assert isinstance(optimizer, AdamW8bit) and [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]
    assert made["weight_decay"] == 0.0 and made["betas"] == (0.9, 0.999)  # not bitsandbytes' default 1e-2


def test_warnings_for_learning_rates_of_the_other_kind():
    assert optimizer_warnings(OptimizerConfig()) == []
    assert optimizer_warnings(OptimizerConfig(optimizer="prodigy", learning_rate=1.0)) == []
    (warning,) = optimizer_warnings(OptimizerConfig(optimizer="prodigy", learning_rate=4e-3))
    assert "1.0" in warning and "0.004" in warning
    (warning,) = optimizer_warnings(OptimizerConfig(optimizer="adamw", learning_rate=1.0))
    assert "prodigy" in warning


def test_warnings_name_a_parameter_group_with_its_own_learning_rate():
    """Pivotal tuning's embedding rate (1e-3 by default) is far too small as a Prodigy multiplier."""
    prodigy = OptimizerConfig(optimizer="prodigy", learning_rate=1.0)
    groups = [{"params": [], "lr": 1.0, "name": "unet"}, {"params": [], "lr": 1e-3, "name": "embedding"}]
    (warning,) = optimizer_warnings(prodigy, groups)
    assert warning.startswith("the embedding learning rate is 0.001")
    assert optimizer_warnings(OptimizerConfig(learning_rate=1e-4), groups[1:]) == []


def test_optimizer_config_fields():
    config = OptimizerConfig()
    assert config.optimizer == "adamw" and config.learning_rate == 4e-3
    assert (config.prodigy_d_coef, config.prodigy_safeguard_warmup, config.prodigy_use_bias_correction) == (
        1.0, True, True
    )
    for bad in ({"optimizer": "sgd"}, {"prodigy_d_coef": 0}):
        with pytest.raises(ValidationError):
            OptimizerConfig(**bad)


def test_adafactor_steps_at_the_configured_rate_of_each_group():
    """transformers' Adafactor with relative_step and scale_parameter off: the rate is the group's lr, not its own
    schedule. Its update is RMS-clipped to 1, so the first step of a matrix moves each weight by about lr."""
    from transformers.optimization import Adafactor

    a = torch.nn.Parameter(torch.zeros(4, 4))
    b = torch.nn.Parameter(torch.zeros(4, 4))
    optimizer = build_optimizer([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}],
                                OptimizerConfig(optimizer="adafactor", learning_rate=0.1))
    assert isinstance(optimizer, Adafactor) and not optimizer.defaults["relative_step"]
    ((a + b) * torch.ones(4, 4)).sum().backward()
    optimizer.step()
    assert torch.allclose(a.detach(), torch.full((4, 4), -0.1), atol=1e-4)
    assert torch.allclose(b.detach(), torch.full((4, 4), -0.01), atol=1e-5)
    assert "state" in optimizer.state_dict()  # its factored state is checkpointed like AdamW's
