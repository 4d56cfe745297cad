"""`stacked`: structured pruning + early exit + INT8 dynamic quantization, one ONNX graph per segment.

1. Structured pruning with KD recovery: the `pruned` technique's model (build/dyngate_build/pruning.py, cached per build,
   so a build with both `pruned` and `stacked` at the same settings prunes and recovers once).
2. Early exit on the pruned backbone: the model is cut into segments (embeddings, one per layer, ramps,
   head; build/dyngate_build/early_exit.py) and fresh off-ramps are trained on it with the backbone frozen.
3. INT8: each exported ONNX segment goes through `int8_dynamic.quantize_dynamic_int8` (ONNX Runtime
   `quantize_dynamic`: MatMul -> MatMulInteger, embedding Gather stored INT8).

Served by `runtime.EarlyExitOnnxEngine` like `early-exit` (per-sample exit, `exit_threshold` request
parameter, default threshold chosen on the tuning split through the INT8 segments themselves: the lowest one
keeping accuracy within `max_accuracy_drop` of the source FP32 model, so pruning, INT8 and exits share one
budget; 1.0 when pruning and INT8 already spent it). The agreement
check runs at "never exit" against the FP32 reference; a pruned and quantized model is a different model,
so its tolerance is loose (like `pruned`): compare accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from dyngate_build.errors import ConfigError
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.early_exit import DEFAULT_GRID, EarlyExitConfig, _build, _trained
from dyngate_build.techniques.pruned import PrunedConfig, pruned_model

# A pruned (40%) and INT8 model is not the FP32 model: top-1 agreement at never-exit measured 0.9+ on the
# distilbert-tiny preset; 0.8 leaves room for other data, logits may move by a few units.
TOLERANCE = Tolerance(max_abs_logit=1e3, min_top1_agreement=0.8)


@dataclass(frozen=True)
class StackedConfig:
    """Settings of the three stages (each checked by its own technique's config).

    Pruning: ratio, head_ratio, ffn_ratio, recovery_epochs, prune_learning_rate, temperature,
    recovery_examples (see `pruned`). Early exit: exit_layers, criterion, threshold, grid, max_accuracy_drop,
    tuning_examples, ramp_epochs, ramp_learning_rate, latency_samples (see `early-exit`). INT8: per_channel,
    weight_type (see `int8-dynamic`). zero_stage, precision, micro_batch_size: both fine-tunings.
    """

    ratio: float = 0.4
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    recovery_epochs: float = 3.0
    prune_learning_rate: float = 5e-4
    temperature: float = 2.0
    recovery_examples: int = 1024
    exit_layers: tuple | None = None
    criterion: str = "max_prob"
    threshold: float | None = None
    grid: tuple = DEFAULT_GRID
    max_accuracy_drop: float = 0.01
    tuning_examples: int = 256
    ramp_epochs: float = 20.0
    ramp_learning_rate: float = 2e-3
    latency_samples: int = 64
    per_channel: bool = True
    weight_type: str = "int8"
    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 32

    def __post_init__(self):
        from dyngate_build.techniques.int8_dynamic import Int8DynamicConfig

        self.pruning()
        self.early_exit()
        Int8DynamicConfig(per_channel=self.per_channel, weight_type=self.weight_type)

    def pruning(self) -> PrunedConfig:
        return PrunedConfig(ratio=self.ratio, head_ratio=self.head_ratio, ffn_ratio=self.ffn_ratio,
                            recovery_epochs=self.recovery_epochs, learning_rate=self.prune_learning_rate,
                            temperature=self.temperature, zero_stage=self.zero_stage, precision=self.precision,
                            micro_batch_size=self.micro_batch_size, recovery_examples=self.recovery_examples)

    def early_exit(self) -> EarlyExitConfig:
        return EarlyExitConfig(exit_layers=self.exit_layers, criterion=self.criterion, threshold=self.threshold,
                               grid=self.grid, max_accuracy_drop=self.max_accuracy_drop,
                               tuning_examples=self.tuning_examples, epochs=self.ramp_epochs,
                               learning_rate=self.ramp_learning_rate, zero_stage=self.zero_stage,
                               precision=self.precision, micro_batch_size=self.micro_batch_size,
                               latency_samples=self.latency_samples)


def _check(source, config: StackedConfig) -> None:
    from dyngate_build.techniques import early_exit, pruned

    pruned._check(source, config.pruning())
    early_exit._check(source, config.early_exit())


def quantize_segments(folder: Path, out: Path, per_channel: bool, weight_type: str) -> Path:
    """`quantize_dynamic_int8` of every ONNX segment in `folder` into `out` (manifest copied unchanged)."""
    import json
    import shutil

    from dyngate_build.early_exit import MANIFEST
    from dyngate_build.techniques.int8_dynamic import quantize_dynamic_int8

    manifest = json.loads((folder / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for file in manifest["segments"].values():
        quantize_dynamic_int8(folder / file, out / file, per_channel, weight_type)
    shutil.copyfile(folder / MANIFEST, out / MANIFEST)
    return out


def count_ops(folder: Path, op_type: str) -> dict[str, int]:
    """Occurrences of `op_type` per segment file of an early-exit folder (e.g. MatMulInteger)."""
    import onnx

    return {path.stem: sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)
            for path in sorted(folder.glob("*.onnx"))}


@register("stacked", StackedConfig, needs_calibration=True, check=_check)
def apply(context: BuildContext, config: StackedConfig) -> Variant:
    """Structured pruning + early exit + INT8 dynamic quantization of each ONNX segment (per-sample exit)."""
    pruning, early = config.pruning(), config.early_exit()
    student, prune_report = pruned_model(context, pruning)
    trained = _trained(context, early, model=student, tag=f"stacked:{pruning}")
    quantized: dict = {}

    def transform(folder: Path) -> Path:
        out = quantize_segments(folder, folder.parent / "stacked-int8-segments", config.per_channel,
                                config.weight_type)
        quantized["matmul_integer"] = count_ops(out, "MatMulInteger")
        if not any(quantized["matmul_integer"].values()):
            raise ConfigError("INT8 quantization of the stacked segments produced no MatMulInteger; "
                              "the segments have no MatMul to quantize")
        return out

    stages = {"pruning": {key: prune_report[key] for key in ("heads_per_layer", "ffn_per_layer",
                                                              "parameters_before", "parameters_after",
                                                              "recovery")},
              "int8": {"method": "onnxruntime quantize_dynamic per segment (MatMul, Gather)",
                       "per_channel": config.per_channel, "weight_type": config.weight_type}}
    variant = _build(context, early, "stacked", "onnx", trained=trained, transform=transform, tolerance=TOLERANCE,
                     report_extra={"stacked": stages},
                     notes=["pruned (structured, KD-recovered) + early exit + INT8 dynamic: a different model "
                            "from FP32, agreement is loose by design; compare accuracy"],
                     budget_vs_source=True)
    variant.report["stacked"]["int8"]["matmul_integer_per_segment"] = quantized["matmul_integer"]
    variant.params = {**{f.name: getattr(config, f.name) for f in fields(config)}, "threshold": variant.params["threshold"]}
    variant.num_parameters = prune_report["parameters_after"] + sum(
        p.numel() for ramp in trained["segments"].ramps.values() for p in ramp.parameters())
    return variant
