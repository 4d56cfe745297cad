"""`zeroquant-w8a8`, `zeroquant-w4a8` (and `zeroquant` with a `bits` option): ZeroQuant, Yao et al. 2022.

Fine-grained quantization as the paper describes it, group-wise weights and **token-wise** (per-row) dynamic
activation scales, optional layer-by-layer knowledge distillation against the FP32 teacher on unlabeled
training inputs, run with real integer ONNX Runtime kernels (DeepSpeed's compression library, which only
simulated this, is gone from DeepSpeed 0.19). What each variant does that `int8-dynamic` does not:

- `int8-dynamic` (ONNX Runtime `quantize_dynamic`) quantizes each MatMul input with ONE scale per tensor,
  computed on every run over the whole batch: a text's answer depends on the other texts of its request
  (max |Δlogit| 0.009-0.015 measured here for one sentence alone vs inside a 32-text batch).
- 8 bits, kernel `"tokenwise"` (default): one activation scale per token row (s_r = max|x_r|/127, UINT8 codes
  with zero point 128, one blocked QuantizeLinear per activation) and INT8 weights with one scale per output
  neuron, run by MatMulIntegerToFloat (`tokenwise_w8a8`): batch-invariant answers (Δ exactly 0 in the same
  test) and a smaller error against FP32. The attention q/k/v projections share one quantization and one fused
  GEMM; the embedding tables are INT8 with one scale per row (weight-only), so the file is int8-dynamic's size.
  Kernel `"matmulnbits"`: MatMulNBits bits=8 with `group_size` inputs per weight scale
  (accuracy_level=4: activations quantized per row and block inside the kernel), for comparison; it measured
  slower than FP32 on this CPU (DESIGN.md).
- 4 bits: MatMulNBitsQuantizer, block (group) size `group_size` along the input dimension, symmetric,
  `accuracy_level=4` (the kernel quantizes activations to INT8 per row and block at run time: token-wise,
  batch-invariant), MatMul *and* the embedding Gather (GatherBlockQuantized), so the embedding table
  shrinks too.
- The classifier head (Gemm) stays FP32 in every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from dyngate_build.errors import ConfigError, ExportError, check_choice
from dyngate_build.export import export_onnx
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.quantization.core import (calibration_feeds, check_distillation, check_group_size,
                                                         distill_fake_quantized, integer_weight_matmuls,
                                                         quiet_ort_quantization)

BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes: powers of two >= 16
KERNELS = ("tokenwise", "matmulnbits")
# Measured on the trained presets: W8A8 token-wise max |Δlogit| 0.012 distilbert-tiny (SST-2 dev, top-1 100%;
# int8-dynamic 0.051); W8A8 per-tensor dynamic (before token-wise): 0.024 / 0.092 / 0.096, top-1 100%;
# W4A8 group 32: max |Δlogit| 0.059 distilbert, 0.263 vit, 0.601 deberta; top-1 100%, 100%, 99.68%.
TOLERANCES = {8: Tolerance(max_abs_logit=0.3, min_top1_agreement=0.97),
              4: Tolerance(max_abs_logit=1.2, min_top1_agreement=0.95)}


@dataclass(frozen=True)
class ZeroQuantConfig:
    """bits: weight bits, 4 or 8. group_size: inputs per weight scale of the MatMulNBits kernels (power of two
    16..256, must divide every Linear's in_features). kernel: 8-bit kernel, "tokenwise" (token-wise INT8
    activations, one weight scale per output neuron, MatMulIntegerToFloat, q/k/v fused, INT8 embedding
    tables; default) or "matmulnbits" (group-wise weights along the input dimension). kd: distil the
    quantized model against the FP32 one first, layer by layer (hidden-state and logit MSE; off: faster builds).
    kd_steps, kd_learning_rate, kd_samples, kd_batch_size: distillation settings."""

    bits: int = 4
    group_size: int = 32
    kernel: str = "tokenwise"
    kd: bool = False
    kd_steps: int = 200
    kd_learning_rate: float = 5e-5
    kd_samples: int = 512
    kd_batch_size: int = 16

    def __post_init__(self):
        check_choice("bits", self.bits, BITS)
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("kernel", self.kernel, KERNELS)
        check_distillation(self)


@dataclass(frozen=True)
class W8A8Config(ZeroQuantConfig):
    """ZeroQuant with 8-bit weights (bits is fixed at 8)."""

    bits: int = 8

    def __post_init__(self):
        if self.bits != 8:
            raise ConfigError(f"bits={self.bits!r} is not supported by zeroquant-w8a8 (8 only); use "
                              f"zeroquant-w4a8 or technique 'zeroquant' with bits=4")
        super().__post_init__()


@dataclass(frozen=True)
class W4A8Config(ZeroQuantConfig):
    """ZeroQuant with 4-bit weights (bits is fixed at 4)."""

    bits: int = 4

    def __post_init__(self):
        if self.bits != 4:
            raise ConfigError(f"bits={self.bits!r} is not supported by zeroquant-w4a8 (4 only); use "
                              f"zeroquant-w8a8 or technique 'zeroquant' with bits=8")
        super().__post_init__()


def check(source, config: ZeroQuantConfig) -> None:
    """ConfigError when group_size does not divide a Linear layer (or the embedding width) of the model."""
    check_group_size("group_size", config.group_size, source.model)


def quantize_matmul_nbits(fp32, out, bits: int, group_size: int, include_gather: bool = True):
    """MatMulNBits (and 4-bit GatherBlockQuantized) quantization of `fp32` into `out`, accuracy_level=4."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    op_types = ("MatMul", "Gather") if include_gather and bits == 4 else ("MatMul",)
    with quiet_ort_quantization():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=group_size, is_symmetric=True,
                                         accuracy_level=4, op_types_to_quantize=op_types)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), False)
    return out


