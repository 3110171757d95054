"""Textual inversion end to end on tiny models: run folder, files apps load, untouched rows, exact resume."""

import pytest
import torch
import yaml

from conjure.config import parse_config
from conjure.export.embeddings import load_embedding
from conjure.runs.events import read_events
from conjure.train.control import TrainControl


def embedding_of(checkpoint):
    tensors, meta = load_embedding(checkpoint / "zq-thing.safetensors")
    return tensors, meta


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_run_folder_and_embedding_file(ti_config, family, run_config):
    result = run_config(ti_config(family))
    run_dir = result.run_dir
    assert result.status == "completed" and result.step == 6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    tensors, meta = embedding_of(run_dir / "checkpoints" / "step-000006")
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (1, 32)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v" + family[-1])
    assert meta["conjure.placeholder_token"] == "<zq-thing>" and meta["conjure.step"] == "6"
    # validation at start, every 3 steps and at the end, each with a grid
    for step in ("000000", "000003", "000006"):
        assert (run_dir / "validation" / f"step-{step}" / "grid.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "logs").iterdir())
    events = read_events(run_dir / "events.jsonl").events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["status"] == "completed"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e["loss"], float) for e in events if e["event"] == "step")
    # the resolved config is itself a valid config that reproduces the run's settings
    resolved = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert resolved.data.resolution == 64 and resolved.basic.run_name == run_dir.name
    assert resolved.basic.resume is None


def test_resolved_config_reproduces_the_run(ti_config, run_config):
    first = run_config(ti_config(validation={"at_start": False}, basic={"validate_every_n_steps": None}))
    raw = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    second = run_config(raw)
    assert second.run_dir != first.run_dir and second.run_dir.name == "run_2"  # never overwrites
    a, _ = embedding_of(first.checkpoints[-1])
    b, _ = embedding_of(second.checkpoints[-1])
    assert torch.equal(a["emb_params"], b["emb_params"])


def test_diffusers_loads_the_embedding_and_it_changes_the_image(ti_config, run_config):
    from diffusers import StableDiffusionPipeline

    raw = ti_config(textual_inversion={"num_vectors": 2})
    result = run_config(raw)
    path = result.checkpoints[-1] / "zq-thing.safetensors"
    assert load_embedding(path)[0]["emb_params"].shape == (2, 32)

    pipe = StableDiffusionPipeline.from_pretrained(raw["basic"]["base_model"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt):
        g = torch.Generator("cpu").manual_seed(0)
        return torch.from_numpy(pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0])

    before = image("a photo of <zq-thing>")
    pipe.load_textual_inversion(str(path), token="<zq-thing>")
    assert "<zq-thing>" in pipe.tokenizer.get_vocab() and "<zq-thing>_1" in pipe.tokenizer.get_vocab()
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <zq-thing>", pipe.tokenizer)).input_ids
    assert pipe.tokenizer.convert_tokens_to_ids(["<zq-thing>", "<zq-thing>_1"]) == ids[2:4]
    after = image("a photo of <zq-thing>")
    assert not torch.allclose(before, after, atol=1e-4)
    # The loaded rows are exactly the trained ones.
    rows = pipe.text_encoder.get_input_embeddings().weight[ids[2:4]]
    assert torch.equal(rows, load_embedding(path)[0]["emb_params"])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_new_rows_change(ti_config, family, monkeypatch, run_config):
    import dataclasses

    import conjure.methods as methods
    from conjure.models.loading import load_base_model

    # full precision: under bf16/fp16 the frozen weights are stored cast, which is not what this test is about
    raw = ti_config(family, basic={"max_train_steps": 4}, advanced={"mixed_precision": "no"})
    seen = {}
    spec = methods.METHODS[raw["type"]]

    def build_and_keep(config, model):  # keep a handle on the trained model
        seen["model"] = model
        return spec.build(config, model)

    monkeypatch.setitem(methods.METHODS, raw["type"], dataclasses.replace(spec, build=build_and_keep))
    run_config(raw)
    fresh = load_base_model(raw["basic"]["base_model"])
    pairs = list(zip(seen["model"].text_encoders(), fresh.text_encoders()))
    assert len(pairs) == (2 if family == "sdxl" else 1)
    for (_, trained), (tokenizer, original) in pairs:
        wrapped = trained.cpu().get_input_embeddings()
        assert torch.equal(wrapped.base.weight, original.get_input_embeddings().weight)
        init = original.get_input_embeddings().weight[tokenizer("dog", add_special_tokens=False).input_ids]
        assert not torch.equal(wrapped.new_rows.detach(), init)
        trained_sd = {k: v for k, v in trained.state_dict().items() if "new_rows" not in k}
        original_sd = original.state_dict()
        assert len(trained_sd) == len(original_sd)
        for key, value in trained_sd.items():
            assert torch.equal(value, original_sd[key.replace("token_embedding.base.", "token_embedding.")]), key
    unet = seen["model"].unet.cpu()
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), fresh.unet.state_dict().values()))


