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

import numpy as np
import onnx

from dyngate_build.errors import ConfigError, ExportError, check_choice
from dyngate_build.export import export_onnx
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.quantization.core import (calibration_feeds, check_distillation, check_group_size,
                                                         distill_fake_quantized, quiet_ort_quantization)

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
    tables; default) or "matmulnbits" (group-wise weights along the input dimension). kd: distil the quantized model against the FP32 one first,
    layer by layer (hidden-state and logit MSE; off: faster builds).
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


def _single_bias_add(node, consumers: dict, weights: dict):
    """(Add node, 1-D float bias initializer) when `node`'s output is read by exactly one Add with a constant
    1-D bias (a Linear's bias), else None."""
    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = weights.get(other)
    return (add, bias) if bias is not None and len(bias.dims) == 1 else None


def tokenwise_w8a8(fp32, out):
    """Rewrite `fp32` into token-wise W8A8 integer form (ZeroQuant, Yao et al. 2022); save to `out`.

    - Activations, token-wise: for x [..., K] (one row per token) the row scale s_r = max_k |x_rk| / 127
      (float32 [..., 1], ReduceMax over the last axis) and UINT8 codes q = QuantizeLinear(x, s_r, 128) as a
      *blocked* QuantizeLinear (ONNX opset 21, block_size = K along the last axis: one block per row, so one
      fused op does scale, round, shift and saturate). The zero-point tensor (128, shape [..., 1]) is built once
      per distinct leading shape and shared. Each row's scale depends on that row alone: a text's answer does
      not depend on the other texts of its batch. An all-zero row gets s_r = 0: its codes are undefined but its
      output is multiplied by s_r = 0, so it is exactly 0, as in FP32.
    - Weights: every MatMul with a constant [K, N] FP32 weight; INT8, one symmetric scale per output column
      w_n = max_k |W_kn| / 127 (ZeroQuant's group-wise weights at their finest row grouping).
      y = MatMulIntegerToFloat(q, W8, a_scale=1, b_scale=w, a_zero_point=128) · s_r: the integer GEMM and the
      per-column scale in one ONNX Runtime op (com.microsoft; its activation scale is a scalar, so the row scale
      is one Mul after it).
    - MatMuls reading the same activation (attention q/k/v) are fused: one quantization, their weights
      concatenated along N into one MatMulIntegerToFloat, their Linear biases into one Add, then a Split into
      the three original outputs.
    - Embedding tables (Gather on a constant 2-D FP32 table along axis 0) are stored INT8 with one scale per
      row (vocabulary entry): Gather of the codes and of the row scales, Cast, Mul. Weight-only, so answers stay
      batch-invariant; the file shrinks to about int8-dynamic's size.

    Returns `out`; ExportError when the graph has no such MatMul.
    """
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32))
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    leading = {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)[:-1]
               for v in [*inferred.value_info, *inferred.input] if v.type.tensor_type.HasField("shape")}
    weights = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)

    def weight_of(node):
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        return w if w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT else None

    def drop_use(name):
        uses[name] -= 1
        if uses[name] == 0:
            dropped.add(name)

    readers: dict[str, list] = {}  # activation -> the weight MatMuls reading it, in graph order
    for node in graph.node:
        if weight_of(node) is not None:
            readers.setdefault(node.input[0], []).append(node)
    added = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "zq_axes_last"),
             numpy_helper.from_array(np.array(1.0 / 127.0, dtype=np.float32), "zq_inv127"),
             numpy_helper.from_array(np.array(1.0, dtype=np.float32), "zq_one"),
             numpy_helper.from_array(np.array(128, dtype=np.uint8), "zq_zp_a")]
    zero_points: dict = {}  # leading shape of the activation -> shared [..., 1] zero-point tensor
    nodes, dropped, skipped, rewritten = [], set(), set(), 0
    for node in graph.node:
        if id(node) in skipped:
            continue
        if node.op_type == "Gather" and node.input[0] in weights and len(weights[node.input[0]].dims) == 2 \
                and weights[node.input[0]].data_type == TensorProto.FLOAT \
                and all(a.name != "axis" or a.i == 0 for a in node.attribute):
            table, e = numpy_helper.to_array(weights[node.input[0]]).astype(np.float32), f"zq_gather{len(nodes)}"
            row_scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
            row_scale[row_scale == 0] = 1.0
            added += [numpy_helper.from_array(np.clip(np.round(table / row_scale), -127, 127).astype(np.int8), f"{e}_q"),
                      numpy_helper.from_array(row_scale.astype(np.float32), f"{e}_scale")]
            nodes += [helper.make_node("Gather", [f"{e}_q", node.input[1]], [f"{e}_rows"], axis=0),
                      helper.make_node("Gather", [f"{e}_scale", node.input[1]], [f"{e}_row_scales"], axis=0),
                      helper.make_node("Cast", [f"{e}_rows"], [f"{e}_rows_f32"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{e}_rows_f32", f"{e}_row_scales"], list(node.output))]
            drop_use(node.input[0])
            continue
        if weight_of(node) is None:
            nodes.append(node)
            continue
        x, tag = node.input[0], f"zq{rewritten}"
        group = readers[x]  # this MatMul and the later ones reading x (q/k/v): one quantization, one GEMM
        skipped.update(id(m) for m in group)
        a = f"{tag}_act"
        key = leading.get(x)
        key = key if key is not None and all(key) else x  # share only between rows of one known shape
        nodes += [helper.make_node("Abs", [x], [f"{a}_abs"]),
                  helper.make_node("ReduceMax", [f"{a}_abs", "zq_axes_last"], [f"{a}_max"], keepdims=1),
                  helper.make_node("Mul", [f"{a}_max", "zq_inv127"], [f"{a}_scale"])]
        if key not in zero_points:
            zero_points[key] = f"{a}_zp"
            nodes += [helper.make_node("Shape", [f"{a}_scale"], [f"{a}_shape"]),
                      helper.make_node("Expand", ["zq_zp_a", f"{a}_shape"], [f"{a}_zp"])]
        w = np.concatenate([numpy_helper.to_array(weight_of(m)).astype(np.float32) for m in group], axis=1)
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{a}_scale", zero_points[key]], [f"{a}_u8"], axis=-1,
                                      block_size=int(w.shape[0])))
        column_scale = np.abs(w).max(axis=0) / 127.0
        column_scale[column_scale == 0] = 1.0
        added += [numpy_helper.from_array(np.clip(np.round(w / column_scale), -127, 127).astype(np.int8), f"{tag}_w8"),
                  numpy_helper.from_array(column_scale.astype(np.float32), f"{tag}_wscale")]
        nodes += [helper.make_node("MatMulIntegerToFloat", [f"{a}_u8", f"{tag}_w8", "zq_one", f"{tag}_wscale",
                                                            "zq_zp_a"], [f"{tag}_f32"], domain="com.microsoft"),
                  helper.make_node("Mul", [f"{tag}_f32", f"{a}_scale"], [f"{tag}_y"])]
        outputs, y = [m.output[0] for m in group], f"{tag}_y"
        biases = [_single_bias_add(m, consumers, weights) for m in group] if len(group) > 1 else []
        if biases and all(biases):
            added.append(numpy_helper.from_array(np.concatenate(
                [numpy_helper.to_array(b).astype(np.float32) for _, b in biases]), f"{tag}_bias"))
            nodes.append(helper.make_node("Add", [y, f"{tag}_bias"], [f"{tag}_yb"]))
            y, outputs = f"{tag}_yb", [add.output[0] for add, _ in biases]
            for add, b in biases:
                skipped.add(id(add))
                drop_use(b.name)
        if len(group) > 1:
            added.append(numpy_helper.from_array(np.array([weight_of(m).dims[1] for m in group], dtype=np.int64),
                                                 f"{tag}_split"))
            nodes.append(helper.make_node("Split", [y, f"{tag}_split"], outputs, axis=-1))
        else:
            nodes[-1].output[0] = outputs[0]
        for m in group:
            drop_use(m.input[1])
        rewritten += len(group)
    if not rewritten:
        raise ExportError(f"token-wise W8A8: {fp32} has no MatMul with a constant 2-D weight to quantize")
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:  # blocked QuantizeLinear: opset 21 (18 -> 21 changes no op used here)
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


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
        "MatMulNBits", "GatherBlockQuantized", "MatMulIntegerToFloat", "QuantizeLinear", "DynamicQuantizeLinear", "MatMul",
        "Gemm")}})
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
    """ZeroQuant INT8: token-wise activation scales (batch-invariant, unlike int8-dynamic), per-neuron weights."""
    return zeroquant(context, config)


@register("zeroquant-w4a8", W4A8Config, needs_calibration=True, check=check)
def apply_w4a8(context: BuildContext, config: W4A8Config) -> Variant:
    """ZeroQuant group-wise INT4 weights (MatMulNBits), INT8 activations per row and block (batch-invariant)."""
    return zeroquant(context, config)
