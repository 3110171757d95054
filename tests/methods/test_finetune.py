"""The `finetune` method: its config, the EMA's maths against a hand computation, exact resume (weights, EMA,
optimizer), and the diffusers model folder it saves (loadable, in save_dtype, the EMA's weights)."""

import pytest
import torch
from safetensors import safe_open

from conjure.config import ConfigError, parse_config
from conjure.config.finetune import FinetuneConfig
from conjure.train.ema import Ema, decay_at


@pytest.fixture
def finetune_config(tiny_models, image_folder, tmp_path):
    def make(family="sd1", **sections):
        data = {
            "type": "finetune",
            "basic": {"base_model": str(tiny_models(family)), "output_dir": str(tmp_path / "runs"), "run_name": "run",
                      "max_train_steps": 4, "save_every_n_steps": 4, "validate_every_n_steps": None, "seed": 3},
            "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
            "validation": {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 2.0, "at_start": False},
            "optimizer": {"learning_rate": 1e-3},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return data

    return make


def state_of(result):
    return torch.load(result.checkpoints[-1] / "training_state.pt", weights_only=True)


# --- config ------------------------------------------------------------------------------------------------
def test_defaults_are_a_full_fine_tunes(finetune_config):
    raw = finetune_config()
    del raw["optimizer"]
    config = parse_config(raw)
    assert isinstance(config, FinetuneConfig)
    assert config.optimizer.learning_rate == 1e-5 and config.finetune.ema.decay == 0.9999
    assert not config.finetune.ema.enabled and not config.trains_text_encoder()
    assert parse_config(finetune_config(finetune={"text_encoder_learning_rate": 1e-6})).trains_text_encoder()


@pytest.mark.parametrize(("sections", "field"), [
    ({"basic": {"family": "flux"}}, "basic.family"),
    ({"basic": {"family": "sd1"}, "finetune": {"text_encoder_2_learning_rate": 1e-6}},
     "finetune.text_encoder_2_learning_rate"),
    ({"finetune": {"ema": {"decay": 1.0}}}, "finetune.ema.decay"),
    ({"finetune": {"output_name": "../x"}}, "finetune.output_name"),
])
def test_what_cannot_work_is_refused_naming_the_field(finetune_config, sections, field):
    with pytest.raises(ConfigError) as error:
        parse_config(finetune_config(**sections))
    assert field in str(error.value)


# --- EMA ---------------------------------------------------------------------------------------------------
def test_ema_follows_diffusers_decay_by_hand():
    assert decay_at(1, 0.9999) == 0.0  # EMAModel.get_decay: the first update copies the weights
    assert decay_at(2, 0.9999) == pytest.approx(2 / 11) and decay_at(10**6, 0.9) == 0.9
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = Ema([p], decay=0.5, update_every=1)
    expected = p.detach().clone()
    for step, value in enumerate([3.0, 5.0, 9.0], start=1):
        p.data.fill_(value)
        ema.update(step)
        d = min(0.5, step / (9 + step)) if step > 1 else 0.0
        expected = d * expected + (1 - d) * value
        assert torch.allclose(ema.average[0], expected)
    # steps 1..3: decay 0, 2/11, 3/12 -> 3; 2/11*3 + 9/11*5 = 4.6364; 0.25*4.6364 + 0.75*9 = 7.9091
    assert torch.allclose(ema.average[0], torch.tensor(7.909090909))


def test_ema_every_n_steps_raises_the_decay_to_n():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema([p], decay=0.9, update_every=4, device=torch.device("cpu"))
    p.data.fill_(1.0)
    for step in range(1, 4):
        ema.update(step)
    assert torch.equal(ema.average[0], torch.zeros(3))  # no update between the N-th steps
    ema.update(40)  # decay min(0.9, 40/49) = 0.816..., counted 4 times
    assert torch.allclose(ema.average[0], torch.full((3,), 1 - (40 / 49) ** 4))
    with ema.in_place():
        assert torch.equal(p.detach(), ema.average[0])
    assert torch.equal(p.detach(), torch.ones(3))


# --- training, resume, files --------------------------------------------------------------------------------
def test_resume_matches_an_uninterrupted_run(finetune_config, straight_and_resumed):
    """The weights, the EMA and AdamW's state come back exactly (a text encoder training too, the EMA every
    2 steps: steps 2 and 4 update it across the stop at 2)."""
    raw = finetune_config(finetune={"text_encoder_learning_rate": 1e-4, "ema": {"enabled": True, "update_every": 2}},
                          optimizer={"scheduler": "cosine", "warmup_steps": 2, "learning_rate": 1e-3})
    straight, resumed = straight_and_resumed(raw)
    a, b = state_of(straight), state_of(resumed)
    assert a["method"].keys() == b["method"].keys()
    assert any(k.startswith("ema.text_encoder.") for k in a["method"])
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    first = next(iter(a["optimizer"]["state"].values()))
    assert torch.equal(first["exp_avg"], next(iter(b["optimizer"]["state"].values()))["exp_avg"])
    assert_single_file_is_the_folder(straight.checkpoints[-1], "run")


def assert_single_file_is_the_folder(checkpoint, name):
    """The single-file checkpoint loads in diffusers (from_single_file, configs from the folder) to the folder's
    weights: UNet, VAE and text encoder."""
    from diffusers import StableDiffusionPipeline

    folder, file = checkpoint / name, checkpoint / f"{name}.safetensors"
    with safe_open(file, "pt") as f:
        assert f.metadata()["conjure.method"] == "finetune" and f.metadata()["conjure.ema"] == "True"
        meta = f.metadata()  # shareable (issue 24): the base model by name, no folder of the run's in the header
    assert "/" not in meta["conjure.base_model"] and not any(str(checkpoint.parents[3]) in v for v in meta.values())
    one = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), safety_checker=None)
    other = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(one, part).state_dict(), getattr(other, part).state_dict()
        assert all(torch.equal(a[k].float(), b[k].float()) for k in b), part


