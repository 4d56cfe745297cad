"""Helpers shared by the quantization techniques (int8-*, smoothquant, zeroquant, xtc).

Everything here runs ONNX Runtime's own quantization tooling; nothing simulates a kernel.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

import numpy as np

from dyngate_build.errors import ConfigError


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
