"""Safetensors header metadata that apps read: the modelspec keys (Stability's model-spec 1.0.0) and
conjure's own `conjure.*` keys. All values are strings, as the safetensors header requires."""

from __future__ import annotations

import datetime as _dt

from conjure import __version__
from conjure.families import Family

# diffusers' prediction types -> the spec's values (kohya library/sai_model_spec.py PRED_TYPE_EPSILON / PRED_TYPE_V)
SPEC_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v"}


def modelspec(family: Family, kind: str, *, title: str, resolution: int, prediction_type: str,
              variant: str | None = None) -> dict[str, str]:
    """`kind` is the architecture suffix: 'textual-inversion' or 'lora'. `prediction_type` ("epsilon" or
    "v_prediction") is what the run trained the model to predict: the scheduler's, after advanced.prediction_type;
    a flow model's ("flow_matching") has no modelspec value and is left out, as kohya's sai_model_spec.py leaves it
    out for FLUX. `variant`: the family variant the model is (FLUX.1 "dev" or "schnell"), which names the
    architecture."""
    spec_prediction = SPEC_PREDICTION_TYPES.get(prediction_type)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture(kind, prediction_type, variant),
        **({"modelspec.prediction_type": spec_prediction} if spec_prediction else {}),
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


def conjure_keys(**facts: object) -> dict[str, str]:
    """`conjure.<name>` keys; None values are left out."""
    out = {"conjure.version": __version__}
    out.update({f"conjure.{k}": str(v) for k, v in facts.items() if v is not None})
    return out
