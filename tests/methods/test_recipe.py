"""Every recipe offers the `Recipe` interface the loop is typed against, with the same parameters (the loop calls
them by keyword), so a recipe that drifts from it fails here and not in the middle of a run."""

import inspect

import pytest

from conjure.methods import Recipe
from conjure.methods.finetune import FullFinetune
from conjure.methods.lora import Lora
from conjure.methods.pivotal import PivotalTuning
from conjure.methods.textual_inversion import TextualInversion

DECLARED = {name: member for name, member in vars(Recipe).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def test_the_interface_is_what_the_loop_calls():
    assert set(DECLARED) == {"trainable_modules", "parameter_groups", "frozen_parameters", "after_step",
                             "validation_weights", "expand_caption", "state_dict", "load_state_dict", "save"}


@pytest.mark.parametrize("recipe", [TextualInversion, Lora, PivotalTuning, FullFinetune])
def test_every_recipe_offers_the_interface(recipe):
    assert isinstance(recipe.kind, str) and recipe.kind
    for name, declared in DECLARED.items():
        offered = inspect.signature(getattr(recipe, name)).parameters
        wanted = inspect.signature(declared).parameters
        for parameter in wanted.values():
            assert parameter.name in offered, f"{recipe.__name__}.{name} has no parameter {parameter.name!r}"
            assert offered[parameter.name].kind == parameter.kind, f"{recipe.__name__}.{name}({parameter.name})"
        extra = [p for n, p in offered.items() if n not in wanted and p.default is inspect.Parameter.empty]
        assert not extra, f"{recipe.__name__}.{name} needs parameters the loop does not pass: {extra}"
