"""`conjure demo`: a complete run on the CPU in a minute or two, to see what conjure does.

By default it teaches the toy base model (conjure/toy: a small model pre-trained on a world of coloured
shapes, with no stars in it) a new token for a yellow star, from 12 bundled captioned images made by
scripts/make_demo_images.py. The validation grid shows the star appear step by step. `--model tiny` builds a
random-weight tiny model instead (its images are noise), `--model PATH` uses any model.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from conjure.errors import ConjureError

DEMO_METHODS = {"ti": "sd_textual_inversion"}
TOKEN = "<yellow-star>"
LEARNING_RATE = 5e-3


def demo_images() -> Path:
    return Path(str(resources.files("conjure") / "assets" / "demo" / "ti"))


def demo_config(model: str, out: Path, *, config_type: str, steps: int) -> dict:
    every = max(steps // 6, 1)
    return {
        "type": config_type,
        "basic": {
            "base_model": model,
            "output_dir": str(out / "runs"),
            "run_name": "demo",
            "seed": 0,
            "max_train_steps": steps,
            "save_every_n_steps": every,
            "validate_every_n_steps": every,
        },
        "data": {"source": str(demo_images()), "batch_size": 8, "random_flip": True},
        # "circle" is a word the toy model knows, so step 0 shows circles and the concept grows out of them.
        "textual_inversion": {"placeholder_token": TOKEN, "initializer": "circle"},
        "validation": {
            "prompts": [f"a {TOKEN}", f"a {TOKEN} on a navy background"],
            "seeds": [0, 1, 2, 3],
            "num_inference_steps": 20,
            "guidance_scale": 4.0,
        },
        "optimizer": {"learning_rate": LEARNING_RATE},
        "advanced": {"max_grad_norm": None},
    }


def _resolve_model(model: str | None, family: str, out: Path) -> tuple[str, str]:
    """(model path, what it is) for --model / --family."""
    if model not in (None, "tiny"):
        return model, "your model"
    if family not in ("sd1", "sd2"):
        raise ConjureError(f"demo --family {family!r} is not available for textual inversion yet (sd1, sd2)")
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
    from conjure.train.loop import train

    if method not in DEMO_METHODS:
        raise ConjureError(f"demo --method {method!r} is not available yet (available: {', '.join(DEMO_METHODS)})")
    started = time.perf_counter()
    model_path, what = _resolve_model(model, family, out)
    if model in (None, "tiny") and not torch.cuda.is_available():
        # Small models gain nothing from threads, and two threads made tiny runs erratic (0.25-55 s for
        # the same 20 steps) on 2-core machines; one thread is steady.
        torch.set_num_threads(1)
    config = parse_config(
        demo_config(model_path, out, config_type=DEMO_METHODS[method], steps=steps or 300), source="demo config"
    )
    run_root = Path(config.basic.output_dir) / config.basic.run_name
    if run_root.exists():
        import shutil

        shutil.rmtree(run_root)  # the demo's own folder: a re-run starts fresh
    print(f"teaching {what} the token {TOKEN} from {demo_images()}")
    result = train(config)
    seconds = time.perf_counter() - started
    files = [p for p in sorted(result.checkpoints[-1].iterdir()) if p.suffix == ".safetensors"]
    print(f"\ndemo finished in {seconds:.0f} s ({result.step} steps)")
    print(f"  run folder:       {result.run_dir}")
    print(f"  embedding:        {files[0] if files else result.checkpoints[-1]}")
    print(f"  validation grids: {result.run_dir / 'validation'}/step-*/grid.png  (rows: prompts, columns: seeds)")
    print(f"  TensorBoard:      tensorboard --logdir {result.run_dir / 'logs'}")
    print(f"  config to edit:   {result.run_dir / 'config.yaml'}")
    return 0
