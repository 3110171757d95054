"""Every file conjure writes, inspected: which apps apply every tensor (issue 17: "every file conjure writes passes
its own inspect for all four apps"). Full-size module paths and shapes (meta-device reference models), rank 1.

Where an app cannot load a layout conjure offers, the test pins the app's own limit (read from its loader,
docs/app-loaders.md) so a change in either shows: diffusers drops every kohya `dora_scale` and refuses a file with
`bundle_emb` keys; the PEFT layout is diffusers' own (README: "loads in diffusers only")."""

from __future__ import annotations

import pytest

from conjure.inspection.reader import inspect_file
from conjure.inspection.apps import verdicts
from conjure.inspection.model import DROPPED, REFUSED

APPS = ("InvokeAI", "ComfyUI", "AUTOMATIC1111/Forge", "diffusers")


def incomplete(path) -> dict[str, set[str]]:
    """app -> the outcomes of its failing findings (empty: every tensor applied)."""
    insp = inspect_file(path)
    return {v.app: {f.outcome for f in v.findings if f.outcome != "ignored"} for v in verdicts(insp)}


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_kohya_lora_loads_completely_in_every_app(conjure_files, family):
    path = conjure_files("lora", family)
    insp = inspect_file(path)
    assert insp.kind == ("LoCon" if family != "flux" else "LoRA") and insp.family == family and insp.family_certain
    assert all(m.component and m.targets for m in insp.modules)
    assert {m.rank for m in insp.modules} <= {1, 3, 4} and all(m.alpha for m in insp.modules)
    assert incomplete(path) == {app: set() for app in APPS}


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_kohya_dora_loads_in_the_apps_and_diffusers_drops_its_scales(conjure_files, family):
    path = conjure_files("dora", family)
    assert inspect_file(path).kind == "DoRA"
    got = incomplete(path)
    assert {app: got[app] for app in APPS[:3]} == {app: set() for app in APPS[:3]}
    assert got["diffusers"] == {DROPPED}  # lora_state_dict filters every dora_scale (diffusers 0.42)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embeddings_and_pivotal_bundles(conjure_files, family):
    ti = conjure_files("ti", family)
    insp = inspect_file(ti)
    assert insp.kind == "embedding" and insp.family == family and insp.family_certain
    assert incomplete(ti) == {app: set() for app in APPS}
    bundle = conjure_files("pivotal", family)
    insp = inspect_file(bundle)
    assert insp.kind.endswith("+ embedding") and [e.name for e in insp.bundled()] == ["zq"]
    got = incomplete(bundle)
    assert {app: got[app] for app in APPS[:3]} == {app: set() for app in APPS[:3]}
    assert got["diffusers"] == {REFUSED}  # load_lora_weights: "Invalid LoRA checkpoint" (bundle_emb has no 'lora')


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
@pytest.mark.parametrize("kind", ["peft-lora", "peft-dora"])
def test_peft_files_load_completely_in_diffusers(conjure_files, family, kind):
    path = conjure_files(kind, family)
    insp = inspect_file(path)
    assert insp.kind == ("DoRA" if kind == "peft-dora" else "LoCon" if family != "flux" else "LoRA")
    assert all(m.alpha == 2.0 for m in insp.modules)  # from diffusers' adapter config in the header
    got = incomplete(path)
    assert got["diffusers"] == set()
    if family != "flux":  # the PEFT layout is diffusers' own for SD (FORMATS.md)
        assert got["InvokeAI"] == {REFUSED} and DROPPED in got["ComfyUI"] and DROPPED in got["AUTOMATIC1111/Forge"]
