"""The flow-matching math (conjure/train/flow.py) against the references' own formulas: diffusers'
compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3, FluxPipeline's calculate_shift and
packing helpers, FlowMatchEulerDiscreteScheduler's time_shift; and the loss's draws, target and weighting."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conjure.train.flow import (
    FlowObjective,
    ShiftSchedule,
    build_flow_objective,
    flow_target,
    image_ids,
    loss_weighting,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    text_ids,
    unpack_latents,
)

FLUX_DEV_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampling", ["logit_normal", "sigmoid", "uniform", "shift"])
def test_sigmas_come_only_from_the_generator(sampling):
    global_state = torch.get_rng_state()
    a = sample_sigmas(_gen(3), 64, sampling, image_seq_len=1024)
    b = sample_sigmas(_gen(3), 64, sampling, image_seq_len=1024)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not touched
    assert not torch.equal(a, sample_sigmas(_gen(4), 64, sampling, image_seq_len=1024))
    assert a.dtype == torch.float32 and a.shape == (64,)
    assert bool(((a > 0) & (a < 1)).all())


def test_logit_normal_and_uniform_are_diffusers_densities():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = sample_sigmas(_gen(1), 32, "logit_normal", logit_mean=0.3, logit_std=1.4)
    theirs = compute_density_for_timestep_sampling("logit_normal", 32, 0.3, 1.4, generator=_gen(1))
    assert torch.equal(ours, theirs)
    assert torch.equal(sample_sigmas(_gen(2), 32, "uniform"), compute_density_for_timestep_sampling(
        "uniform", 32, generator=_gen(2)))


def test_logit_normal_mean_moves_towards_noise():
    """The draw is the noise level itself (SD3 paper): a positive logit_mean means noisier samples."""
    sigmas = sample_sigmas(_gen(0), 20000, "logit_normal", logit_mean=1.0, logit_std=1.0)
    assert abs(float(sigmas.median()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.01


def test_sigmoid_is_kohyas():
    assert torch.equal(sample_sigmas(_gen(5), 16, "sigmoid"), torch.sigmoid(torch.randn(16, generator=_gen(5))))


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_shift_is_flux_pipelines_shift_and_the_schedulers_time_shift(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    schedule = ShiftSchedule.of(scheduler.config)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert schedule.mu(seq_len) == pytest.approx(mu, abs=1e-12)
    ours = sample_sigmas(_gen(7), 64, "shift", schedule=schedule, image_seq_len=seq_len)
    expected = scheduler.time_shift(mu, 1.0, torch.sigmoid(torch.randn(64, generator=_gen(7))))
    torch.testing.assert_close(ours, expected)
    if seq_len > 256:  # FLUX.1 shifts large images towards noise
        assert float(ours.mean()) > float(torch.sigmoid(torch.randn(64, generator=_gen(7))).mean())


def test_shift_schedule_reads_a_scheduler_config():
    assert ShiftSchedule.of({"base_shift": 0.3, "max_shift": 1.0, "max_image_seq_len": 2048}) == ShiftSchedule(
        0.3, 1.0, 256, 2048)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_weighting_is_diffusers(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.9])
    torch.testing.assert_close(loss_weighting(weighting, sigmas), compute_loss_weighting_for_sd3(weighting, sigmas))


def test_pack_unpack_and_ids_are_flux_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8))
    ids = image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, torch.device("cpu"), torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # row 1, column 1 of the 3 x 4 patch grid
    assert torch.equal(text_ids(7, torch.device("cpu"), torch.float32), torch.zeros(7, 3))


def test_forward_process_and_target():
    x0, e = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = torch.tensor([0.0, 0.25, 1.0])
    xt = noisy_latents(x0, e, s)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], e[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * e[1])
    assert torch.equal(flow_target(x0, e), e - x0)


def _replay(latents, seed):
    """The loss's draws, in its order: the noise, then the sigmas (default logit-normal)."""
    g = _gen(seed)
    noise = torch.randn(latents.shape, generator=g)
    return noise, sample_sigmas(g, latents.shape[0], "logit_normal")


