"""`conjure demo`: a complete run on the CPU in a minute or two, to see what conjure does.

By default it teaches the toy base model (conjure/toy: a small model pre-trained on a world of coloured
shapes, with no stars in it) a yellow star. `--method ti` learns a new token from 12 bundled captioned images
made by scripts/make_demo_images.py (SDXL: in both text encoders); `--method lora|dora` trains a concept model
triggered by the word "zwx" from 16 star images rendered by the toy world plus 16 ordinary world images with
their own captions (the regularisation that keeps prompts without the trigger as they were); `--method
pivotal` trains a LoRA and a new token together on the same images, the token taking the place of "zwx" in
the star captions. The validation grid shows the star appear step by step. `--model tiny` builds a
random-weight tiny model instead (its images are noise), `--model PATH` uses any model.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from conjure.families import unet_families
from conjure.toy.models import VARIANTS
from conjure.errors import ConjureError

DEMO_METHODS = ("ti", "lora", "dora", "pivotal")
TOKEN = "<yellow-star>"
TRIGGER = "zwx"
# optimizer.learning_rate: the embedding's for ti, the LoRA's for pivotal (its token has PIVOTAL_TOKEN's).
LEARNING_RATE = {"ti": 5e-3, "lora": 3e-3, "dora": 3e-3, "pivotal": 3e-3}
STEPS = {"ti": 300, "lora": 200, "dora": 200, "pivotal": 150}
# The pivotal token learns at 1e-2 for the first half of the steps, then the LoRA trains alone around it
# (tests/toy/test_learning.py measures this recipe on all three toy models).
PIVOTAL_TOKEN = {"learning_rate": 1e-2, "freeze_after": 0.5}
CONTROL_PROMPT = "a large blue square in the center on a grey background"


def demo_images() -> Path:
    return Path(str(resources.files("conjure") / "assets" / "demo" / "ti"))


def lora_demo_images(folder: Path, *, trigger: str = TRIGGER) -> Path:
    """16 yellow stars captioned with `trigger` and 16 ordinary (non-yellow) world images with their captions."""
    from conjure.toy.models import write_concept_set

    return write_concept_set(folder, trigger, name_prefix="concept-", world_images=16)


def _families(method: str) -> tuple[str, ...]:
    from conjure.methods import method_spec

    return method_spec({"ti": "textual_inversion", "dora": "lora"}.get(method, method)).families


def _preset(family: str) -> str:
    """The LoRA preset of the demo: attention alone on the SD toys (what their learning tests measure), the
    family's default elsewhere (the toy FLUX learns shapes in its MLPs too: tests/toy/test_learning_flux.py)."""
    return "attention" if family in unet_families() else "auto"


