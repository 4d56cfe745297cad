"""`early-exit` (ONNX, one graph per segment) and `early-exit-torchscript`: DeeBERT off-ramps, per-sample exit.

Both variants share one set of ramps per build (trained once, through dyngate_build.training on the DeepSpeed
engine) on the training split. `training="frozen"` (default, DeeBERT) trains only the ramps; `training="joint"`
trains the backbone, the model's own head and the ramps together on a weighted sum of the per-exit losses
(`joint_weights`: "depth", w_k proportional to k, or "uniform"; Kaya et al. 2019, Zhou et al. 2020). A jointly
trained variant is a different model from FP32: its curve's threshold-1.0 point is the jointly trained full
model, its default threshold is held to the source model's metric (not the possibly lower jointly trained one),
its agreement with FP32 is loose (`JOINT_TOLERANCE`, like `pruned`/`stacked`), and the build checks instead
that at never-exit it equals its own full model in PyTorch.

The dev split of the build (or, without one, a held-out part of the training split: the "tuning split")
picks the default threshold — the lowest threshold of the grid whose task metric (accuracy; entity F1 for NER)
stays within `max_accuracy_drop` of the full model (joint: of the source model) — and gives the curve
threshold -> metric, mean layers computed, p50 latency, recorded in the variant's `technique_report`.
Requests choose their own threshold with the `exit_threshold` request parameter (1.0 = never exit = the full
model).

Token classification (DeBERTa NER): per-token ramps trained on per-token labels derived from the gold
entity spans (every real token labelled, techniques/early_exit/ramps.py `token_labels`); a sentence exits when every
real token is confident (Li et al. 2021). Both flavours serve it (the DeBERTa layers trace exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

from dyngate_build.errors import ConfigError, ExportError, check_choice, check_range
from dyngate_build.techniques import BuildContext, Tolerance, Variant, register
from dyngate_build.techniques.early_exit.thresholds import (NEVER_EXIT, check_threshold, measure_curve,
                                                           own_full_model_gap)

DEFAULT_GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
ONNX_ENGINE = "early-exit-onnx"
DEFAULT_BACKBONE_LR = 5e-5  # joint training: pretrained backbone and head (fresh ramps keep learning_rate)
# Joint training changes the backbone and head: at never-exit it is a fine-tuned model, not FP32 (top-1
# agreement with FP32 measured 0.97 on the distilbert-tiny preset, SST-2 dev, at the defaults; 0.8 leaves room
# for other data and settings); exactness of the export is checked against its own full model instead.
JOINT_TOLERANCE = Tolerance(max_abs_logit=1e3, min_top1_agreement=0.8)
OWN_MODEL_MAX_ABS_LOGIT = 1e-3


@dataclass(frozen=True)
class EarlyExitConfig:
    """Settings of the early-exit variants.

    exit_layers: 1-based layers followed by an off-ramp (None = every layer but the last).
    criterion: "max_prob" or "entropy" (confidence 1 - H/log C); both on [0, 1].
    threshold: default exit threshold in [0, 1]; None = chosen by the build on the tuning split.
    grid: thresholds measured for the curve (each in [0, 1]).
    max_accuracy_drop: task metric (fraction: accuracy, or entity F1 for NER) the default threshold may lose
        against the full model (0.01 = 1 point).
    tuning_examples: training examples held out to choose the threshold and draw the curve.
    epochs, learning_rate, zero_stage, precision, micro_batch_size: ramp training (dyngate_build.training).
    training: "frozen" (only the ramps train; never-exit = the source model) or "joint" (backbone, head and
        ramps train together on sum_k w_k CE_k; never-exit = the jointly trained model).
    joint_weights: "depth" (w_k proportional to layer k; default) or "uniform"; joint training only.
    backbone_learning_rate: learning rate of the backbone and head in joint training (default 5e-5; the
        ramps keep `learning_rate`); joint training only.
    latency_samples: batch-1 requests timed per threshold for the curve's p50.
    """

    exit_layers: tuple | None = None
    criterion: str = "max_prob"
    threshold: float | None = None
    grid: tuple = DEFAULT_GRID
    max_accuracy_drop: float = 0.01
    tuning_examples: int = 256
    epochs: float = 20.0
    learning_rate: float = 2e-3
    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 32
    latency_samples: int = 64
    training: str = "frozen"
    joint_weights: str | None = None
    backbone_learning_rate: float | None = None

    def __post_init__(self):
        from dyngate_build.techniques.early_exit.ramps import JOINT_WEIGHTS, TRAINING_MODES
        from dyngate_build.techniques.early_exit.segments import CRITERIA

        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("training", self.training, TRAINING_MODES)
        if self.training == "frozen":
            for name in ("joint_weights", "backbone_learning_rate"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name}={getattr(self, name)!r} applies to training='joint' only (the "
                                      f"backbone is frozen); set training='joint' or drop {name}")
        if self.joint_weights is not None:
            check_choice("joint_weights", self.joint_weights, JOINT_WEIGHTS)
        if self.backbone_learning_rate is not None:
            if not isinstance(self.backbone_learning_rate, (int, float)) or isinstance(self.backbone_learning_rate,
                                                                                        bool):
                raise ConfigError(f"backbone_learning_rate={self.backbone_learning_rate!r} must be a number in "
                                  f"(0, 1], e.g. 5e-5, or None for the default")
            check_range("backbone_learning_rate", self.backbone_learning_rate, 0.0, 1.0, low_open=True)
        if self.threshold is not None:
            check_threshold("threshold", self.threshold)
        if not self.grid:
            raise ConfigError("grid is empty; give thresholds in [0, 1], e.g. 0.6,0.8,0.9,1.0")
        for value in self.grid:
            check_threshold("grid", value)
        check_range("max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)
        if self.exit_layers is not None:
            if isinstance(self.exit_layers, (str, bytes)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in self.exit_layers):
                raise ConfigError(f"exit_layers={self.exit_layers!r} must be a list of 1-based layer numbers")
        for name in ("tuning_examples", "latency_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 8:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 8")
        self.training_config()  # ZeRO stage, precision, lr, epochs checked by TrainingConfig before any work

    def training_config(self):
        from dyngate_build.training import TrainingConfig

        return TrainingConfig(zero_stage=self.zero_stage, precision=self.precision,
                              micro_batch_size=self.micro_batch_size, learning_rate=self.learning_rate,
                              epochs=self.epochs, warmup_ratio=0.1, log_every=10**6)

    def joint(self) -> dict:
        """The joint-training settings in force ({} when frozen): joint_weights, backbone_learning_rate."""
        if self.training != "joint":
            return {}
        return {"joint_weights": self.joint_weights or "depth",
                "backbone_learning_rate": self.backbone_learning_rate or DEFAULT_BACKBONE_LR}


def check_source(source, config: EarlyExitConfig) -> None:
    """ConfigError when `source`'s family has no early-exit cut or `config.exit_layers` names missing layers."""
    from dyngate_build.techniques.early_exit.segments import check_model, num_layers, resolve_exit_layers

    check_model(source.model, source.family.model_type)
    resolve_exit_layers(config.exit_layers, num_layers(source.model))


