"""`stacked`: structured pruning + early exit + INT8 dynamic quantization, one ONNX graph per segment.

1. Structured pruning with KD recovery: the `pruned` technique's model (techniques/pruning/, cached per build,
   so a build with both `pruned` and `stacked` at the same settings prunes and recovers once).
2. Early exit on the pruned backbone: the model is cut into segments (embeddings, one per layer, ramps,
   head; techniques/early_exit/) and fresh off-ramps are trained on it with the backbone frozen.
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

from dataclasses import dataclass, field
from pathlib import Path

from dyngate_build.errors import ConfigError
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.early_exit import api as early_exit
from dyngate_build.techniques.early_exit.api import EarlyExitConfig, build_variant, trained_ramps
from dyngate_build.techniques.pruning import pruned
from dyngate_build.techniques.pruning.pruned import PrunedConfig, pruned_model
from dyngate_build.techniques.quantization.int8_dynamic import Int8DynamicConfig

# A pruned (40%) and INT8 model is not the FP32 model: top-1 agreement at never-exit measured 0.9+ on the
# distilbert-tiny preset; 0.8 leaves room for other data, logits may move by a few units.
TOLERANCE = Tolerance(max_abs_logit=1e3, min_top1_agreement=0.8)

# `--option stacked.KEY=VALUE` key -> (stage, that stage's config field). Keys named like the stage's own field
# map to it; the two learning rates and the ramp epochs are renamed so pruning and early exit stay apart.
OPTION_KEYS = {
    "ratio": ("pruning", "ratio"), "head_ratio": ("pruning", "head_ratio"), "ffn_ratio": ("pruning", "ffn_ratio"),
    "recovery_epochs": ("pruning", "recovery_epochs"), "prune_learning_rate": ("pruning", "learning_rate"),
    "temperature": ("pruning", "temperature"), "recovery_examples": ("pruning", "recovery_examples"),
    "exit_layers": ("early_exit", "exit_layers"), "criterion": ("early_exit", "criterion"),
    "threshold": ("early_exit", "threshold"), "grid": ("early_exit", "grid"),
    "max_accuracy_drop": ("early_exit", "max_accuracy_drop"), "tuning_examples": ("early_exit", "tuning_examples"),
    "ramp_epochs": ("early_exit", "epochs"), "ramp_learning_rate": ("early_exit", "learning_rate"),
    "latency_samples": ("early_exit", "latency_samples"),
    "per_channel": ("int8", "per_channel"), "weight_type": ("int8", "weight_type"),
}
# Keys both fine-tunings (pruning recovery and ramp training) take.
SHARED_KEYS = ("zero_stage", "precision", "micro_batch_size")


def _default_pruning() -> PrunedConfig:
    return PrunedConfig()


def _default_early_exit() -> EarlyExitConfig:
    return EarlyExitConfig()


@dataclass(frozen=True)
class StackedConfig:
    """The three stages' own configs, each checked by its technique: `pruning` (see `pruned`), `early_exit`
    (see `early-exit`) and `int8` (see `int8-dynamic`).

    From the command line the stages' settings are flat keys (`--option stacked.ratio=0.3`), mapped by
    OPTION_KEYS; zero_stage, precision and micro_batch_size set both fine-tunings (`from_options`).
    """

    pruning: PrunedConfig = field(default_factory=_default_pruning)
    early_exit: EarlyExitConfig = field(default_factory=_default_early_exit)
    int8: Int8DynamicConfig = field(default_factory=Int8DynamicConfig)

    def __post_init__(self):
        for name, kind in (("pruning", PrunedConfig), ("early_exit", EarlyExitConfig), ("int8", Int8DynamicConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be of type {kind.__name__}")
        for key in SHARED_KEYS:
            if getattr(self.pruning, key) != getattr(self.early_exit, key):
                raise ConfigError(f"{key} differs between pruning ({getattr(self.pruning, key)!r}) and early_exit "
                                  f"({getattr(self.early_exit, key)!r}); both fine-tunings take one value")

    @classmethod
    def option_keys(cls) -> list[str]:
        return sorted([*OPTION_KEYS, *SHARED_KEYS])

    @classmethod
    def from_options(cls, **options) -> "StackedConfig":
        """The config from flat option keys (OPTION_KEYS, SHARED_KEYS); ConfigError naming unknown keys."""
        unknown = sorted(set(options) - set(OPTION_KEYS) - set(SHARED_KEYS))
        if unknown:
            raise ConfigError(f"technique 'stacked' has no option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(cls.option_keys())}")
        stages: dict[str, dict] = {"pruning": {}, "early_exit": {}, "int8": {}}
        for key, value in options.items():
            if key in SHARED_KEYS:
                stages["pruning"][key] = stages["early_exit"][key] = value
            else:
                stage, name = OPTION_KEYS[key]
                stages[stage][name] = value
        return cls(pruning=PrunedConfig(**stages["pruning"]), early_exit=EarlyExitConfig(**stages["early_exit"]),
                   int8=Int8DynamicConfig(**stages["int8"]))

    def options(self) -> dict:
        """The flat option keys and their values (what metadata records as params)."""
        stages = {"pruning": self.pruning, "early_exit": self.early_exit, "int8": self.int8}
        flat = {key: getattr(stages[stage], name) for key, (stage, name) in OPTION_KEYS.items()}
        flat.update({key: getattr(self.pruning, key) for key in SHARED_KEYS})
        return flat


def check_source(source, config: StackedConfig) -> None:
    """Both stages' checks against `source` (ConfigError)."""
    pruned.check_source(source, config.pruning)
    early_exit.check_source(source, config.early_exit)