def tokenwise_w8a8(fp32, out):
    """Token-wise W8A8 (ZeroQuant, Yao et al. 2022) of `fp32` into `out`: `core.integer_weight_matmuls` with
    per-row dynamic activation scales (see there: blocked QuantizeLinear per row, MatMulIntegerToFloat, q/k/v
    fused, INT8 embedding tables). Returns `out`; ExportError when the graph has no weight MatMul."""
    return integer_weight_matmuls(fp32, out)


def zeroquant(context: BuildContext, config: ZeroQuantConfig) -> Variant:
    name = f"zeroquant-w{config.bits}a8"
    source = context.source
    check_group_size("group_size", config.group_size, source.model)
    report: dict = {}
    fp32 = context.fp32_onnx()
    tokenwise = config.bits == 8 and config.kernel == "tokenwise"
    if config.kd:
        batches = calibration_feeds(context, config.kd_samples, batch_size=config.kd_batch_size)
        student, result = distill_fake_quantized(source.model, batches, config.bits,
                                                 None if tokenwise else config.group_size, config.kd_steps,
                                                 config.kd_learning_rate)
        fp32 = export_onnx(student, source.family, context.work_dir / f"{name}-kd-fp32.onnx")
        report["kd"] = {"steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
                        "final_loss": result.final_loss, "seconds": round(result.seconds, 1)}
    out = context.work_dir / f"{name}.onnx"
    if tokenwise:
        tokenwise_w8a8(fp32, out)
        kernel = ("MatMulIntegerToFloat, token-wise (per-row) dynamic UINT8 activation scales, INT8 weights with "
                  "one scale per output neuron, q/k/v fused, INT8 embedding tables with one scale per row")
    else:
        quantize_matmul_nbits(fp32, out, config.bits, config.group_size)
        kernel = (f"MatMulNBits bits={config.bits} block={config.group_size} accuracy_level=4"
                  + (" + GatherBlockQuantized 4-bit embeddings" if config.bits == 4 else ""))
    from dyngate_build.techniques.quantization.core import op_counts

    counts = op_counts(out)
    if counts.get("MatMulNBits", 0) + counts.get("MatMulIntegerToFloat", 0) == 0:
        raise ExportError(f"{name}: no MatMul was quantized ({dict(counts)}); the graph has no quantizable MatMul")
    report.update({"kernel": kernel, "quantized_ops": {k: v for k, v in counts.items() if k in (
        "MatMulNBits", "GatherBlockQuantized", "MatMulIntegerToFloat", "QuantizeLinear", "DynamicQuantizeLinear",
        "MatMul", "Gemm")}})
    params = {"bits": config.bits, "group_size": config.group_size, "kernel": config.kernel, "kd": config.kd}
    if config.kd:
        params.update(kd_steps=config.kd_steps, kd_learning_rate=config.kd_learning_rate)
    return Variant(
        name=name, technique=name, params=params, engine="onnxruntime", artifact=out,
        tolerance=TOLERANCES[config.bits], native_platform="onnxruntime_onnx", report=report,
        notes=[f"ZeroQuant W{config.bits}A8: {kernel}; classifier head (Gemm) FP32",
               *(["knowledge distillation against the FP32 model on unlabeled training inputs"] if config.kd else [])])


@register("zeroquant-w8a8", W8A8Config, needs_calibration=True, check=check)
def apply_w8a8(context: BuildContext, config: W8A8Config) -> Variant:
    """ZeroQuant INT8: per-token activation scales (answers batch-invariant), per-neuron weights, INT8 embeddings."""
    return zeroquant(context, config)


@register("zeroquant-w4a8", W4A8Config, needs_calibration=True, check=check)
def apply_w4a8(context: BuildContext, config: W4A8Config) -> Variant:
    """ZeroQuant group-wise INT4 weights (MatMulNBits), INT8 activations per row and block (batch-invariant)."""
    return zeroquant(context, config)