def trained_ramps(context: BuildContext, config: EarlyExitConfig, model=None, tag: str = "early-exit") -> dict:
    """Ramps trained once per build and settings (shared by the ONNX and TorchScript variants).

    model: the backbone to cut (default: the source model; `stacked` passes its pruned model); `tag` keys
    the cache so ramps of different backbones are never mixed.
    """
    from dyngate_build.techniques.early_exit.ramps import train_ramps
    from dyngate_build.techniques.early_exit.segments import segment_model

    key = (tag, config.exit_layers, config.epochs, config.learning_rate, config.zero_stage,
           config.precision, config.micro_batch_size, config.tuning_examples, config.training,
           tuple(sorted(config.joint().items())))
    if key in context.cache:
        return context.cache[key]
    examples = context.calibration
    if len(examples) < config.tuning_examples + 32:
        raise ConfigError(f"early exit needs ≥{config.tuning_examples + 32} training examples "
                          f"({config.tuning_examples} held out for the threshold); the data gave {len(examples)}; "
                          f"lower tuning_examples or give more data")
    train_part, tuning = examples[:-config.tuning_examples], examples[-config.tuning_examples:]
    source = context.source
    segments = segment_model(source.model if model is None else model, source.family.model_type,
                             list(config.exit_layers) if config.exit_layers is not None else None)
    if segments.token_level:
        feeds, labels = _token_batches(context, train_part, config.micro_batch_size)
    else:
        feeds = context.feeds([ex.raw for ex in train_part], batch_size=config.micro_batch_size)
        labels = [int(ex.target) for ex in train_part]
    training = train_ramps(segments, feeds, labels, config.training_config(), config.training, **config.joint())
    result = {"segments": segments, "tuning": tuning, "training": training, "train_examples": len(train_part)}
    context.cache[key] = result
    return result


