"""Each merge formula against a hand computation on small tensors (merging/formulas.py)."""

import math

import pytest
import torch

from conjure.merging import formulas

T = torch.tensor


def test_lerp_normalises_the_weights():
    assert torch.equal(formulas.lerp([T([1.0, 2.0]), T([3.0, 6.0])], [3, 1]), T([1.5, 3.0]))


def test_slerp_on_the_circle_and_linear_when_parallel():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(formulas.slerp(a, b, 0.5), T([math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(formulas.slerp(a, b, 0.25), T([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    # the unnormalised tensors are combined: sin(pi/4) (2a + b)
    torch.testing.assert_close(formulas.slerp(2 * a, b, 0.5), math.sqrt(0.5) * T([2.0, 1.0]))
    torch.testing.assert_close(formulas.slerp(T([1.0, 2.0]), T([2.0, 4.0]), 0.25), T([1.25, 2.5]))


def test_add_difference():
    got = formulas.add_difference(T([1.0, 1.0]), [T([3.0, 5.0])], T([1.0, 2.0]), [0.5])
    assert torch.equal(got, T([2.0, 2.5]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    base = T([10.0, 10, 10, 10, 10])
    t1 = base + T([3.0, -1, 0.5, -4, 0.1])  # top 40% (k=2): 3 and -4
    t2 = base + T([-2.0, -2, 1, 1, 0.2])  # top 2: -2 and -2
    # trimmed sum [1, -2, 0, -4, 0]: elected + - + - +; entry 0 keeps only t1's 3, entry 1 only t2's -2
    got = formulas.ties(base, [t1, t2], [1, 1], density=0.4, lam=1.0)
    assert torch.equal(got, base + T([3.0, -2, 0, -4, 0]))
    assert torch.equal(formulas.ties(base, [t1, t2], [1, 1], density=0.4, lam=0.5), base + T([1.5, -1, 0, -2, 0]))
    # weights (1, 3): weighted sum [-3, -6, 0, -4, 0] elects - at entry 0, where t2 alone (weight 3) agrees
    got = formulas.ties(base, [t1, t2], [1, 3], density=0.4, lam=1.0)
    assert torch.equal(got, base + T([-2.0, -2, 0, -4, 0]))
    assert formulas.TIES_DENSITY == 0.2


def test_dare_drops_rescales_and_is_seeded():
    base = torch.zeros(20_000)
    delta = torch.linspace(1, 2, 20_000)
    got = formulas.dare(base, [base + delta], [1.0], name="k", density=0.25, lam=1.0, seed=3)
    kept = got != 0
    assert torch.equal(got[kept], delta[kept] / 0.25)  # kept entries rescaled by 1 / (1 - p)
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.01)
    again = formulas.dare(base, [base + delta], [1.0], name="k", density=0.25, lam=1.0, seed=3)
    other = formulas.dare(base, [base + delta], [1.0], name="other", density=0.25, lam=1.0, seed=3)
    assert torch.equal(got, again) and not torch.equal(got, other)
    # without dropping it is task arithmetic: base + lambda * sum w_i t_i
    b = T([1.0, 1.0])
    got = formulas.dare(b, [T([2.0, 3.0]), T([0.0, 1.0])], [1.0, 0.5], name="k", density=1.0, lam=2.0)
    assert torch.equal(got, b + 2 * (T([1.0, 2.0]) + 0.5 * T([-1.0, 0.0])))
    assert formulas.DARE_DENSITY == pytest.approx(1 - 0.9)
