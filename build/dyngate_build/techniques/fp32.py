"""`fp32`: the baseline ONNX export (torch.onnx dynamo exporter, opset 18, dynamic batch/sequence axes)."""

from __future__ import annotations

from dataclasses import dataclass

from dyngate_build.techniques import BuildContext, Tolerance, Variant, register


@dataclass(frozen=True)
class Fp32Config:
    """No settings: the FP32 graph is the reference every other variant is compared with."""


@register("fp32", Fp32Config)
def apply(context: BuildContext, config: Fp32Config) -> Variant:
    """FP32 ONNX graph, served by ONNX Runtime."""
    family = context.source.family
    return Variant(
        name="fp32", technique="fp32", params={}, engine="onnxruntime", artifact=context.fp32_onnx(),
        tolerance=Tolerance(max_abs_logit=family.fp32_tolerance, min_top1_agreement=0.99),
        native_platform="onnxruntime_onnx")