def test_sdxl_embedding_loads_in_diffusers_once_per_encoder_and_changes_the_image(ti_config, run_config):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    raw = ti_config("sdxl", textual_inversion={"num_vectors": 2})
    assert parse_config(raw).type == "textual_inversion"
    result = run_config(raw)
    path = result.checkpoints[-1] / "zq-thing.safetensors"
    tensors, meta = load_embedding(path)
    assert set(tensors) == {"clip_l", "clip_g"} and all(t.shape == (2, 32) for t in tensors.values())
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl") and meta["conjure.num_vectors"] == "2"

    pipe = StableDiffusionXLPipeline.from_pretrained(raw["basic"]["base_model"])
    pipe.set_progress_bar_config(disable=True)

    def image(prompt):
        g = torch.Generator("cpu").manual_seed(0)
        return torch.from_numpy(pipe(prompt, num_inference_steps=2, generator=g, output_type="np").images[0])

    before = image("a photo of <zq-thing>")
    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token="<zq-thing>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<zq-thing>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    after = image("a photo of <zq-thing>")
    assert not torch.allclose(before, after, atol=1e-4)
    # Each encoder got its own tensor's rows, exactly.
    for key, tokenizer, encoder in (("clip_l", pipe.tokenizer, pipe.text_encoder),
                                    ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer.convert_tokens_to_ids(["<zq-thing>", "<zq-thing>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], state[key])


def test_added_tokens_do_not_move_the_pooled_embedding_of_legacy_encoders(tiny_models):
    """Encoders whose config says eos_token_id 2 (SDXL's second one, as published) pool at the largest token id,
    which is a new token once one is added; after textual inversion sets up, pooling is at the end-of-text."""
    from conjure.methods.textual_inversion import TextualInversion
    from conjure.models.loading import load_base_model

    model = load_base_model(str(tiny_models("sdxl")))
    tokenizer, encoder = model.text_encoders()[1]
    for module in encoder.modules():
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2  # as the published SDXL text_encoder_2 config has it
    TextualInversion(model, placeholder_token="<zq-thing>", initializer="dog", num_vectors=1)
    ids = tokenizer(["a <zq-thing> photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = (ids[0] == tokenizer.eos_token_id).nonzero()[0].item()
    assert ids[0].argmax().item() != eos  # the legacy rule would pick the new token
    with torch.no_grad():
        out = encoder(ids)
        expected = encoder.text_projection(out.last_hidden_state[0, eos])
    torch.testing.assert_close(out.text_embeds[0], expected)


def test_resume_matches_uninterrupted_run(ti_config, tmp_path, run_config):
    settings = dict(
        basic={"max_train_steps": 8, "save_every_n_steps": 100, "validate_every_n_steps": None},
        data={"random_flip": True, "center_crop": False},
        optimizer={"scheduler": "cosine", "warmup_steps": 2},
        advanced={"gradient_accumulation_steps": 2},
        validation={"at_start": False},
    )
    full = run_config(ti_config(**settings))
    raw = ti_config(**settings)
    raw["basic"]["run_name"] = "stopped"

    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 3 else None
    stopped = run_config(raw, control=control)
    assert stopped.status == "interrupted" and stopped.step == 3
    assert stopped.checkpoints[-1].name == "step-000003"
    resumed = run_config(raw, resume=str(stopped.run_dir))
    assert resumed.run_dir == stopped.run_dir and resumed.step == 8
    a, _ = embedding_of(full.checkpoints[-1])
    b, _ = embedding_of(resumed.checkpoints[-1])
    assert torch.equal(a["emb_params"], b["emb_params"])
    steps = [e for e in read_events(resumed.run_dir / "events.jsonl").events if e["event"] == "step"]
    full_steps = [e for e in read_events(full.run_dir / "events.jsonl").events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 9))
    assert [e["loss"] for e in steps] == [e["loss"] for e in full_steps]


def test_resume_latest_by_run_name(ti_config, run_config):
    raw = ti_config(basic={"validate_every_n_steps": None}, validation={"at_start": False})
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
    stopped = run_config(raw, control=control)
    raw["basic"]["resume"] = "latest"
    assert run_config(raw).run_dir == stopped.run_dir


def test_keep_last_checkpoints(ti_config, run_config):
    raw = ti_config(basic={"save_every_n_steps": 1, "keep_last_n_checkpoints": 2, "validate_every_n_steps": None})
    result = run_config(raw)
    assert sorted(p.name for p in (result.run_dir / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def test_epochs_set_the_step_count(ti_config, run_config):
    raw = ti_config(basic={"max_train_steps": None, "max_train_epochs": 2, "validate_every_n_steps": None})
    assert run_config(raw).step == 6  # 6 images, batch 2 -> 3 steps per epoch


def test_runs_with_different_precisions_in_one_process(ti_config, run_config):
    """accelerate's process-wide state must not leak from one run into the next (found on a GPU)."""
    short = dict(basic={"max_train_steps": 2, "validate_every_n_steps": None}, validation={"at_start": False})
    first = run_config(ti_config(advanced={"mixed_precision": "bf16"}, **short))
    raw = ti_config(advanced={"mixed_precision": "no"}, **short)
    raw["basic"]["run_name"] = "second"
    second = run_config(raw)
    assert first.status == second.status == "completed"
    events = read_events(second.run_dir / "events.jsonl").events
    assert events[0]["mixed_precision"] == "no"


def test_use_end_of_text_pooling_fixes_a_legacy_sdxl_pipeline(tiny_models):
    """What the README tells diffusers users to call before loading an SDXL embedding into a real SDXL model."""
    from diffusers import StableDiffusionXLPipeline

    from conjure.models.pooling import use_end_of_text_pooling

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models("sdxl")))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        for module in encoder.modules():
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = 2  # as the published SDXL configs have it
    g = torch.Generator().manual_seed(0)
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(torch.randn(1, 32, generator=g), token="<zq-thing>", text_encoder=encoder,
                                    tokenizer=tokenizer)
    ids = pipe.tokenizer_2(["a <zq-thing> photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = (ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0].item()

    def pooled():
        with torch.no_grad():
            out = pipe.text_encoder_2(ids)
            return out.text_embeds[0], pipe.text_encoder_2.text_projection(out.last_hidden_state[0, eos])

    legacy, at_end = pooled()
    assert not torch.allclose(legacy, at_end)  # the legacy rule reads the new token
    use_end_of_text_pooling(pipe)
    fixed, at_end = pooled()
    torch.testing.assert_close(fixed, at_end)


@pytest.mark.parametrize("num_vectors, words", [
    (3, ["red", "round", "ball"]),  # one vector per token
    (2, ["red", "round"]),  # fewer vectors: the first tokens (A1111's i * 3 // 2 picks the same two)
    (4, ["red", "round", "red", "round"]),  # more vectors: the tokens cycled (kohya)
    (1, ["red"]),
])
def test_multi_token_initializers_start_each_vector_at_a_token(tiny_models, num_vectors, words):
    from conjure.methods.textual_inversion import TextualInversion
    from conjure.models.loading import load_base_model

    model = load_base_model(str(tiny_models("sd1")))
    tokenizer, encoder = model.text_encoders()[0]
    vocabulary = encoder.get_input_embeddings().weight.detach().clone()
    initializer = "red round" if num_vectors == 4 else "red round ball"
    ti = TextualInversion(model, placeholder_token="<zq-thing>", initializer=initializer, num_vectors=num_vectors)
    ids = tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in words])
    assert torch.equal(ti.embeddings[0].new_rows.detach(), vocabulary[ids].float())
