"""`pruned`: structured pruning — attention heads and FFN neurons removed (smaller shapes), KD recovery, ONNX.

Importance scores and the head bookkeeping are in techniques/pruning/core.py. After pruning, the student is fine-tuned
with knowledge distillation from the FP32 source model (KL on temperature-softened logits) through
dyngate_build.training on the DeepSpeed engine, then exported to ONNX with its smaller shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from dyngate_build.errors import ConfigError, check_range
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register


@dataclass(frozen=True)
class PrunedConfig:
    """ratio: share of attention heads and FFN neurons removed per layer, in [0, 1) (1.0 is refused).
    head_ratio / ffn_ratio: override `ratio` for heads or FFN neurons alone.
    recovery_epochs (0 = no recovery), learning_rate, temperature, zero_stage, precision, micro_batch_size:
    the KD recovery fine-tuning. recovery_examples: training examples used for it.
    """

    ratio: float = 0.4
    head_ratio: float | None = None
    ffn_ratio: float | None = None
    recovery_epochs: float = 3.0
    learning_rate: float = 5e-4
    temperature: float = 2.0
    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 32
    recovery_examples: int = 1024

    def __post_init__(self):
        from dyngate_build.techniques.pruning.core import check_ratio

        check_ratio("ratio", self.ratio)
        for name in ("head_ratio", "ffn_ratio"):
            if getattr(self, name) is not None:
                check_ratio(name, getattr(self, name))
        check_range("temperature", self.temperature, 0.0, 100.0, low_open=True)
        check_range("recovery_epochs", self.recovery_epochs, 0.0, 1000.0)
        if not isinstance(self.recovery_examples, int) or self.recovery_examples < 1:
            raise ConfigError(f"recovery_examples={self.recovery_examples!r} must be an integer >= 1")
        if self.recovery_epochs > 0:
            self.training()

    def training(self):
        from dyngate_build.training import TrainingConfig

        return TrainingConfig(zero_stage=self.zero_stage, precision=self.precision,
                              micro_batch_size=self.micro_batch_size, learning_rate=self.learning_rate,
                              epochs=self.recovery_epochs, warmup_ratio=0.1, log_every=10**6)


def check_source(source, config: PrunedConfig) -> None:
    """ConfigError when structured pruning does not support `source`'s family."""
    from dyngate_build.techniques.pruning.core import check_family

    check_family(source.family.model_type)


def pruned_model(context: BuildContext, config: PrunedConfig):
    """The pruned and KD-recovered copy of the source model, with its report (cached per build)."""
    from dyngate_build.techniques.pruning.core import num_parameters, recover_with_kd, prune_structured

    key = ("pruned", config)
    if key in context.cache:
        return context.cache[key]
    source = context.source
    student = copy.deepcopy(source.model).float()
    before = num_parameters(student)
    shapes = prune_structured(student, source.family.model_type,
                              config.ratio if config.head_ratio is None else config.head_ratio,
                              config.ratio if config.ffn_ratio is None else config.ffn_ratio)
    recovery = None
    if config.recovery_epochs > 0:
        feeds = context.calibration_feeds(config.recovery_examples, batch_size=config.micro_batch_size)
        recovery = recover_with_kd(student, source.model, feeds, config.training(), config.temperature,
                           token_level=source.family.task == "token-classification")
    report = {"importance": "L1 norm of each head's q/k/v rows + output columns; FFN neuron: L1 of its "
                            "in-row + out-column (techniques/pruning/core.py)",
              "heads_per_layer": shapes["heads"], "ffn_per_layer": shapes["ffn"],
              "pruned_heads": shapes["pruned_heads"], "parameters_before": before,
              "parameters_after": num_parameters(student),
              "recovery": recovery and {**recovery, "method": "KD from FP32 (KL, T=%g)" % config.temperature,
                                        "zero_stage": config.zero_stage, "precision": config.precision}}
    context.cache[key] = (student, report)
    return student, report


@register("pruned", PrunedConfig, needs_calibration=True, check=check_source)
def apply(context: BuildContext, config: PrunedConfig) -> Variant:
    """Structured pruning of heads and FFN neurons with KD recovery, exported to ONNX with smaller shapes."""
    from dyngate_build.export import export_onnx

    student, report = pruned_model(context, config)
    path = export_onnx(student, context.source.family, context.work_dir / "pruned.onnx")
    return Variant(
        name="pruned", technique="pruned",
        params={"ratio": config.ratio, "head_ratio": config.head_ratio, "ffn_ratio": config.ffn_ratio,
                "recovery_epochs": config.recovery_epochs},
        engine="onnxruntime", artifact=path, native_platform="onnxruntime_onnx",
        tolerance=Tolerance(max_abs_logit=1e3, min_top1_agreement=0.6),
        report=report, num_parameters=report["parameters_after"],
        notes=["a different (smaller) model: agreement with FP32 is loose by design; compare accuracy"])
