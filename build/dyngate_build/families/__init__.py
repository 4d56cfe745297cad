"""The model-family registry: one small module per supported Hugging Face `model_type`, in one flat table.

A family fixes the task, the HF class, the ONNX input names with their dynamic axes, what a Triton client
sends (raw UTF-8 text or encoded image bytes), the tolerance an exported FP32 graph must meet against the
PyTorch reference, and everything techniques need to know about its layout: the early-exit cut (embeddings,
layers, head as segments), the structured-pruning attribute paths (`LayerParts`) and the classifier modules
quantization keeps in FP32. Shape follows Optimum's per-architecture export configs.

Adding a family is one module here (calling `register`) named in FAMILY_MODULES, plus one case in
tests/test_families.py (a test fails when a registered family has none). The family modules import torch;
they are loaded on the first lookup so importing the task names stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from dyngate_build.errors import SourceError

TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
TOKEN_CLASSIFICATION = "token-classification"

# Modules that register a family; imported on the first lookup.
FAMILY_MODULES = ("distilbert", "vit", "deberta")

TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


@dataclass(frozen=True)
class LayerParts:
    """Attribute paths inside one transformer layer of a family (structured pruning).

    attention: module holding the head count; query/key/value/out: the attention projections (nn.Linear);
    heads_attr / head_size_attr / all_head_attr: the attention module's bookkeeping attributes (all_head_attr
    None when the family keeps none); ffn_in / ffn_out: the feed-forward linears.
    """

    attention: str
    query: str
    key: str
    value: str
    out: str
    heads_attr: str
    head_size_attr: str
    all_head_attr: str | None
    ffn_in: str
    ffn_out: str


@dataclass(frozen=True)
class FamilySpec:
    """How one HF architecture is exported, served and taken apart by techniques.

    Attributes:
        model_type: HF `config.model_type` ("distilbert", "vit", "deberta-v2").
        task: one of TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TOKEN_CLASSIFICATION.
        hf_class: name of the `transformers` class that loads the checkpoint.
        onnx_inputs: input names of the exported graph, in forward() order.
        dynamic_axes: per input/output name, axis index -> axis name ("batch" | "sequence"); the exporters
            make exactly these axes dynamic.
        client_input: Triton input a client fills: "TEXT" (UTF-8 BYTES) or "IMAGE" (encoded image BYTES).
        fp32_tolerance: largest max |Δlogit| an FP32 export may show against PyTorch.
        head_modules: names of the classifier modules (path parts) that stay FP32 under quantization.
        early_exit_cut: `cut(model) -> dict` of `Segments` fields (embed, layers, head, ...; see
            dyngate_build.techniques.early_exit.segments), or None when early exit cannot cut the family.
        early_exit_check: `check(model)` raising ConfigError for checkpoints of the family the cut does not
            reproduce, or None.
        pruning_layers: (path of the layer list, LayerParts) for structured pruning, or None when unsupported.
        pruning_note: why structured pruning is unsupported (shown in the error), when it is.
    """

    model_type: str
    task: str
    hf_class: str
    onnx_inputs: tuple[str, ...]
    dynamic_axes: dict
    client_input: str
    fp32_tolerance: float = 1e-3
    head_modules: tuple[str, ...] = ("classifier",)
    early_exit_cut: Callable | None = None
    early_exit_check: Callable | None = None
    pruning_layers: tuple[str, LayerParts] | None = None
    pruning_note: str = ""

    @property
    def is_text(self) -> bool:
        return self.client_input == "TEXT"


FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add `spec` to FAMILIES; a repeated model_type is a programming error and raises."""
    if spec.model_type in FAMILIES:
        raise ValueError(f"family {spec.model_type!r} is registered twice")
    FAMILIES[spec.model_type] = spec
    return spec


def _load_all() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(f"dyngate_build.families.{module}")


def registered_families() -> dict[str, FamilySpec]:
    """Every registered family, model_type -> spec (loads the family modules)."""
    _load_all()
    return dict(FAMILIES)


def family_for(model_type: str) -> FamilySpec:
    """Return the spec of `model_type`; raises SourceError listing the supported types."""
    _load_all()
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise SourceError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}") from None
