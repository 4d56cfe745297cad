"""`torchscript`: the baseline TorchScript export (torch.jit.trace of the logits-only module)."""

from __future__ import annotations

from dataclasses import dataclass

from dyngate_build.export import export_torchscript
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register


@dataclass(frozen=True)
class TorchScriptConfig:
    """No settings: an FP32 traced graph, run by libtorch."""


@register("torchscript", TorchScriptConfig)
def apply(context: BuildContext, config: TorchScriptConfig) -> Variant:
    """FP32 TorchScript graph, served by torch."""
    source = context.source
    path = export_torchscript(source.model, source.family, context.work_dir / "torchscript.pt")
    return Variant(
        name="torchscript", technique="torchscript", params={}, engine="torchscript", artifact=path,
        tolerance=Tolerance(max_abs_logit=source.family.fp32_tolerance, min_top1_agreement=0.99),
        native_platform="pytorch_libtorch")