def _token_batches(context: BuildContext, examples: list, batch_size: int) -> tuple[list[dict], list[list[int]]]:
    """Graph-input batches of `examples` (preprocessed as served) and per-token labels from their spans."""
    from dyngate_build.techniques.early_exit.ramps import token_labels

    feeds, labels = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch, encodings, decoded = context.reference.features([ex.raw for ex in chunk])
        if batch is None:
            continue
        valid = [ex for ex, item in zip(chunk, decoded) if not isinstance(item, Exception)]
        feeds.append(batch)
        labels.extend(token_labels(enc, ex.target, context.source.labels) for enc, ex in zip(encodings, valid))
    return feeds, labels


def _joint_report(context: BuildContext, config: EarlyExitConfig, predictor, segments, tuning: list, task: str,
                  metric: str, full: dict) -> dict:
    """Joint training's check and comparison: never-exit equals the variant's own full model (else
    ExportError), and the source model's metric on the same tuning split beside the jointly trained one."""
    gap = own_full_model_gap(predictor, segments, context.feeds([ex.raw for ex in tuning[:64]]))
    if gap > OWN_MODEL_MAX_ABS_LOGIT:
        raise ExportError(f"the jointly trained early-exit export differs from its own full model at "
                          f"exit_threshold=1.0 by max |Δlogit| {gap:.3g} > {OWN_MODEL_MAX_ABS_LOGIT:g}")
    return {**config.joint(), "own_full_model_max_abs_logit": round(gap, 8),
            f"source_{metric}": source_metric(context, tuning, task), f"full_{metric}_after_joint": full[metric],
            "note": "never-exit runs the jointly trained backbone and head, not the source model"}


def source_metric(context: BuildContext, examples: list, task: str) -> float:
    """The source (FP32 reference) model's task metric on `examples` (accuracy, or entity F1), 4 decimals."""
    from dyngate_build.evaluate import run_predictor, task_metric

    result = task_metric(task, run_predictor(context.reference, [ex.raw for ex in examples]), examples,
                         context.source.labels)
    return round(result.value, 4)


