"""The normalised form of an inspected file (what `conjure convert` can read any layout through) and the
per-app verdict on it."""

from __future__ import annotations

from dataclasses import dataclass, field

Shape = tuple[int, ...]

# What an app does with tensors it does not apply as meant, from worst to harmless.
REFUSED = "refused"  # the app rejects the whole file
DROPPED = "dropped"  # loaded, but these tensors are left out (a log line at most)
WRONG = "wrong"  # applied, but computed differently from what was trained
IGNORED = "ignored"  # not read, and nothing is lost (e.g. a bundled embedding also saved as its own file)
FAILING = (REFUSED, DROPPED, WRONG)


@dataclass
class Module:
    """One adapted layer of the file.

    name: the prefix its keys share in the file (`lora_unet_..._to_q`, `unet.down_blocks....to_q`).
    parts: role -> key in the file. Roles: `down`, `up`, `mid` (LoRA, whatever the spelling: lora_down/lora_A/
    _lora.down/...), `alpha`, `dora_scale` (input-column DoRA), `magnitude` (PEFT DoRA), the LyCORIS factors as
    named (`hada_w1_a`, ..., `lokr_w1`, ...), `diff` / `diff_b` (full weight differences).
    spelling: how the parts are spelled: "kohya" (.lora_down.weight), "peft" (.lora_A.weight), "attn-procs"
    (_lora.down.weight), "lora-layer" (.lora.down.weight / .lora_linear_layer.down.weight).
    naming: how the module is named: "kohya" (diffusers paths, `.` -> `_`), "kohya-ldm" (SGM/LDM UNet paths),
    "kohya-bfl" (Black Forest Labs' FLUX.1 modules), "lycoris" (SimpleTuner), "onetrainer" (`lora_transformer_`),
    "peft" (`unet.` + dotted path), "attn-procs" (`...attn1.processor.to_q`), "bfl-dotted" (`diffusion_model.`),
    "bare" (a dotted path without a component), "unknown".
    component: the pipeline attribute it adapts ("unet", "transformer", "text_encoder", "text_encoder_2"), None when
    the name is not understood. targets: the diffusers/transformers module paths it adapts (canonical spelling:
    text encoders under `text_model.`); several for a fused layer (FLUX.1 q|k|v), empty when not understood.
    """

    name: str
    parts: dict[str, str]
    shapes: dict[str, Shape]
    spelling: str
    naming: str = "unknown"
    component: str | None = None
    targets: tuple[str, ...] = ()
    alpha: float | None = None

    @property
    def algorithm(self) -> str:
        """"lora", "loha", "lokr" or "full" (the LyCORIS names)."""
        if any(p.startswith("hada_") for p in self.parts):
            return "loha"
        if any(p.startswith("lokr_") for p in self.parts):
            return "lokr"
        if "down" in self.parts or "up" in self.parts:
            return "lora"
        return "full" if any(p.startswith("diff") for p in self.parts) else "unknown"

    @property
    def rank(self) -> int | None:
        for role, dim in (("down", 0), ("hada_w1_b", 0), ("lokr_w1_b", 0), ("lokr_w2_b", 0)):
            if role in self.shapes and self.shapes[role]:
                return self.shapes[role][dim]
        return None

    @property
    def conv_kernel(self) -> Shape | None:
        """The kernel of a conv LoRA's down (LoCon: (3, 3)), None for a linear one."""
        down = self.shapes.get("down", ())
        return down[2:] if len(down) == 4 else None

    @property
    def keys(self) -> list[str]:
        return list(self.parts.values())

    @property
    def out_in(self) -> tuple[int, int] | None:
        """(out, in) of the adapted weight as the LoRA factors give it, None when not a plain LoRA."""
        up, down = self.shapes.get("up"), self.shapes.get("down")
        if not up or not down or len(down) < 2:
            return None
        return up[0], down[1]

    @property
    def dora_orientation(self) -> str | None:
        """How a `dora_scale` is laid out against the LoRA's (out, in): "in" ([1, in], conv [1, in, 1, 1]: kohya /
        LyCORIS), "out" ([out, 1], conv [out, 1, 1, 1]), "flat" (1-D, PEFT's raw [out] magnitude), "bad", or None
        without a dora_scale."""
        shape = self.shapes.get("dora_scale")
        if shape is None:
            return None
        out_in = self.out_in
        if out_in is None:
            return "bad"
        n_out, n_in = out_in
        tail = shape[2:]
        if len(shape) == 1:
            return "flat"
        if len(shape) in (2, 4) and all(d == 1 for d in tail):
            if shape[:2] == (1, n_in):
                return "in"
            if shape[:2] == (n_out, 1):
                return "out"
        return "bad"


@dataclass
class EmbeddingInfo:
    """A textual-inversion embedding: its own file, or bundled in a LoRA (`bundle_emb.<name>.*`)."""

    name: str
    tensors: dict[str, str]  # embedding-file key (emb_params / clip_l / clip_g / ...) -> key in the file
    shapes: dict[str, Shape]
    bundled: bool = False

    @property
    def vectors(self) -> int:
        shape = next(iter(self.shapes.values()), ())
        return shape[0] if len(shape) == 2 else len(shape)  # a 1-D tensor is one vector


@dataclass
class ModelFile:
    """A whole model (inspection/checkpoint.py): its layout (`checkpoint.LAYOUTS`), which pipeline parts it holds,
    what it predicts, its parameter count and size on disk."""

    layout: str
    description: str
    parts: dict[str, bool]  # pipeline component -> present in the file
    prediction: str  # what it predicts and how that is known
    parameters: int
    size: int  # bytes

    @property
    def missing(self) -> list[str]:
        return [p for p, present in self.parts.items() if not present]


@dataclass
class Inspection:
    path: str
    format: str  # "safetensors" or "pickle"
    kind: str  # "LoRA", "DoRA", "LoCon", "LoHa", "LoKr", "embedding", ... ("+ embedding" when bundled), "checkpoint"
    family: str | None
    family_certain: bool
    modules: list[Module]
    embeddings: list[EmbeddingInfo]
    metadata: dict[str, str]
    shapes: dict[str, Shape]
    dtypes: dict[str, str]
    unknown: list[str] = field(default_factory=list)  # keys that are neither module parts nor embeddings
    model: ModelFile | None = None  # a whole model (kind "checkpoint"), not an adapter

    @property
    def is_embedding(self) -> bool:
        return not self.modules and bool(self.embeddings)

    def bundled(self) -> list[EmbeddingInfo]:
        return [e for e in self.embeddings if e.bundled]


@dataclass(frozen=True)
class Finding:
    outcome: str  # REFUSED, DROPPED, WRONG or IGNORED
    reason: str
    keys: tuple[str, ...] = ()


@dataclass
class Verdict:
    app: str
    version: str  # the app version whose loader the rules were read from
    findings: list[Finding]
    applied: int  # tensors the app applies as trained
    summary: str = ""  # a whole model's one line instead of per-tensor findings

    @property
    def complete(self) -> bool:
        return not any(f.outcome in FAILING for f in self.findings)