def _oracle(latents, seed, *, flip=False):
    """A perfect predictor of e - x0 (or of the sabotaged x0 - e) for `latents`, from the replayed draws."""
    noise, sigmas = _replay(latents, seed)

    def predict(noisy, s):
        assert torch.equal(s, sigmas)
        torch.testing.assert_close(noisy, noisy_latents(latents, noise, sigmas))
        return (latents - noise) if flip else (noise - latents)

    return predict


def test_loss_is_zero_for_the_velocity_and_not_for_its_negative():
    latents = torch.randn(4, 4, 8, 8)
    objective = FlowObjective()
    assert float(objective.loss(_oracle(latents, 9), latents, _gen(9), mask=None, weights=None)) == 0.0
    assert float(objective.loss(_oracle(latents, 9, flip=True), latents, _gen(9), mask=None, weights=None)) > 1.0


def test_plain_loss_is_batch_mse_and_options_weight_it():
    latents = torch.randn(2, 4, 8, 8)
    prediction = torch.randn(2, 4, 8, 8)
    noise, sigmas = _replay(latents, 1)
    error = (prediction - (noise - latents)) ** 2
    per_sample = error.mean(dim=(1, 2, 3))
    objective = FlowObjective()
    plain = objective.loss(lambda x, s: prediction, latents, _gen(1), mask=None, weights=None)
    assert torch.equal(plain, F.mse_loss(prediction, noise - latents))
    ones = objective.loss(lambda x, s: prediction, latents, _gen(1), mask=None, weights=torch.ones(2))
    assert torch.equal(ones, plain)
    weighted = objective.loss(lambda x, s: prediction, latents, _gen(1), mask=None, weights=torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(weighted, per_sample[0])  # 2 * l0 / 2
    cosmap = FlowObjective(weighting="cosmap").loss(lambda x, s: prediction, latents, _gen(1), mask=None, weights=None)
    torch.testing.assert_close(cosmap, (per_sample * loss_weighting("cosmap", sigmas)).mean())


def test_mask_weights_pixels_as_the_ddpm_loss_does():
    latents = torch.randn(2, 4, 8, 8)
    prediction = torch.randn(2, 4, 8, 8)
    noise, _ = _replay(latents, 2)
    error = (prediction - (noise - latents)) ** 2
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :, :32] = 1  # left half of the image = left 4 latent columns
    masked = FlowObjective().loss(lambda x, s: prediction, latents, _gen(2), mask=mask, weights=None)
    torch.testing.assert_close(masked, error[..., :4].mean(dim=(1, 2, 3)).mean())
    full = FlowObjective().loss(lambda x, s: prediction, latents, _gen(2), mask=torch.ones(2, 1, 64, 64), weights=None)
    torch.testing.assert_close(full, F.mse_loss(prediction, noise - latents))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="timestep sampling"):
        FlowObjective(sampling="sigma")
    with pytest.raises(ValueError, match="loss weighting"):
        FlowObjective(weighting="mode")
    with pytest.raises(ValueError, match="weights must be"):
        FlowObjective().loss(lambda x, s: x, torch.zeros(2, 4, 8, 8), _gen(), mask=None, weights=torch.ones(3))


def test_build_flow_objective_reads_settings_and_the_models_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_DEV_SCHEDULER, "max_shift": 1.5})
    model = SimpleNamespace(components={"scheduler": scheduler})
    settings = SimpleNamespace(timestep_sampling="shift", logit_mean=0.5, logit_std=2.0, loss_weighting="cosmap")
    objective = build_flow_objective(model, settings)
    assert (objective.sampling, objective.logit_mean, objective.logit_std, objective.weighting) == (
        "shift", 0.5, 2.0, "cosmap")
    assert objective.schedule.max_shift == 1.5
    defaults = build_flow_objective(model, SimpleNamespace())
    assert (defaults.sampling, defaults.weighting) == ("logit_normal", "none")