def test_the_saved_folder_loads_in_diffusers_with_the_ema_weights(finetune_config, run_config):
    from diffusers import StableDiffusionXLPipeline

    raw = finetune_config("sdxl", finetune={"text_encoder_2_learning_rate": 1e-4, "save_dtype": "bf16",
                                            "output_name": "mine", "ema": {"enabled": True, "decay": 0.5}},
                          basic={"max_train_steps": 3, "save_every_n_steps": 3})
    result = run_config(raw)
    state = state_of(result)["method"]
    folder = result.checkpoints[-1] / "mine"
    for part in ("unet/diffusion_pytorch_model", "text_encoder_2/model", "vae/diffusion_pytorch_model"):
        with safe_open(folder / f"{part}.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, part
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    name, weight = next((k, v) for k, v in pipe.unet.state_dict().items() if k.endswith("conv_in.weight"))
    assert torch.equal(weight, state[f"ema.unet.{name}"].bfloat16())  # the EMA's, not the trained weights
    assert not torch.equal(state[f"ema.unet.{name}"], state[f"unet.{name}"])
    assert "text_encoder.text_model.embeddings.token_embedding.weight" not in state  # the first encoder is frozen


def test_estimate_counts_every_trained_weight(finetune_config):
    """`conjure estimate` builds the recipe on the meta device: the whole UNet and the trained encoder count, and
    the trace (no autocast there) runs the float32 UNet on the run's bf16 inputs."""
    from conjure.estimate.peaks import estimate

    config = parse_config(finetune_config(finetune={"text_encoder_learning_rate": 1e-6,
                                                    "ema": {"enabled": True, "on_cpu": True}}))
    result = estimate(config, assume_gpu=True)
    assert result.trainable == result.parameters["unet"] + result.parameters["text_encoder"]
    gradients = next(t for t in result.accelerator if t.name.startswith("gradients"))
    assert gradients.bytes == result.trainable * 4.0
    config.optimizer.fused_backward_pass, config.advanced.max_grad_norm = True, None
    fused = next(t for t in estimate(config, assume_gpu=True).accelerator if t.name.startswith("gradients"))
    assert "fused" in fused.name and fused.bytes < gradients.bytes  # (the tiny model: its token embedding)
    config.finetune.weights_dtype, config.advanced.mixed_precision = "bf16", "bf16"
    weights = next(t for t in estimate(config, assume_gpu=True).accelerator if t.name.startswith("trained"))
    assert weights.name == "trained parameters (bfloat16)" and weights.bytes == result.trainable * 2.0


def test_validation_renders_with_the_ema_weights(finetune_config, run_config, monkeypatch):
    """ema.use_for_validation: the pipeline renders with the average in place, and training goes on with its own
    weights afterwards (the state saved at the same step holds both, and they differ)."""
    from conjure.train import validation

    real_render, seen = validation.render, []

    def render(pipe, folder, **kwargs):
        seen.append(pipe.unet.conv_in.weight.detach().clone())
        return real_render(pipe, folder, **kwargs)

    monkeypatch.setattr(validation, "render", render)
    raw = finetune_config(finetune={"ema": {"enabled": True, "decay": 0.5}, "single_file": False},
                          basic={"max_train_steps": 3, "save_every_n_steps": 3, "validate_every_n_steps": 3})
    state = state_of(run_config(raw))["method"]
    assert len(seen) == 1 and torch.equal(seen[0], state["ema.unet.conv_in.weight"])
    assert not torch.equal(state["ema.unet.conv_in.weight"], state["unet.conv_in.weight"])


# --- fused backward pass ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sections", "field"), [
    ({}, "advanced.max_grad_norm"),  # its default, 1.0, clips over every gradient
    ({"advanced": {"max_grad_norm": None, "gradient_accumulation_steps": 2}}, "advanced.gradient_accumulation_steps"),
    ({"advanced": {"max_grad_norm": None}, "optimizer": {"optimizer": "prodigy"}}, "optimizer.fused_backward_pass"),
    ({"advanced": {"max_grad_norm": None, "mixed_precision": "fp16"}}, "optimizer.fused_backward_pass"),
])
def test_fused_backward_pass_refuses_what_needs_every_gradient(finetune_config, sections, field):
    sections = {**sections, "optimizer": {**sections.get("optimizer", {}), "fused_backward_pass": True}}
    raw = finetune_config(**sections)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert field in str(error.value)