def build_variant(context: BuildContext, config: EarlyExitConfig, name: str, flavour: str, trained: dict | None = None,
           transform=None, tolerance: Tolerance | None = None, report_extra: dict | None = None,
           notes: list[str] | None = None, budget_vs_source: bool = False) -> Variant:
    """The early-exit variant `name`. `stacked` passes its own `trained` ramps (on a pruned backbone), a
    `transform(folder) -> folder` applied to the exported ONNX segments (INT8), its tolerance and report, and
    `budget_vs_source=True`: the default threshold keeps the metric within `max_accuracy_drop` of the source
    (FP32) model rather than of the variant's own full model (joint training does the same)."""
    from dyngate_build.runtime import Predictor
    from dyngate_build.techniques.early_exit.onnx_export import export_onnx_segments
    from dyngate_build.techniques.early_exit.thresholds import default_threshold
    from dyngate_build.techniques.early_exit.torchscript_export import export_torchscript
    from dyngate_build.variant_folder import write_variant_folder

    trained = trained if trained is not None else trained_ramps(context, config)
    segments, source = trained["segments"], context.source
    task = source.family.task
    if flavour == "onnx":
        artifact = export_onnx_segments(segments, context.work_dir / f"{name}-segments", config.criterion,
                                        config.threshold if config.threshold is not None else 1.0, task)
        if transform is not None:
            artifact = transform(artifact)
        engine, artifact_name, extra = ONNX_ENGINE, "early_exit", {}
    else:
        artifact = export_torchscript(segments, context.work_dir / f"{name}.pt", config.criterion)
        engine, artifact_name, extra = "torchscript", "model.pt", {"threshold_input": True}
    # a servable folder to measure the curve through the real runtime
    folder = write_variant_folder(context.work_dir / f"{name}-measure", context.source, engine, artifact,
                                  artifact_name=artifact_name, runtime={"extra": {**extra, "exit_threshold": 1.0}})
    predictor = Predictor(str(folder))
    tuning = context.dev or trained["tuning"]  # the rule is on dev; held-out training data otherwise
    curve = measure_curve(predictor, tuning, source.labels, tuple(config.grid) + (1.0,), config.latency_samples,
                          task)
    metric = "entity_f1" if task == "token-classification" else "accuracy"
    full = next(row for row in curve if row["threshold"] >= 1.0)
    joint = config.training == "joint"
    joint_report = _joint_report(context, config, predictor, segments, tuning, task, metric, full) if joint else {}
    # a jointly trained (or pruned and quantized) full model may lose against the source; the bar stays the
    # model the user gave
    if joint:
        baseline, baseline_name = joint_report[f"source_{metric}"], "the source (FP32) model"
    elif budget_vs_source:
        baseline, baseline_name = source_metric(context, tuning, task), "the source (FP32) model"
    else:
        baseline, baseline_name = full[metric], "full model"
    chosen = config.threshold if config.threshold is not None else default_threshold(
        curve, baseline, config.max_accuracy_drop, metric)
    layers = len(segments.layers)
    at = min(curve, key=lambda row: abs(row["threshold"] - chosen))
    report = {
        "criterion": config.criterion, "exit_layers": sorted(segments.ramps), "layers": layers,
        "default_threshold": chosen, "threshold_chosen_by": "build" if config.threshold is None else "config",
        "metric": metric,
        "rule": f"lowest threshold with {metric} ≥ {baseline_name} - {config.max_accuracy_drop:g} on the tuning "
                f"split",
        f"baseline_{metric}": baseline,
        "tuning_split": (f"{len(tuning)} dev examples" if context.dev else
                         f"{len(tuning)} held-out training examples (not used for ramp training)"),
        "ramp_training": {**trained["training"], "examples": trained["train_examples"],
                          "zero_stage": config.zero_stage, "precision": config.precision,
                          **({"labels": "per token: every real token (B-X/I-X from the gold spans, O elsewhere "
                                        "and on [CLS]/[SEP]); padding ignored",
                              "exit_rule": "a sentence exits when its least confident real token is confident"}
                             if segments.token_level else {})},
        "curve": curve,
        "at_default": {metric: at[metric], f"full_{metric}": full[metric],
                       "mean_layers": at["mean_layers"], "layers_saved_factor": round(layers / at["mean_layers"], 3),
                       "p50_ms": at["p50_ms"], "full_p50_ms": full["p50_ms"]},
        "request_parameter": "exit_threshold (float; ≥1.0 = never exit)",
        **(report_extra or {}),
    }
    if joint:
        report["joint"] = joint_report
    if flavour == "onnx":
        import json

        manifest_path = artifact / "early_exit.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["default_threshold"] = chosen
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return Variant(
        name=name, technique=name,
        params={"criterion": config.criterion, "exit_layers": sorted(segments.ramps), "threshold": chosen,
                "training": config.training, **config.joint()},
        engine=engine, artifact=artifact,
        artifact_name=artifact_name,
        tolerance=tolerance or (JOINT_TOLERANCE if joint else
                                Tolerance(max_abs_logit=max(source.family.fp32_tolerance, 1e-3),
                                          min_top1_agreement=0.99)),
        runtime={"extra": {**extra, "exit_threshold": chosen}},
        check_options=dict(NEVER_EXIT), report=report,
        notes=[f"exits after layers {sorted(segments.ramps)} of {layers} when confidence ≥ exit_threshold "
               f"(default {chosen:g}; request parameter exit_threshold, 1.0 = never exit)",
               "agreement checked at exit_threshold=1.0 (never exit); accuracy and latency at the default",
               *(["joint training: backbone, head and ramps trained together, so never-exit is a fine-tuned "
                  "model, not FP32: agreement with FP32 is loose by design (compare accuracy); the export is "
                  f"checked against its own full model (max |Δlogit| "
                  f"{report['joint']['own_full_model_max_abs_logit']:.2g})"] if joint else []),
               *(notes or [])])


@register("early-exit", EarlyExitConfig, needs_calibration=True, check=check_source)
def apply(context: BuildContext, config: EarlyExitConfig) -> Variant:
    """Early exit with trained off-ramps, one ONNX graph per segment chained by the runtime (per-sample exit)."""
    return build_variant(context, config, "early-exit", "onnx")


@register("early-exit-torchscript", EarlyExitConfig, needs_calibration=True, check=check_source)
def apply_torchscript(context: BuildContext, config: EarlyExitConfig) -> Variant:
    """Early exit with trained off-ramps as scripted TorchScript (loop over traced layers, per-sample exit)."""
    return build_variant(context, config, "early-exit-torchscript", "torchscript")
