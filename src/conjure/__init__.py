"""conjure: teach Stable Diffusion models new things (embeddings, LoRA/DoRA, pivotal tuning)."""

__version__ = "0.1.0"