def test_fused_backward_pass_is_refused_outside_full_fine_tunes(lora_config):
    with pytest.raises(ConfigError, match="only full fine-tunes"):
        parse_config(lora_config(optimizer={"fused_backward_pass": True}, advanced={"max_grad_norm": None}))


def test_fused_backward_steps_as_the_optimizer_does_and_frees_each_gradient():
    """Per-parameter AdamW in the backward pass equals one AdamW over the groups, and no gradient is left after
    the backward pass (each is freed once its parameter stepped)."""
    from conjure.config.sections import OptimizerConfig
    from conjure.train.optimizers import FusedBackward, build_optimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))

    plain, fused = model(), model()
    config = OptimizerConfig(learning_rate=0.01, weight_decay=0.1)
    groups = lambda m: [{"params": list(m[0].parameters()), "lr": 0.01}, {"params": list(m[2].parameters()), "lr": 0.003}]  # noqa: E731
    a = build_optimizer(groups(plain), config)
    b = build_optimizer(groups(fused), config.model_copy(update={"fused_backward_pass": True}))
    assert isinstance(b, FusedBackward)
    x = torch.randn(16, 4)
    for _ in range(3):
        plain(x).square().mean().backward()
        a.step()
        a.zero_grad()
        fused(x).square().mean().backward()
        assert all(p.grad is None for p in fused.parameters())
        b.step()
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


# --- bf16 weights with stochastic rounding ------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    from conjure.train.optimizers import bf16_stochastic_round

    torch.manual_seed(0)
    x = torch.full((20000,), 1.0 + 2**-10)  # an eighth of the way from 1 to the next bf16, 1 + 2**-7
    rounded = bf16_stochastic_round(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    # 5 standard errors (2**-7 * sqrt(1/8 * 7/8 / 20000) = 1.8e-5); round-to-nearest gives 1.0, 9.8e-4 off
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=1e-4)
    assert torch.equal(bf16_stochastic_round(torch.tensor([3.0, -0.5])), torch.tensor([3.0, -0.5]).bfloat16())


def test_bf16_weights_train_and_resume_exactly(finetune_config, straight_and_resumed):
    """The fused backward pass with bf16 weights: each per-weight optimizer's float32 state and the stochastic
    rounding's draws (torch's global RNG, which checkpoints keep) come back exactly."""
    raw = finetune_config(finetune={"weights_dtype": "bf16", "single_file": False, "ema": {"enabled": True}},
                          optimizer={"fused_backward_pass": True, "learning_rate": 1e-3},
                          advanced={"max_grad_norm": None, "mixed_precision": "bf16"})
    straight, resumed = straight_and_resumed(raw)
    a, b = state_of(straight), state_of(resumed)
    assert a["method"]["unet.conv_in.weight"].dtype == torch.bfloat16
    assert a["method"]["ema.unet.conv_in.weight"].dtype == torch.float32
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert len(a["optimizer"]["per_parameter"]) == sum(not k.startswith("ema.") for k in a["method"])  # one a weight
    moments = a["optimizer"]["per_parameter"][0]["state"][0]
    assert moments["exp_avg"].dtype == torch.float32  # the step's state stays float32
    assert torch.equal(moments["exp_avg"], b["optimizer"]["per_parameter"][0]["state"][0]["exp_avg"])


