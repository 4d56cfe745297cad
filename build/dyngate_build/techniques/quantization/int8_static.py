"""`int8-static` (W8A8): ONNX Runtime static quantization in QDQ format, calibrated on real training samples.

Activation ranges come from `samples` training-split inputs preprocessed exactly as served (batch 1, natural
length), with the MinMax, Percentile or Entropy calibrator. Weights are INT8 per output channel, activations
INT8 with fixed calibrated scales; the graph holds QuantizeLinear/DequantizeLinear pairs around every MatMul,
which ONNX Runtime fuses into integer kernels when it loads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dyngate_build.errors import ConfigError, check_choice
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.quantization.core import (calibration_feeds, make_reader, pad_to_common_length,
                                                         quiet_ort_quantization)

METHODS = ("minmax", "percentile", "entropy")
MAX_SAMPLES = 1024  # what the build loads into BuildContext.calibration
# Measured on the trained presets (minmax, 128 samples): max |Δlogit| 0.047 distilbert, 0.148 vit, 0.229 deberta;
# top-1 agreement 100%, 100%, 99.76%. Tolerance = 2.5x-10x that margin, and 97%.
TOLERANCE = Tolerance(max_abs_logit=0.6, min_top1_agreement=0.97)


@dataclass(frozen=True)
class Int8StaticConfig:
    """samples: calibration inputs (1..1024). method: "minmax" | "percentile" | "entropy".
    percentile: kept share of the |activation| histogram for method="percentile" (e.g. 99.99).
    per_channel: per-output-channel weight scales."""

    samples: int = 128
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True

    def __post_init__(self):
        check_static_options(self.samples, self.method, self.percentile)
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel={self.per_channel!r} must be true or false")


def check_static_options(samples, method, percentile) -> None:
    """ConfigError for a bad calibration setting (shared with smoothquant)."""
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= MAX_SAMPLES:
        raise ConfigError(f"samples={samples!r} must be an integer in [1, {MAX_SAMPLES}] (calibration inputs)")
    check_choice("method", method, METHODS)
    if not 50.0 <= float(percentile) < 100.0 + 1e-9:
        raise ConfigError(f"percentile={percentile!r} is outside [50, 100]")


def quantize_static_w8a8(fp32: Path, out: Path, feeds: list[dict], method: str = "minmax",
                         percentile: float = 99.999, per_channel: bool = True, pad_id: int = 0) -> Path:
    """QDQ static INT8 quantization of the MatMuls of `fp32` into `out`, calibrated on `feeds`.

    Histogram methods need equal shapes: their feeds are padded to one length with `pad_id` first.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    extra = {"CalibPercentile": float(percentile)} if method == "percentile" else {}
    if method != "minmax":
        feeds = pad_to_common_length(feeds, pad_id)
    with quiet_ort_quantization():
        quantize_static(str(fp32), str(out), make_reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate, extra_options=extra)
    return out


def pad_id(source) -> int:
    """The tokenizer's padding id (0 for image models)."""
    tokenizer = getattr(source, "tokenizer", None)
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


@register("int8-static", Int8StaticConfig, needs_calibration=True)
def apply(context: BuildContext, config: Int8StaticConfig) -> Variant:
    """INT8 static W8A8 (QDQ) of the FP32 ONNX graph, calibrated on training samples."""
    feeds = calibration_feeds(context, config.samples)
    out = quantize_static_w8a8(context.fp32_onnx(), context.work_dir / "int8-static.onnx", feeds, config.method,
                               config.percentile, config.per_channel, pad_id(context.source))
    return Variant(
        name="int8-static", technique="int8-static",
        params={"samples": len(feeds), "method": config.method, "per_channel": config.per_channel,
                **({"percentile": config.percentile} if config.method == "percentile" else {})},
        engine="onnxruntime", artifact=out, tolerance=TOLERANCE, native_platform="onnxruntime_onnx",
        notes=[f"W8A8 QDQ, activation ranges calibrated with {config.method} on {len(feeds)} training inputs"])
