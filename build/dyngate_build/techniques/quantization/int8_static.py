"""`int8-static` (W8A8): ONNX Runtime static quantization in QDQ format, calibrated on real training samples.

Activation ranges come from `samples` training-split inputs preprocessed exactly as served (batch 1, natural
length), with the MinMax, Percentile or Entropy calibrator. The configuration is the fastest accurate one
measured on an AVX-512 VNNI CPU with ONNX Runtime 1.32 (README, "INT8 on this CPU"):
- activations UINT8 (asymmetric, fixed calibrated scale and zero point), weights INT8 per output channel
  (U8S8: the VNNI u8·s8 dot product; INT8 activations (S8S8) left the graph 8.8x slower than dynamic);
- only MatMuls with a constant weight are quantized (the attention score MatMuls stay FP32, as in
  `quantize_dynamic`), and their outputs are not re-quantized: ONNX Runtime fuses each
  QuantizeLinear -> DequantizeLinear -> MatMul into one MatMulIntegerToFloat (integer GEMM, float output),
  the q/k/v projections sharing one QuantizeLinear. So the served graph is dynamic quantization's minus its
  per-run activation statistics (DynamicQuantizeLinear).
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


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes of the ONNX graph at `path` whose second input is a constant (a weight)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def quantize_static_w8a8(fp32: Path, out: Path, feeds: list[dict], method: str = "minmax",
                         percentile: float = 99.999, per_channel: bool = True, pad_id: int = 0) -> Path:
    """QDQ static W8A8 (UINT8 activations, INT8 weights) of the weight MatMuls of `fp32` into `out`,
    calibrated on `feeds` (graph inputs, numpy). MatMul outputs stay float (see the module docstring).

    Histogram methods need equal shapes: their feeds are padded to one length with `pad_id` first.
    Library: onnxruntime.quantization.quantize_static.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    extra = {"CalibPercentile": float(percentile)} if method == "percentile" else {}
    if method != "minmax":
        feeds = pad_to_common_length(feeds, pad_id)
    with quiet_ort_quantization():
        quantize_static(str(fp32), str(out), make_reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls(fp32),
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibrate,
                        extra_options={**extra, "OpTypesToExcludeOutputQuantization": ["MatMul"]})
    return out


def pad_id(source) -> int:
    """The tokenizer's padding id (0 for image models)."""
    tokenizer = getattr(source, "tokenizer", None)
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


@register("int8-static", Int8StaticConfig, needs_calibration=True)
def apply(context: BuildContext, config: Int8StaticConfig) -> Variant:
    """INT8 static W8A8 (U8S8 QDQ, calibrated fixed scales: no run-time activation statistics)."""
    feeds = calibration_feeds(context, config.samples)
    out = quantize_static_w8a8(context.fp32_onnx(), context.work_dir / "int8-static.onnx", feeds, config.method,
                               config.percentile, config.per_channel, pad_id(context.source))
    return Variant(
        name="int8-static", technique="int8-static",
        params={"samples": len(feeds), "method": config.method, "per_channel": config.per_channel,
                **({"percentile": config.percentile} if config.method == "percentile" else {})},
        engine="onnxruntime", artifact=out, tolerance=TOLERANCE, native_platform="onnxruntime_onnx",
        notes=[f"W8A8 QDQ (UINT8 activations, INT8 weights, weight MatMuls; run as MatMulIntegerToFloat), "
               f"activation ranges calibrated with {config.method} on {len(feeds)} training inputs"])
