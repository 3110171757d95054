"""denoising_loss: the plain call is today's formula bit for bit; min-SNR weights, noise offset, prediction
type override and loss masks each do what they say and draw no extra random numbers when off."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from pydantic import ValidationError

import conjure.train.loss as loss_module
from conjure.config.sections import AdvancedConfig
from conjure.train.loss import denoising_loss, min_snr_weights

SHAPE = (3, 4, 8, 8)


class FakeUNet:
    """Predicts a fixed fraction of its input (or zeros); remembers what it was called with."""

    def __init__(self, scale: float = 0.5):
        self.scale, self.calls = scale, []

    def __call__(self, noisy, timesteps, **kwargs):
        self.calls.append((noisy.clone(), timesteps.clone(), kwargs))
        return SimpleNamespace(sample=noisy * self.scale)


def scheduler(kind: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=kind)


def latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))


def generator(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(seed: int = 7, batch: int = SHAPE[0]):
    """The noise and timesteps the loss draws from a fresh generator(seed), in its order."""
    g = generator(seed)
    noise = torch.randn(SHAPE, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return noise, timesteps, g


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_plain_call_is_exactly_the_old_formula(kind):
    sched, x0 = scheduler(kind), latents()
    noise, t, after = draws()
    noisy = sched.add_noise(x0, noise, t)
    target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
    expected = torch.nn.functional.mse_loss(noisy * 0.5, target)
    g = generator()
    got = denoising_loss(FakeUNet(), sched, x0, {"encoder_hidden_states": None}, g)
    assert torch.equal(got, expected)
    assert torch.equal(g.get_state(), after.get_state())  # exactly the same draws


def test_unet_gets_the_kwargs():
    unet = FakeUNet()
    denoising_loss(unet, scheduler(), latents(), {"encoder_hidden_states": "x", "added": 1}, generator())
    assert unet.calls[0][2] == {"encoder_hidden_states": "x", "added": 1}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula_on_known_timesteps(kind):
    sched, gamma = scheduler(kind), 5.0
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    alphas = sched.alphas_cumprod[t].double()
    snr = alphas / (1 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    expected = clipped / snr if kind == "epsilon" else clipped / (snr + 1)
    got = min_snr_weights(sched, t, gamma, kind)
    assert torch.allclose(got.double(), expected, rtol=1e-5)
    if kind == "epsilon":  # high noise (SNR < gamma): full weight; low noise: gamma / SNR < 1
        assert got[-1] == 1 and got[0] < 0.01
    else:
        assert got[0] < 0.01 and got[-1] < 0.01 and (got <= 1).all()


def test_min_snr_weights_handle_zero_snr():
    sched = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    t = torch.tensor([999, 0])
    assert sched.alphas_cumprod[999] < 1e-6
    weights = min_snr_weights(sched, t, 5.0, "epsilon")
    assert torch.isfinite(weights).all() and weights[0] == 1


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_weighted_mean_of_per_sample_errors(kind):
    sched, x0, gamma = scheduler(kind), latents(), 5.0
    noise, t, after = draws()
    target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
    prediction = torch.zeros(SHAPE)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=gamma) / (snr if kind == "epsilon" else snr + 1)
    g = generator()
    got = denoising_loss(FakeUNet(scale=0.0), sched, x0, {}, g, min_snr_gamma=gamma)
    assert torch.allclose(got, (weights * per_sample).mean(), rtol=1e-6)
    assert torch.equal(g.get_state(), after.get_state())
    plain = denoising_loss(FakeUNet(scale=0.0), sched, x0, {}, generator())
    assert not torch.allclose(got, plain)


def test_min_snr_follows_the_prediction_override():
    x0 = latents()
    _, t, _ = draws()
    unet = FakeUNet(scale=0.0)
    got = denoising_loss(unet, scheduler("epsilon"), x0, {}, generator(), prediction_type="v_prediction",
                         min_snr_gamma=5.0)
    same = denoising_loss(unet, scheduler("v_prediction"), x0, {}, generator(), min_snr_gamma=5.0)
    assert torch.allclose(got, same)
    assert torch.equal(unet.calls[0][1], t)


def test_zero_noise_offset_draws_exactly_what_no_offset_draws():
    sched, x0 = scheduler(), latents()
    g_plain, g_zero = generator(), generator()
    plain = denoising_loss(FakeUNet(), sched, x0, {}, g_plain)
    zero = denoising_loss(FakeUNet(), sched, x0, {}, g_zero, noise_offset=0.0)
    assert torch.equal(plain, zero) and torch.equal(g_plain.get_state(), g_zero.get_state())


def test_noise_offset_adds_one_value_per_sample_and_channel():
    sched = scheduler()
    x0 = torch.zeros(SHAPE)  # noisy = sqrt(1 - alpha_bar) * noise, so the noise can be read back
    plain_unet, offset_unet = FakeUNet(), FakeUNet()
    denoising_loss(plain_unet, sched, x0, {}, generator())
    g = generator()
    denoising_loss(offset_unet, sched, x0, {}, g, noise_offset=0.1)
    (plain_noisy, plain_t, _), (offset_noisy, offset_t, _) = plain_unet.calls[0], offset_unet.calls[0]
    assert torch.equal(plain_t, offset_t)  # same timesteps: the offset is drawn after them
    scale = (1 - sched.alphas_cumprod[plain_t]).sqrt()[:, None, None, None]
    difference = (offset_noisy - plain_noisy) / scale
    _, _, expected_g = draws()
    expected = 0.1 * torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=expected_g)
    assert torch.allclose(difference, expected.expand(SHAPE), atol=1e-5)
    assert torch.equal(g.get_state(), expected_g.get_state())  # exactly B * C extra numbers


@pytest.mark.parametrize("stored, override", [("epsilon", "v_prediction"), ("v_prediction", "epsilon")])
def test_prediction_type_override_picks_the_target(stored, override):
    sched, x0 = scheduler(stored), latents()
    noise, t, _ = draws()
    target = noise if override == "epsilon" else sched.get_velocity(x0, noise, t)
    got = denoising_loss(FakeUNet(scale=0.0), sched, x0, {}, generator(), prediction_type=override)
    assert torch.allclose(got, (target**2).mean())
    auto = denoising_loss(FakeUNet(scale=0.0), sched, x0, {}, generator(), prediction_type="auto")
    assert torch.equal(auto, denoising_loss(FakeUNet(scale=0.0), sched, x0, {}, generator()))
    assert not torch.allclose(auto, got)


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="sample"):
        denoising_loss(FakeUNet(), scheduler(), latents(), {}, generator(), prediction_type="sample")


def test_auto_keeps_the_four_argument_target_call(monkeypatch):
    """The learning tests sabotage training by patching diffusion_target with a four-argument function."""
    monkeypatch.setattr(loss_module, "diffusion_target", lambda scheduler, latents, noise, timesteps: noise * 0)
    got = denoising_loss(FakeUNet(scale=0.0), scheduler("v_prediction"), latents(), {}, generator(),
                         prediction_type="auto")
    assert got == 0


def test_all_ones_mask_equals_no_mask():
    sched, x0 = scheduler(), latents()
    plain = denoising_loss(FakeUNet(), sched, x0, {}, generator())
    for size in (8, 64):  # latent and image resolution
        masked = denoising_loss(FakeUNet(), sched, x0, {}, generator(), mask=torch.ones(SHAPE[0], 1, size, size))
        assert torch.allclose(masked, plain, rtol=1e-6)


@pytest.mark.parametrize("size", [8, 64])
def test_half_mask_is_the_loss_over_that_half(size):
    sched, x0 = scheduler(), latents()
    noise, t, _ = draws()
    noisy = sched.add_noise(x0, noise, t)
    error = (noisy * 0.5 - noise) ** 2
    mask = torch.zeros(SHAPE[0], 1, size, size)
    mask[..., : size // 2] = 1  # the left half
    expected = error[..., : SHAPE[-1] // 2].mean(dim=(1, 2, 3)).mean()
    got = denoising_loss(FakeUNet(), sched, x0, {}, generator(), mask=mask)
    assert torch.allclose(got, expected, rtol=1e-6)


def test_mask_weights_samples_separately_and_zero_masks_are_safe():
    sched, x0 = scheduler(), latents()
    noise, t, _ = draws()
    error = ((sched.add_noise(x0, noise, t) * 0.5 - noise) ** 2).mean(dim=(1, 2, 3))
    mask = torch.ones(SHAPE[0], 1, 8, 8)
    mask[0] = 0  # the first sample counts for nothing
    mask[1] = 0.25  # a uniform weight is the plain mean of that sample
    got = denoising_loss(FakeUNet(), sched, x0, {}, generator(), mask=mask)
    assert torch.isfinite(got)
    assert torch.allclose(got, torch.cat([torch.zeros(1), error[1:]]).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        denoising_loss(FakeUNet(), sched, x0, {}, generator(), mask=torch.ones(2, 1, 8, 8))


def test_sample_weights_multiply_each_samples_loss_and_ones_change_nothing():
    sched, x0 = scheduler(), latents()
    noise, t, _ = draws()
    error = ((sched.add_noise(x0, noise, t) * 0.5 - noise) ** 2).mean(dim=(1, 2, 3))
    weights = torch.tensor([2.0, 1.0, 0.5])
    got = denoising_loss(FakeUNet(), sched, x0, {}, generator(), weights=weights)
    assert torch.allclose(got, (error * weights).mean(), rtol=1e-6)
    plain = denoising_loss(FakeUNet(), sched, x0, {}, generator())
    assert torch.equal(denoising_loss(FakeUNet(), sched, x0, {}, generator(), weights=torch.ones(3)), plain)
    with pytest.raises(ValueError, match="weights"):
        denoising_loss(FakeUNet(), sched, x0, {}, generator(), weights=torch.ones(2))


def test_loss_gradients_flow_with_all_options():
    sched, x0 = scheduler(), latents()
    weight = torch.tensor(0.3, requires_grad=True)

    def unet(noisy, timesteps, **kwargs):
        return SimpleNamespace(sample=noisy * weight)

    mask = torch.rand(SHAPE[0], 1, 64, 64, generator=generator(1))
    value = denoising_loss(unet, sched, x0, {}, generator(), min_snr_gamma=5.0, noise_offset=0.05, mask=mask)
    value.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)


def test_advanced_config_fields():
    config = AdvancedConfig()
    assert (config.prediction_type, config.min_snr_gamma, config.noise_offset) == ("auto", None, 0.0)
    assert AdvancedConfig(prediction_type="v_prediction", min_snr_gamma=5, noise_offset=0.1).min_snr_gamma == 5.0
    for bad in ({"min_snr_gamma": 0}, {"noise_offset": -0.1}, {"noise_offset": 1.5}, {"prediction_type": "x"}):
        with pytest.raises(ValidationError):
            AdvancedConfig(**bad)
