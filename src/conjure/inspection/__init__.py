"""`conjure inspect`: what an adapter or embedding file holds and whether each app applies every tensor of it.

- `reader.py`: `inspect_file(path)` opens any LoRA / DoRA / LoCon / LoHa / LoKr / embedding `.safetensors` (and
  A1111 `.pt` embeddings through torch's restricted unpickler) from the header and shapes, without loading the
  weights, into one normalised `Inspection` (`model.py`): its modules, each with its tensors, the file's names
  for them and the module of the diffusers model they adapt (`keys.py` reads the names).
- `checkpoint.py`: a whole model (single-file SD checkpoint, FLUX.1 transformer, diffusers UNet file) is kind
  "checkpoint" with its `ModelFile` facts, and each app gets one line on where it loads it as a main model.
- `apps/`: one module per app (InvokeAI, ComfyUI, AUTOMATIC1111/Forge, diffusers) with that app's loader rules as
  small functions over an `Inspection`, each citing the app's source; `apps.verdicts()` runs them all.
- `weights.py`: `lora_weights(inspection)`: the plain LoRA/DoRA modules of any layout read, as conjure's
  neutral `LoraWeights`, which the kohya/PEFT writers (and `conjure convert`) turn into files apps load.
- `report.py`: the table `conjure inspect` prints and its `--json` form; `command.py`: the subcommand (imports
  nothing heavy, so `conjure --help` stays instant).
"""