def test_bf16_weights_need_the_fused_pass_and_bf16(finetune_config):
    with pytest.raises(ConfigError, match="fused_backward_pass: true"):
        parse_config(finetune_config(finetune={"weights_dtype": "bf16"}))
    with pytest.raises(ConfigError, match="mixed_precision: bf16"):
        parse_config(finetune_config(finetune={"weights_dtype": "bf16"}, optimizer={"fused_backward_pass": True},
                                     advanced={"max_grad_norm": None}))


def test_a_text_encoder_the_detected_family_lacks_is_refused(finetune_config, run_config):
    """basic.family auto: the model says it is SD 1.x (one text encoder) only once it loads."""
    from conjure.errors import ConjureError

    with pytest.raises(ConjureError, match="text_encoder_2_learning_rate: Stable Diffusion 1.x has no text_encoder_2"):
        run_config(finetune_config(finetune={"text_encoder_2_learning_rate": 1e-6}))


def test_saving_in_another_dtype_keeps_the_trained_weights_and_their_gradient_hooks():
    """DDP all-reduces a parameter's gradient from a hook on its gradient accumulator; the save's fp16 copies must
    leave that accumulator (and the weights) as they were, or the saving process's next backward skips the
    all-reduce the other processes wait in."""
    from conjure.methods.finetune import cast_to_cpu

    layer = torch.nn.Linear(3, 2)
    layer.register_buffer("scale", torch.ones(2))
    weight = layer.weight.detach().clone()
    fired = []
    accumulator = layer.weight.view_as(layer.weight).grad_fn.next_functions[0][0]  # where DDP hooks in
    accumulator.register_hook(lambda *_: fired.append(True))
    with cast_to_cpu([layer], torch.float16):
        state = layer.state_dict()
        assert {t.dtype for t in state.values()} == {torch.float16}
        torch.testing.assert_close(state["weight"], weight.half())
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight) and layer.weight.requires_grad
    assert layer.scale.dtype == torch.float32
    layer(torch.ones(1, 3)).sum().backward()
    assert fired and layer.weight.grad is not None


def test_a_text_encoder_trains_only_what_the_unet_reads(finetune_config):
    """Every trained weight gets a gradient from the caption (DDP stops at a parameter that gets none): SDXL's
    CLIP-L is read at its penultimate layer without the final norm, so its last layer and that norm are frozen;
    CLIP-G (its pooled embedding is read from the top) trains whole."""
    from conjure.methods import method_spec
    from conjure.train.objectives import build_conditioning
    from conjure.train.setup import load_model, text_reading

    config = parse_config(finetune_config("sdxl", finetune={"text_encoder_learning_rate": 1e-5,
                                                            "text_encoder_2_learning_rate": 1e-5}))
    spec = method_spec("finetune")
    model = load_model(config, spec)
    spec.build(config, model)
    conditioning = build_conditioning(model, text_reading(config, model), resolution=64, guidance=None)
    pairs = [(model.components[s.tokenizer], model.components[s.encoder]) for s in model.family.text_encoders]
    out = conditioning.encode(pairs, ["a photo of a dog"], torch.device("cpu"))
    sum(v.float().sum() for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad).backward()
    frozen = set()
    for slot in model.family.text_encoders:
        for name, p in model.components[slot.encoder].named_parameters():
            assert (p.grad is not None) == p.requires_grad, f"{slot.encoder}.{name}"
            frozen |= set() if p.requires_grad else {f"{slot.encoder}.{name}"}
    clip_l = model.components["text_encoder"]
    last = f"encoder.layers.{clip_l.config.num_hidden_layers - 1}."
    assert frozen == {f"text_encoder.{n}" for n, _ in clip_l.named_parameters()
                      if n.startswith((last, "final_layer_norm."))}