def demo_config(model: str, out: Path, *, method: str, family: str, steps: int) -> dict:
    """`family`: basic.family ('auto' for a model the demo did not make)."""
    every = max(steps // 6, 1)
    # "circle" is a word the toy model knows, so step 0 shows circles and the concept grows out of them.
    token = {"placeholder_token": TOKEN, "initializer": "circle"}
    if method == "ti":
        config_type, source, word = "textual_inversion", str(demo_images()), TOKEN
        section = {"textual_inversion": token}
    elif method == "pivotal":
        config_type, source, word = "pivotal", str(lora_demo_images(out / "data-lora")), TOKEN
        section = {
            "textual_inversion": {**token, "replace_word": TRIGGER, **PIVOTAL_TOKEN},
            "lora": {"rank": 4, "unet_targets": "attention"},
        }
    else:
        config_type = "lora"
        source, word = str(lora_demo_images(out / "data-lora")), TRIGGER
        section = {"lora": {"trigger_word": TRIGGER, "rank": 4, "unet_targets": _preset(family), "dora": method == "dora"}}
    return {
        "type": config_type,
        "basic": {
            "base_model": model,
            "family": family,
            "output_dir": str(out / "runs"),
            "run_name": "demo",
            "seed": 0,
            "max_train_steps": steps,
            "save_every_n_steps": every,
            "validate_every_n_steps": every,
        },
        "data": {"source": source, "batch_size": 8, "random_flip": True},
        **section,
        "validation": {
            "prompts": [f"a {word}", f"a {word} on a navy background"] + ([] if method == "ti" else [CONTROL_PROMPT]),
            "seeds": [0, 1, 2, 3],
            "num_inference_steps": 20,
            "guidance_scale": 4.0,
        },
        "optimizer": {"learning_rate": LEARNING_RATE[method]},
        "advanced": {"max_grad_norm": None},
    }


def _resolve_model(model: str | None, family: str, out: Path) -> tuple[str, str]:
    """(model path, what it is) for --model / --family."""
    if model not in (None, "tiny"):
        return model, "your model"
    if model is None:
        from conjure.toy.models import toy_model

        return str(toy_model(family)), f"the toy {family} model"
    from conjure.models.tiny import write_tiny_model

    model_dir = out / f"tiny-{family}"
    if not (model_dir / "model_index.json").is_file():
        print(f"building a tiny {family} model in {model_dir}")
        write_tiny_model(family, model_dir)
    return str(model_dir), f"a random-weight tiny {family} model (its images are noise)"


def run_demo(*, method: str, family: str, model: str | None, out: Path, steps: int | None) -> int:
    import torch

    from conjure.config import parse_config
    from conjure.export.embeddings import embedding_file_name
    from conjure.train.loop import train

    if method not in DEMO_METHODS:
        raise ConjureError(f"demo --method {method!r} is not available yet (available: {', '.join(DEMO_METHODS)})")
    if family not in VARIANTS:  # the families with a toy model
        *first, last = VARIANTS
        raise ConjureError(f"demo --family {family!r}: choose {', '.join(first)} or {last}")
    trains = _families(method)
    if model in (None, "tiny") and family not in trains:
        raise ConjureError(f"demo --method {method} trains {', '.join(trains)} models; for {family} use --method "
                           f"{' or '.join(m for m in DEMO_METHODS if family in _families(m))}")
    if steps is not None and steps < 1:
        raise ConjureError(f"demo --steps must be at least 1, not {steps}")
    started = time.perf_counter()
    model_path, what = _resolve_model(model, family, out)
    if model in (None, "tiny") and not torch.cuda.is_available():
        # Small models gain nothing from threads, and two threads made tiny runs erratic (0.25-55 s for
        # the same 20 steps) on 2-core machines; one thread is steady.
        torch.set_num_threads(1)
    config = parse_config(
        demo_config(model_path, out, method=method, family=family if model in (None, "tiny") else "auto",
                    steps=STEPS[method] if steps is None else steps), source="demo config"
    )
    run_root = Path(config.basic.output_dir) / config.basic.run_name
    if run_root.exists():
        import shutil

        shutil.rmtree(run_root)  # the demo's own folder: a re-run starts fresh
    what_is_taught = {
        "ti": f"the token {TOKEN}",
        "pivotal": f"a LoRA and the token {TOKEN} (in place of {TRIGGER!r} in the star captions)",
    }.get(method, f"a {method.upper()} triggered by {TRIGGER!r}")
    print(f"teaching {what} {what_is_taught} from {config.data.source}")
    result = train(config)
    seconds = time.perf_counter() - started
    last = result.checkpoints[-1]
    files = [p for p in sorted(last.iterdir()) if p.suffix == ".safetensors"]
    embeddings = [p for p in files if p.name == embedding_file_name(TOKEN)]
    loras = [p for p in files if p not in embeddings]
    print(f"\ndemo finished in {seconds:.0f} s ({result.step} steps)")
    print(f"  run folder:       {result.run_dir}")
    if method != "ti":
        label = "LoRA (kohya):" if method == "pivotal" else f"{method.upper()} (kohya):"
        print(f"  {label:<18}{loras[0] if loras else last}")
    if method in ("ti", "pivotal"):
        print(f"  {'embedding:':<18}{embeddings[0] if embeddings else last}")
    print(f"  validation grids: {result.run_dir / 'validation'}/step-*/grid.png  (rows: prompts, columns: seeds)")
    print(f"  TensorBoard:      tensorboard --logdir {result.run_dir / 'logs'}")
    print(f"  config to edit:   {result.run_dir / 'config.yaml'}")
    return 0