def quantize_segments(folder: Path, out: Path, per_channel: bool, weight_type: str) -> Path:
    """`quantize_dynamic_int8` of every ONNX segment in `folder` into `out` (manifest copied unchanged)."""
    import json
    import shutil

    from dyngate_build.techniques.early_exit.onnx_export import MANIFEST
    from dyngate_build.techniques.quantization.int8_dynamic import quantize_dynamic_int8

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


@register("stacked", StackedConfig, needs_calibration=True, check=check_source)
def apply(context: BuildContext, config: StackedConfig) -> Variant:
    """Structured pruning + early exit + INT8 dynamic quantization of each ONNX segment (per-sample exit)."""
    pruning, early = config.pruning, config.early_exit
    student, prune_report = pruned_model(context, pruning)
    trained = trained_ramps(context, early, model=student, tag=f"stacked:{pruning}")
    quantized: dict = {}

    def transform(folder: Path) -> Path:
        out = quantize_segments(folder, folder.parent / "stacked-int8-segments", config.int8.per_channel,
                                config.int8.weight_type)
        quantized["matmul_integer"] = count_ops(out, "MatMulInteger")
        if not any(quantized["matmul_integer"].values()):
            raise ConfigError("INT8 quantization of the stacked segments produced no MatMulInteger; "
                              "the segments have no MatMul to quantize")
        return out

    stages = {"pruning": {key: prune_report[key] for key in ("heads_per_layer", "ffn_per_layer",
                                                              "parameters_before", "parameters_after",
                                                              "recovery")},
              "int8": {"method": "onnxruntime quantize_dynamic per segment (MatMul, Gather)",
                       "per_channel": config.int8.per_channel, "weight_type": config.int8.weight_type}}
    variant = build_variant(context, early, "stacked", "onnx", trained=trained, transform=transform, tolerance=TOLERANCE,
                     report_extra={"stacked": stages},
                     notes=["pruned (structured, KD-recovered) + early exit + INT8 dynamic: a different model "
                            "from FP32, agreement is loose by design; compare accuracy"],
                     budget_vs_source=True)
    variant.report["stacked"]["int8"]["matmul_integer_per_segment"] = quantized["matmul_integer"]
    variant.params = {**config.options(), "threshold": variant.params["threshold"]}
    variant.num_parameters = prune_report["parameters_after"] + sum(
        p.numel() for ramp in trained["segments"].ramps.values() for p in ramp.parameters())
    return variant
