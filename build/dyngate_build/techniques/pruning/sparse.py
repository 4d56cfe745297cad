"""`sparse`: global unstructured magnitude pruning (torch.nn.utils.prune, L1) of every Linear weight.

Shapes stay; the zeros only pay off in compressed size (reported: gzip -9 of the ONNX file next to the FP32
export's). ONNX Runtime's CPU kernels are dense, so no speed-up is claimed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from dyngate_build.techniques import BuildContext, Tolerance, Variant, register


@dataclass(frozen=True)
class SparseConfig:
    """sparsity: share of Linear weights set to zero, globally by magnitude, in [0, 1)."""

    sparsity: float = 0.5

    def __post_init__(self):
        from dyngate_build.techniques.pruning.core import check_ratio

        check_ratio("sparsity", self.sparsity)


@register("sparse", SparseConfig)
def apply(context: BuildContext, config: SparseConfig) -> Variant:
    """Global unstructured magnitude pruning; dense kernels, so smaller only when compressed."""
    from dyngate_build.export import export_onnx
    from dyngate_build.techniques.pruning.core import gzip_size, sparsify

    source = context.source
    model = copy.deepcopy(source.model).float().eval()
    measured = sparsify(model, config.sparsity)
    path = export_onnx(model, source.family, context.work_dir / "sparse.onnx")
    fp32 = context.fp32_onnx()
    report = {**measured, "method": "torch.nn.utils.prune.global_unstructured L1 over Linear weights",
              "onnx_bytes": path.stat().st_size, "gzip_bytes": gzip_size(path),
              "fp32_onnx_bytes": fp32.stat().st_size, "fp32_gzip_bytes": gzip_size(fp32),
              "speed": "no claim: ONNX Runtime runs these weights with dense kernels"}
    report["gzip_ratio_vs_fp32"] = round(report["gzip_bytes"] / report["fp32_gzip_bytes"], 4)
    return Variant(
        name="sparse", technique="sparse", params={"sparsity": config.sparsity}, engine="onnxruntime",
        artifact=path, native_platform="onnxruntime_onnx",
        tolerance=Tolerance(max_abs_logit=1e3, min_top1_agreement=0.5), report=report,
        notes=[f"{measured['linear_sparsity']:.0%} of Linear weights are zero; compressed size in "
               f"technique_report; no speed claim (dense kernels)"])
