"""One small spec per supported Hugging Face `model_type`, in one flat table.

A family fixes the task, the HF class, the ONNX input names with their dynamic axes, what a Triton client
sends (raw UTF-8 text or encoded image bytes) and the tolerance an exported FP32 graph must meet against
the PyTorch reference. Shape follows Optimum's per-architecture export configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyngate_build.errors import SourceError

TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
TOKEN_CLASSIFICATION = "token-classification"


@dataclass(frozen=True)
class FamilySpec:
    """How one HF architecture is exported and served.

    Attributes:
        model_type: HF `config.model_type` ("distilbert", "vit", "deberta-v2").
        task: one of TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, TOKEN_CLASSIFICATION.
        hf_class: name of the `transformers` class that loads the checkpoint.
        onnx_inputs: input names of the exported graph, in forward() order.
        dynamic_axes: per input/output name, axis index -> axis name (batch, sequence).
        client_input: Triton input a client fills: "TEXT" (UTF-8 BYTES) or "IMAGE" (encoded image BYTES).
        fp32_tolerance: largest max |Δlogit| an FP32 export may show against PyTorch.
    """

    model_type: str
    task: str
    hf_class: str
    onnx_inputs: tuple[str, ...]
    dynamic_axes: dict
    client_input: str
    fp32_tolerance: float = 1e-3

    @property
    def is_text(self) -> bool:
        return self.client_input == "TEXT"


_TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}

FAMILIES: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add `spec` to FAMILIES; a repeated model_type is a programming error and raises."""
    if spec.model_type in FAMILIES:
        raise ValueError(f"family {spec.model_type!r} is registered twice")
    FAMILIES[spec.model_type] = spec
    return spec


register(FamilySpec(
    model_type="distilbert", task=TEXT_CLASSIFICATION, hf_class="DistilBertForSequenceClassification",
    onnx_inputs=("input_ids", "attention_mask"),
    dynamic_axes={**_TEXT_AXES, "logits": {0: "batch"}}, client_input="TEXT"))
register(FamilySpec(
    model_type="vit", task=IMAGE_CLASSIFICATION, hf_class="ViTForImageClassification",
    onnx_inputs=("pixel_values",),
    dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, client_input="IMAGE"))
register(FamilySpec(
    model_type="deberta-v2", task=TOKEN_CLASSIFICATION, hf_class="DebertaV2ForTokenClassification",
    onnx_inputs=("input_ids", "attention_mask"),
    dynamic_axes={**_TEXT_AXES, "logits": {0: "batch", 1: "sequence"}}, client_input="TEXT"))


def family_for(model_type: str) -> FamilySpec:
    """Return the spec of `model_type`; raises SourceError listing the supported types."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise SourceError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}") from None
