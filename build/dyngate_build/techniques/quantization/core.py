"""Helpers shared by the quantization techniques (int8-*, smoothquant, zeroquant, xtc).

Everything here runs ONNX Runtime's own quantization tooling; nothing simulates a kernel.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

import numpy as np

from dyngate_build.errors import ConfigError, ExportError


def check_distillation(config) -> None:
    """ConfigError unless the knowledge-distillation fields of a ZeroQuant/XTC config are valid: `kd` a bool,
    `kd_steps`, `kd_samples`, `kd_batch_size` integers >= 1, `kd_learning_rate` in (0, 1]."""
    if not isinstance(config.kd, bool):
        raise ConfigError(f"kd={config.kd!r} must be true or false")
    for name in ("kd_steps", "kd_samples", "kd_batch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    rate = config.kd_learning_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1:
        raise ConfigError(f"kd_learning_rate={rate!r} is outside (0, 1]")


def calibration_feeds(context, samples: int, batch_size: int = 1) -> list[dict]:
    """`samples` calibration examples in batches of `batch_size`, as served; ConfigError when there are none."""
    if not context.calibration:
        raise ConfigError("calibration data is missing or empty: this technique calibrates on training-split "
                          "examples; check --data (the training split must hold at least one example)")
    feeds = context.calibration_feeds(samples, batch_size=batch_size)
    if not feeds:
        raise ConfigError("calibration data is empty after preprocessing; check --data")
    return feeds


def pad_to_common_length(feeds: list[dict], pad_id: int = 0) -> list[dict]:
    """Text feeds padded (input_ids with `pad_id`, attention_mask with 0) to the longest sequence of all.

    ONNX Runtime's histogram calibrators (percentile, entropy) stack every run's activations, so all runs
    must have one shape; MinMax needs no padding. Padded positions are masked in attention but their hidden
    states enter the histograms too (a small bias towards pad-token activations).
    """
    if not feeds or "input_ids" not in feeds[0]:
        return feeds
    longest = max(f["input_ids"].shape[1] for f in feeds)
    padded = []
    for f in feeds:
        extra = longest - f["input_ids"].shape[1]
        padded.append({k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
                       for k, v in f.items()})
    return padded


def make_reader(feeds: list[dict]):
    """An onnxruntime CalibrationDataReader yielding `feeds` once, in order."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self, batches):
            self._batches = list(batches)
            self._it = iter(self._batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self._batches)

    return _Reader(feeds)


def op_counts(path: str | Path) -> collections.Counter:
    """Operator type -> number of nodes in the ONNX graph at `path` (main graph only)."""
    import onnx

    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@contextlib.contextmanager
