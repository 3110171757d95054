"""Model tools that work on whole models and LoRA files: `conjure lora bake|extract|combine` (tools/cli.py)."""
