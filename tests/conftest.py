"""Test-wide settings: one CPU thread (two threads make tiny runs erratic here, see docs/architecture.md)
and no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def conjure_cache(tmp_path_factory):
    """conjure's user cache folder (tokenizers it built, HF data set images) in the session's temporary folder,
    never the machine's ~/.cache."""
    folder = tmp_path_factory.mktemp("conjure-cache")
    os.environ["CONJURE_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> folder of a tiny random model, built once per test session. `real_layout`: the real UNet block
    layout (2 layers per block), as adapter key names need."""
    from conjure.models.tiny import write_tiny_model

    cache: dict[tuple[str, bool], Path] = {}

    def get(family: str, real_layout: bool = False) -> Path:
        key = (family, real_layout)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}{'-real-layout' if real_layout else ''}")
            cache[key] = write_tiny_model(family, folder, real_layout=real_layout)
        return cache[key]

    return get


@pytest.fixture
def image_folder(tmp_path):
    """Six small images (no captions) in a fresh folder."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)
        pixels[20:50, 20:50] = (240, 200, 20)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _with_sections(data: dict, sections: dict) -> dict:
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


@pytest.fixture
def ti_config(tiny_models, image_folder, tmp_path):
    """A small valid textual_inversion config (raw mapping) on a tiny model (SD1 by default)."""

    def make(family: str = "sd1", **sections) -> dict:
        data = {
            "type": "textual_inversion",
            "basic": {
                "base_model": str(tiny_models(family)),
                "output_dir": str(tmp_path / "runs"),
                "run_name": "run",
                "max_train_steps": 6,
                "save_every_n_steps": 3,
                "validate_every_n_steps": 3,
                "seed": 3,
            },
            "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
            "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
            "validation": {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 2.0},
            "optimizer": {"learning_rate": 0.05},
        }
        return _with_sections(data, sections)

    return make


@pytest.fixture
def lora_config(tiny_models, image_folder, tmp_path):
    """A small valid lora config (raw mapping) on a tiny model."""

    def make(family: str = "sd1", real_layout: bool = False, **sections) -> dict:
        return _with_sections({
            "type": "lora",
            "basic": {
                "base_model": str(tiny_models(family, real_layout)), "output_dir": str(tmp_path / "runs"),
                "run_name": "run", "max_train_steps": 6, "save_every_n_steps": 3, "validate_every_n_steps": 3,
                "seed": 3,
            },
            "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2, "caption_prefix": "zwx"},
            "lora": {"trigger_word": "zwx", "rank": 4, "alpha": 2.0, "save_dtype": "fp32"},
            "validation": {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 2.0},
            "optimizer": {"learning_rate": 0.02},
        }, sections)

    return make


@pytest.fixture
def pivotal_config(tiny_models, image_folder, tmp_path):
    """A small valid pivotal config (raw mapping) on a tiny model; the images have no captions, so the token
    comes from the object templates."""

    def make(family: str = "sd1", real_layout: bool = False, **sections) -> dict:
        return _with_sections({
            "type": "pivotal",
            "basic": {
                "base_model": str(tiny_models(family, real_layout)), "output_dir": str(tmp_path / "runs"),
                "run_name": "run", "max_train_steps": 6, "save_every_n_steps": 3, "validate_every_n_steps": None,
                "seed": 3,
            },
            "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
            "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog", "learning_rate": 0.05},
            "lora": {"rank": 4, "alpha": 2.0, "save_dtype": "fp32"},
            "validation": {"seeds": [0], "num_inference_steps": 2, "guidance_scale": 2.0, "at_start": False},
            "optimizer": {"learning_rate": 0.02},
        }, sections)

    return make


@pytest.fixture
def run_config():
    """`run_config(raw, **kwargs)`: validate a raw config mapping and train it (kwargs: resume, control)."""
    from conjure.config import parse_config
    from conjure.train.loop import train

    def run(raw: dict, **kwargs):
        return train(parse_config(raw), **kwargs)

    return run


@pytest.fixture
def straight_and_resumed(run_config):
    """`straight_and_resumed(raw)`: train `raw` straight through, and again as a run stopped after step 2 (checked
    to be interrupted there) and resumed; returns (straight result, resumed result) for the caller to compare."""
    from conjure.train.control import TrainControl

    def run(raw: dict):
        straight = run_config(raw)
        control = TrainControl()
        control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
        raw["basic"]["run_name"] = "stopped"
        stopped = run_config(raw, control=control)
        assert stopped.status == "interrupted" and stopped.step == 2
        return straight, run_config(raw, resume=str(stopped.run_dir))

    return run


@pytest.fixture
def run_cli(capsys):
    """`run_cli(*args)` runs `conjure ARGS` in this process and returns (exit code, stdout, stderr)."""
    from conjure.cli import main

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def assert_one_line_error():
    """`assert_one_line_error(code, err, *needles)`: a refusal the user can fix is exit 2 and exactly one
    `error: ...` line on stderr, holding every needle, with no traceback (STYLE.md). Only the notes a run printed
    before it may precede it, and only its indented details (a config's problems, one a line) follow it.
    Returns the message."""

    def check(code: int, err: str, *needles: str) -> str:
        assert code == 2, err
        assert "Traceback" not in err, err
        lines = err.rstrip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert len(starts) == 1, err
        message = lines[starts[0]:]
        assert all(line.startswith("  ") for line in message[1:]), err
        message = "\n".join(message)
        for needle in needles:
            assert needle in message, err
        return message

    return check


@pytest.fixture(scope="session")
def outputs():
    """`outputs(components, family)`: the UNet's output for a fixed input and each text encoder's for a fixed
    prompt (with the pooled `text_embeds` where the encoder has a projection): what a LoRA file must change the
    same way however it is applied (loaded by diffusers, baked in, applied by conjure's reader)."""

    def run(components: dict, family: str) -> dict:
        g = torch.Generator().manual_seed(1)
        unet = components["unet"]
        sample = torch.randn(1, 4, 8, 8, generator=g)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        added = None
        if family == "sdxl":
            pooled = components["text_encoder_2"].config.projection_dim
            added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
        ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])  # "a photo of a cat"
        out = {}
        with torch.no_grad():
            out["unet"] = unet(sample, 10, context, added_cond_kwargs=added).sample
            for name in ("text_encoder", "text_encoder_2"):
                if name in components:
                    result = components[name](ids)
                    out[name] = result.last_hidden_state
                    if getattr(result, "text_embeds", None) is not None:
                        out[name + ".text_embeds"] = result.text_embeds
        return out

    return run


def pytest_collection_modifyitems(items):
    """The long tests (the toy learning runs and those marked slow) first, in their order, then the rest: with
    `-n 2`, pytest-xdist hands out the first quarter of the tests round robin and the rest as workers free up, so
    the many short tests fill in at the end and both workers finish together, where a long toy run collected
    last kept one worker busy minutes after the other had finished (measured: 22.9 min with a long tail)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or "tests/toy/" in item.nodeid else 1)