def quiet_ort_quantization():
    """Silence onnxruntime.quantization's root-logger warnings ("consider pre-processing", opset notes)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def linear_in_features(model) -> dict[str, int]:
    """name -> in_features of every torch.nn.Linear in `model` (what a group size must divide)."""
    import torch

    return {name: module.in_features for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_group_size(field: str, group_size: int, model) -> None:
    """ConfigError naming the first Linear layer whose in_features `group_size` does not divide."""
    bad = {name: k for name, k in linear_in_features(model).items() if k % group_size}
    if bad:
        name, k = next(iter(bad.items()))
        widths = linear_in_features(model).values()
        divisors = sorted({g for g in (16, 32, 64, 128, 256) if all(v % g == 0 for v in widths)})
        raise ConfigError(f"{field}={group_size} does not divide layer {name!r} (in_features={k}) "
                          f"nor {len(bad) - 1} other layer(s); group sizes dividing every layer of this model: "
                          f"{', '.join(map(str, divisors)) or 'none'}")


def relative_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """max|candidate - reference| / max|reference| (0 when both are 0)."""
    scale = float(np.abs(reference).max())
    diff = float(np.abs(candidate - reference).max())
    return diff / scale if scale else diff


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


def integer_weight_matmuls(fp32, out, activation_quantization: dict | None = None, per_channel: bool = True,
                           tables: bool = True):
    """Rewrite every weight MatMul of `fp32` into integer form (INT8 weights, UINT8 activations); save to `out`.

    Activations, `activation_quantization` None: **token-wise** (ZeroQuant, Yao et al. 2022). For x [..., K]
    (one row per token) the row scale s_r = max_k |x_rk| / 127 (float32 [..., 1], ReduceMax over the last axis)
    and UINT8 codes q = QuantizeLinear(x, s_r, 128) as a *blocked* QuantizeLinear (ONNX opset 21, block_size = K
    along the last axis: one block per row, so one fused op does scale, round, shift and saturate). The
    zero-point tensor (128, shape [..., 1]) is built once per distinct leading shape and shared. Each row's scale
    depends on that row alone: a text's answer does not depend on the other texts of its batch. An all-zero
    row gets s_r = 0: its codes are undefined but its output is multiplied by s_r = 0, so it is exactly 0.
    y = MatMulIntegerToFloat(q, W8, a_scale=1, b_scale=w, a_zero_point=128) · s_r (+ bias).
    Activations, `activation_quantization` {activation name: (scale, zero point)}: **static** per-tensor
    (calibrated, int8-static / smoothquant): q = QuantizeLinear(x, scale, zp) with constants and
    y = MatMulIntegerToFloat(q, W8, scale, w, zp, bias): one quantize and one integer GEMM with the scales and
    the Linear's bias folded in. ExportError when an activation has no entry.

    Weights: every MatMul with a constant [K, N] FP32 weight; INT8, one symmetric scale per output column
    w_n = max_k |W_kn| / 127 (`per_channel`; else one scale per weight). MatMuls reading the same activation
    (attention q/k/v) are fused: one quantization, their weights concatenated along N into one
    MatMulIntegerToFloat (com.microsoft), their Linear biases into one bias, then a Split into the original
    outputs. With `tables`, embedding tables (Gather on a constant 2-D FP32 table along axis 0) are stored INT8
    with one scale per row (weight-only: Gather of the codes and of the row scales, Cast, Mul), so the file is
    about int8-dynamic's size.

    Returns `out`; ExportError when the graph has no such MatMul. Library: ONNX Runtime kernels (no simulation).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    static = activation_quantization is not None
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
    added = [] if static else [numpy_helper.from_array(np.array([-1], dtype=np.int64), "zq_axes_last"),
                               numpy_helper.from_array(np.array(1.0 / 127.0, dtype=np.float32), "zq_inv127"),
                               numpy_helper.from_array(np.array(1.0, dtype=np.float32), "zq_one"),
                               numpy_helper.from_array(np.array(128, dtype=np.uint8), "zq_zp_a")]
    zero_points: dict = {}  # leading shape of the activation -> shared [..., 1] zero-point tensor
    nodes, dropped, skipped, rewritten = [], set(), set(), 0
    for node in graph.node:
        if id(node) in skipped:
            continue
        if tables and node.op_type == "Gather" and node.input[0] in weights and len(weights[node.input[0]].dims) == 2 \
                and weights[node.input[0]].data_type == TensorProto.FLOAT \
                and all(a.name != "axis" or a.i == 0 for a in node.attribute):
            table, e = numpy_helper.to_array(weights[node.input[0]]).astype(np.float32), f"zq_gather{len(nodes)}"
            row_scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
            row_scale[row_scale == 0] = 1.0
            codes = np.clip(np.round(table / row_scale), -127, 127).astype(np.int8)
            added += [numpy_helper.from_array(codes, f"{e}_q"),
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
        w = np.concatenate([numpy_helper.to_array(weight_of(m)).astype(np.float32) for m in group], axis=1)
        column_scale = np.abs(w).max(axis=0) / 127.0
        if not per_channel:  # one scale per Linear, repeated over its columns
            starts = np.cumsum([0] + [weight_of(m).dims[1] for m in group])
            for lo, hi in zip(starts[:-1], starts[1:]):
                column_scale[lo:hi] = column_scale[lo:hi].max()
        column_scale[column_scale == 0] = 1.0
        added += [numpy_helper.from_array(np.clip(np.round(w / column_scale), -127, 127).astype(np.int8), f"{tag}_w8"),
                  numpy_helper.from_array(column_scale.astype(np.float32), f"{tag}_wscale")]
        biases = [_single_bias_add(m, consumers, weights) for m in group]
        bias = None
        if all(biases) and (static or len(group) > 1):  # static: into the GEMM; token-wise: one Add after it
            bias = f"{tag}_bias"
            added.append(numpy_helper.from_array(np.concatenate(
                [numpy_helper.to_array(b).astype(np.float32) for _, b in biases]), bias))
            for add, b in biases:
                skipped.add(id(add))
                drop_use(b.name)
        outputs = [add.output[0] for add, _ in biases] if bias else [m.output[0] for m in group]
        if static:
            if x not in activation_quantization:
                raise ExportError(f"static W8A8: no calibrated range for activation {x!r} of MatMul {node.name!r}")
            scale, zero_point = activation_quantization[x]
            added += [numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{a}_scale"),
                      numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), f"{a}_zp")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"{a}_scale", f"{a}_zp"], [f"{a}_u8"]),
                      helper.make_node("MatMulIntegerToFloat", [f"{a}_u8", f"{tag}_w8", f"{a}_scale", f"{tag}_wscale",
                                                                f"{a}_zp", *(["", bias] if bias else [])],
                                       [f"{tag}_y"], domain="com.microsoft")]
        else:
            key = leading.get(x)
            key = key if key is not None and all(key) else x  # share only between rows of one known shape
            nodes += [helper.make_node("Abs", [x], [f"{a}_abs"]),
                      helper.make_node("ReduceMax", [f"{a}_abs", "zq_axes_last"], [f"{a}_max"], keepdims=1),
                      helper.make_node("Mul", [f"{a}_max", "zq_inv127"], [f"{a}_scale"])]
            if key not in zero_points:
                zero_points[key] = f"{a}_zp"
                nodes += [helper.make_node("Shape", [f"{a}_scale"], [f"{a}_shape"]),
                          helper.make_node("Expand", ["zq_zp_a", f"{a}_shape"], [f"{a}_zp"])]
            nodes += [helper.make_node("QuantizeLinear", [x, f"{a}_scale", zero_points[key]], [f"{a}_u8"], axis=-1,
                                       block_size=int(w.shape[0])),
                      helper.make_node("MatMulIntegerToFloat", [f"{a}_u8", f"{tag}_w8", "zq_one", f"{tag}_wscale",
                                                                "zq_zp_a"], [f"{tag}_f32"], domain="com.microsoft"),
                      helper.make_node("Mul", [f"{tag}_f32", f"{a}_scale"], [f"{tag}_rows"])]
            if bias:
                nodes.append(helper.make_node("Add", [f"{tag}_rows", bias], [f"{tag}_y"]))
            else:
                nodes[-1].output[0] = f"{tag}_y"
        y = f"{tag}_y"
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
        raise ExportError(f"W8A8: {fp32} has no MatMul with a constant 2-D weight to quantize")
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


