"""`smoothquant`: SmoothQuant (Xiao et al. 2023), then W8A8 static quantization exactly as `int8-static`.

1. Calibrate: forward hooks on every encoder Linear record per-input-channel max|X| over `samples` training
   inputs (served preprocessing, natural length). Linears fed the same tensor (q/k/v) form one group.
2. Scales per group: s_j = max|X_j|^α / max|W_j|^(1-α) (W: every weight column j of the group).
3. Fold: the group's weights become W·diag(s); the activation becomes X·diag(1/s). Where 1/s can be folded
   without changing the function, that is free; in the post-LN models here (DistilBERT, DeBERTa-v2) the
   LayerNorm output also feeds the residual connection, so folding 1/s into its weight/bias would change the
   residual path. dyngate therefore applies 1/s as one per-channel Mul in front of each smoothed MatMul
   (an elementwise op, cheap next to the MatMul) in every family, and proves the result equal.
4. Prove: the smoothed FP32 model must match the original within relative error 1e-4 on real inputs
   (ExportError otherwise). Record per-group outlier ratio (max/median of channel maxima) before and after.
5. Quantize with `dyngate_build.techniques.int8_static.quantize_static_w8a8` (same calibration inputs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from dyngate_build.errors import ConfigError, ExportError, check_range
from dyngate_build.export import export_onnx
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.quantization.int8_static import check_static_options, pad_id, quantize_static_w8a8
from dyngate_build.techniques.quantization.core import calibration_feeds, quantizable_linears, relative_error

EQUIVALENCE_LIMIT = 1e-4
# Measured on the trained presets (alpha 0.5, minmax, 128 samples): max |Δlogit| 0.035 distilbert, 0.244 vit,
# 0.204 deberta; top-1 agreement 100%, 100%, 99.76%. Tolerance as int8-static's.
TOLERANCE = Tolerance(max_abs_logit=0.6, min_top1_agreement=0.97)


@dataclass(frozen=True)
class SmoothQuantConfig:
    """alpha: migration strength in [0, 1] (0 = no smoothing of activations, 1 = all difficulty to weights).
    samples, method, percentile, per_channel: calibration as in int8-static."""

    alpha: float = 0.5
    samples: int = 128
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ConfigError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        check_range("alpha", float(self.alpha), 0.0, 1.0)
        check_static_options(self.samples, self.method, self.percentile)


class SmoothedLinear(torch.nn.Module):
    """y = Linear(x · inv_scale) with the Linear's weight already multiplied by scale (same function)."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(scale.unsqueeze(0))
        self.register_buffer("inv_scale", (1.0 / scale).contiguous())

    def forward(self, x):
        return self.linear(x * self.inv_scale)


def _torch_inputs(feed: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in feed.items()}


def activation_maxima(model, feeds: list[dict]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per encoder Linear name: max|X| per input channel over `feeds` (every call of it); and the groups of
    Linears sharing an input (each Linear in exactly one group)."""
    maxima: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    hooks = []

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            maxima[name] = m if name not in maxima else torch.maximum(maxima[name], m)
            # group by the first tensor each Linear reads (keep it alive so its id is not reused within the
            # pass). A Linear called again on another tensor (DeBERTa's query/key projections also read the
            # relative position embeddings) stays in its first group only: one Linear, one smoothing scale.
            if first[0] and name not in grouped:
                keep.append(args[0])
                grouped.add(name)
                groups.setdefault(id(args[0]), []).append(name)
        return record

    first = [True]
    keep: list = []
    grouped: set[str] = set()
    for name, linear in quantizable_linears(model):
        hooks.append(linear.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for feed in feeds:
                model(**_torch_inputs(feed))
                first[0] = False
                keep.clear()
    finally:
        for h in hooks:
            h.remove()
    return maxima, list(groups.values())


def outlier_ratio(channel_max: torch.Tensor) -> float:
    """max / median of per-channel activation maxima."""
    median = float(channel_max.median())
    return float(channel_max.max()) / median if median > 0 else float("inf")


def smooth(model, feeds: list[dict], alpha: float):
    """A smoothed copy of `model` and the per-group report. The original model is left unchanged."""
    smoothed = copy.deepcopy(model).eval()
    maxima, groups = activation_maxima(smoothed, feeds)
    modules = dict(smoothed.named_modules())
    report = []
    for group in groups:
        act = maxima[group[0]].float()
        weight_max = torch.stack([modules[n].weight.detach().abs().amax(dim=0) for n in group]).amax(dim=0)
        scale = act.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
        scale = torch.where((act > 0) & (weight_max > 0), scale, torch.ones_like(scale)).clamp(1e-4, 1e4)
        for name in group:
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else smoothed, attr, SmoothedLinear(modules[name], scale))
        report.append({"layers": group, "outlier_ratio_before": round(outlier_ratio(act), 3),
                       "outlier_ratio_after": round(outlier_ratio(act / scale), 3),
                       "scale_min": float(scale.min()), "scale_max": float(scale.max())})
    return smoothed, report


def prove_equivalent(original, smoothed, feeds: list[dict]) -> float:
    """Largest relative logit error of `smoothed` against `original` on `feeds`; ExportError above 1e-4."""
    worst = 0.0
    with torch.no_grad():
        for feed in feeds:
            inputs = _torch_inputs(feed)
            worst = max(worst, relative_error(smoothed(**inputs).logits.numpy(), original(**inputs).logits.numpy()))
    if worst > EQUIVALENCE_LIMIT:
        raise ExportError(f"smoothquant: the smoothed FP32 model differs from the original by relative error "
                          f"{worst:.2e} on {len(feeds)} calibration inputs (allowed ≤{EQUIVALENCE_LIMIT:g}); "
                          f"the smoothing is not function-preserving, nothing was written")
    return worst


@register("smoothquant", SmoothQuantConfig, needs_calibration=True)
def apply(context: BuildContext, config: SmoothQuantConfig) -> Variant:
    """SmoothQuant per-channel smoothing, proven equivalent, then W8A8 static (QDQ) as int8-static."""
    source = context.source
    feeds = calibration_feeds(context, config.samples)
    smoothed, groups = smooth(source.model, feeds, float(config.alpha))
    error = prove_equivalent(source.model, smoothed, feeds[:32])
    fp32 = export_onnx(smoothed, source.family, context.work_dir / "smoothquant-fp32.onnx")
    out = quantize_static_w8a8(fp32, context.work_dir / "smoothquant.onnx", feeds, config.method,
                               config.percentile, config.per_channel, pad_id(source))
    before = [g["outlier_ratio_before"] for g in groups]
    after = [g["outlier_ratio_after"] for g in groups]
    return Variant(
        name="smoothquant", technique="smoothquant",
        params={"alpha": float(config.alpha), "samples": len(feeds), "method": config.method,
                "per_channel": config.per_channel},
        engine="onnxruntime", artifact=out, tolerance=TOLERANCE, native_platform="onnxruntime_onnx",
        report={"equivalence_relative_error": error, "groups": groups,
                "outlier_ratio_before_max": max(before, default=None),
                "outlier_ratio_after_max": max(after, default=None),
                "outlier_ratio_before_mean": float(np.mean(before)) if before else None,
                "outlier_ratio_after_mean": float(np.mean(after)) if after else None},
        notes=["SmoothQuant: 1/s as a per-channel Mul before each smoothed MatMul (post-LN residuals forbid "
               "folding into LayerNorm), s folded into the weights; then W8A8 QDQ static"])
