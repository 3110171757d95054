"""`advanced.mixed_precision: auto` on (faked) cards: bf16 only with bf16 hardware, and the reason is recorded."""

import pytest
import torch

from conjure.train.setup import resolve_precision


@pytest.fixture
def card(monkeypatch):
    """Pretend a CUDA card of `capability` is present; torch.cuda.is_bf16_supported behaves as torch's does:
    True on any card where bf16 can be emulated unless including_emulation=False."""

    def install(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))

    return install


@pytest.mark.parametrize(("name", "capability"), [("Tesla T4", (7, 5)), ("Tesla V100-SXM2-16GB", (7, 0)),
                                                  ("NVIDIA GeForce RTX 2080", (7, 5)), ("Tesla P100", (6, 0))])
def test_auto_picks_fp16_where_bf16_is_only_emulated(card, name, capability):
    card(name, capability)
    chosen = resolve_precision("auto", cpu=False)
    assert chosen.value == "fp16"
    assert name in chosen.source and "no bf16 hardware" in chosen.source


@pytest.mark.parametrize(("name", "capability"), [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))])
def test_auto_picks_bf16_with_bf16_hardware(card, name, capability):
    card(name, capability)
    chosen = resolve_precision("auto", cpu=False)
    assert chosen.value == "bf16" and f"compute capability {capability[0]}.{capability[1]}" in chosen.source


def test_a_setting_or_the_cpu_decides_without_asking_the_card(card):
    card("Tesla T4", (7, 5))
    assert (resolve_precision("bf16", cpu=False).value, resolve_precision("bf16", cpu=False).source) == (
        "bf16", "advanced.mixed_precision")
    assert resolve_precision("auto", cpu=True).value == "no"
