"""`conjure estimate`: a run's peak accelerator memory and peak system RAM, predicted before any weight loads.

The model is read from its configs only (a diffusers folder or hub id through diffusers' and transformers'
`load_config`, as `models/loading.py` reads them; a single file through `basic.base_model_config`, or the
family's reference configs) and built on the meta device, so every figure below marked "counted" is exact:

- weights per component in the dtype the run keeps them in (`setup.resolve_precision`, `WEIGHT_DTYPES`,
  `place_model`: the VAE stays float32 under fp16; `advanced.base_weights_dtype` float8 is 1 byte a Linear weight
  plus a float32 scale per row (torchao's Float8WeightOnlyConfig), nf4 half a byte plus bitsandbytes' double-quantised
  absmax: 1 byte per 64 weights and 4 bytes per 256 of those);
- trained parameters: the method's own recipe (`MethodSpec.build`) is built on the meta modules, so the adapters,
  DoRA magnitudes and token rows are the ones the run trains; each float32, with a float32 gradient;
- optimizer state per trained parameter (`train/optimizers.py`): AdamW 2 float32 moments, 8-bit AdamW 2 bytes,
  Prodigy 2 moments plus its `s` and `p0` copies.

"Modelled" figures: activations are the tensors autograd saves for backward in one forward of the run's batch
at its resolution, traced on the meta device (no memory, exact shapes and dtypes), plus twice the largest of them
for backward's working set; under gradient checkpointing only what autograd keeps outside the checkpointed
blocks plus the largest block recomputed. The VAE's encode of a batch (no_grad, before the denoiser's forward)
is traced the same way for the peak of the tensors it holds at once; the step's peak holds it or the activations,
whichever is larger. "Measured" figures: the Python/torch process baseline.

The entry point is `conjure.estimate.peaks.estimate`; this package imports nothing itself, so that `conjure`
parses its command line (`estimate/command.py`) without torch.
"""