# ---------------------------------------------------------------------------------------------- fake quantization + KD

def quantize_groups(weight, bits: int | str, group_size: int | None):
    """Symmetric group-wise quantization of a [out, in] weight along `in`: returns (codes int8, scales).

    group_size: inputs per scale; None = one scale per output row (per-channel). scales: [out, in/group].

    bits 8/4: absmax scale per group of `group_size` inputs, codes in [-(2^(b-1)-1), 2^(b-1)-1].
    bits "ternary": codes in {-1, 0, 1}, scale = mean |w| of the group's weights above 0.7·mean|w| (TWN).
    bits "binary": codes in {-1, 1}, scale = mean |w| of the group.
    """
    import torch

    out_features, in_features = weight.shape
    group_size = group_size or in_features
    w = weight.reshape(out_features, in_features // group_size, group_size)
    if bits == "ternary":
        delta = 0.7 * w.abs().mean(dim=-1, keepdim=True)
        mask = (w.abs() > delta).to(w.dtype)
        scale = (w.abs() * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        codes = torch.sign(w) * mask
    elif bits == "binary":
        scale = w.abs().mean(dim=-1, keepdim=True)
        codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    else:
        qmax = 2 ** (int(bits) - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
        codes = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return codes.reshape(out_features, in_features).to(torch.int8), scale.squeeze(-1)


def dequantize_groups(codes, scales, group_size: int | None):
    """Inverse of `quantize_groups`: [out, in] float weight."""
    out_features, in_features = codes.shape
    group_size = group_size or in_features
    w = codes.float().reshape(out_features, in_features // group_size, group_size) * scales.unsqueeze(-1)
    return w.reshape(out_features, in_features)


class FakeQuant:
    """torch parametrization: weight -> dequantize(quantize(weight)) with a straight-through gradient."""

    def __new__(cls, bits, group_size):
        import torch

        class _FakeQuant(torch.nn.Module):
            def forward(self, weight):
                codes, scales = quantize_groups(weight.detach(), bits, group_size)
                q = dequantize_groups(codes, scales, group_size).to(weight.dtype)
                return weight + (q - weight).detach()

        return _FakeQuant()


def quantizable_linears(model) -> list:
    """(name, Linear) of the encoder's Linear layers; the family's classifier modules (FamilySpec.head_modules)
    are excluded: they stay FP32/Gemm. SourceError when the model's family is not registered."""
    import torch

    from dyngate_build.families import family_for

    head = family_for(model.config.model_type).head_modules
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(part in head for part in n.split("."))]


def distill_fake_quantized(teacher, feeds: list[dict], bits, group_size: int | None, steps: int, learning_rate: float):
    """Knowledge distillation of a fake-quantized copy of `teacher` on unlabeled `feeds` (numpy batches).

    The encoder Linears' weights pass through `FakeQuant(bits, group_size)` (straight-through estimator:
    the forward pass sees the quantized weight, the gradient reaches the FP weight unchanged).

    Loss: MSE of every hidden state (layer-by-layer targets) plus MSE of the logits, against the frozen FP32
    teacher. Runs through dyngate_build.training.train (DeepSpeed engine). Returns the student with its trained FP
    weights (parametrizations removed, so an exporter quantizes the trained weights).
    """
    import copy

    import torch
    from torch.nn.utils import parametrize

    from dyngate_build.training import TrainingConfig, train

    teacher = teacher.eval()
    student = copy.deepcopy(teacher).train()
    for _, linear in quantizable_linears(student):
        parametrize.register_parametrization(linear, "weight", FakeQuant(bits, group_size))
    batches = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds]

    def loss_fn(model, batch):
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=True)
        s = model(**batch, output_hidden_states=True)
        hidden = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(s.hidden_states, t.hidden_states))
        return hidden / len(t.hidden_states) + torch.nn.functional.mse_loss(s.logits, t.logits)

    config = TrainingConfig(micro_batch_size=int(next(iter(feeds[0].values())).shape[0]), max_steps=steps,
                            learning_rate=learning_rate, warmup_ratio=0.1, log_every=max(1, steps // 4))
    result = train(student, batches, config, loss_fn=loss_fn, desc="distill")
    for _, linear in quantizable_linears(student):
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
    return student.eval(), result
