"""`fp16`: the FP32 ONNX graph converted to FP16 weights and compute, inputs and outputs kept as clients send.

Conversion by onnxruntime.transformers.float16 with keep_io_types=True (int64 token ids / float32 pixels in,
float32 logits out; Cast nodes at the edges). LayerNormalization stays one op (opset 18), so eps 1e-12 does
not underflow. ONNX Runtime's CPU provider runs it (checked in the build like every variant), but FP16 pays
off on GPUs: the metadata says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyngate_build.errors import ConfigError
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register

# Measured on the trained presets: max |Δlogit| 5e-4 distilbert, 2e-3 vit, 4e-3 deberta; top-1 100%.
TOLERANCE = Tolerance(max_abs_logit=0.03, min_top1_agreement=0.99)


@dataclass(frozen=True)
class Fp16Config:
    """keep_layernorm_fp32: leave LayerNormalization in FP32 (Casts around it) instead of FP16."""

    keep_layernorm_fp32: bool = False

    def __post_init__(self):
        if not isinstance(self.keep_layernorm_fp32, bool):
            raise ConfigError(f"keep_layernorm_fp32={self.keep_layernorm_fp32!r} must be true or false")


@register("fp16", Fp16Config)
def apply(context: BuildContext, config: Fp16Config) -> Variant:
    """FP16 ONNX graph (FP32 inputs/outputs), built and checked on CPU, meant for GPUs."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from dyngate_build.techniques.quantization.core import quiet_ort_quantization

    model = onnx.load(str(context.fp32_onnx()))
    block = list(DEFAULT_OP_BLOCK_LIST) + (["LayerNormalization"] if config.keep_layernorm_fp32 else [])
    with quiet_ort_quantization():
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    out = context.work_dir / "fp16.onnx"
    onnx.save(half, str(out))
    return Variant(
        name="fp16", technique="fp16", params={"keep_layernorm_fp32": config.keep_layernorm_fp32},
        engine="onnxruntime", artifact=out, tolerance=TOLERANCE, native_platform="onnxruntime_onnx",
        runtime={"device": "cuda"},
        notes=["targets GPUs: FP16 weights and compute; on a CPU-only server it is built and checked for "
               "correctness only (ONNX Runtime's CPU kernels gain little or nothing from FP16)"])


@dataclass(frozen=True)
class Fp16TorchScriptConfig:
    """No settings: the model's weights in half precision, traced."""


@register("fp16-torchscript", Fp16TorchScriptConfig)
def apply_torchscript(context: BuildContext, config: Fp16TorchScriptConfig) -> Variant:
    """Half-precision TorchScript (weights and compute FP16, logits returned as FP32), meant for GPUs."""
    import copy

    import torch

    from dyngate_build.errors import ExportError
    from dyngate_build.export import quiet_exporters, example_inputs, logits_module

    source = context.source
    module = logits_module(copy.deepcopy(source.model).half(), source.family)
    inputs = tuple(t.half() if t.is_floating_point() else t for t in example_inputs(source.model, source.family))
    out = context.work_dir / "fp16.pt"
    try:
        with quiet_exporters(), torch.no_grad():
            torch.jit.trace(module, inputs, check_trace=False).save(str(out))
    except Exception as e:
        raise ExportError(f"half-precision TorchScript export failed: {type(e).__name__}: {e}") from e
    return Variant(
        name="fp16-torchscript", technique="fp16-torchscript", params={}, engine="torchscript", artifact=out,
        tolerance=TOLERANCE, native_platform="pytorch_libtorch",
        runtime={"device": "cuda", "input_dtype": "float16"},
        notes=["targets GPUs: FP16 weights and compute; on a CPU-only server torch runs it for the correctness "
               "check only (CPU FP16 kernels are slow)"])
