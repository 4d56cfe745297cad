"""The technique registry: one module per technique, each a checked config dataclass and one apply function.

    @register("int8-dynamic", Int8DynamicConfig)
    def apply(context: BuildContext, config: Int8DynamicConfig) -> Variant: ...

A technique with mechanics of its own is a subpackage (`early_exit/`, `pruning/`, `quantization/`): the
config + apply module beside its core, as torchao does. `dyngate build --techniques fp32,torchscript,...`
looks names up here; an unknown name raises ConfigError
listing the known ones. Configs are validated in `__post_init__` before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dyngate_build.errors import ConfigError

# Modules that register techniques; imported on first lookup so `import dyngate_build` stays light.
TECHNIQUE_MODULES = ("fp32", "torchscript", "quantization.fp16", "quantization.int8_dynamic",
                     "quantization.int8_static", "quantization.smoothquant", "quantization.zeroquant",
                     "quantization.xtc", "early_exit.api", "pruning.pruned", "pruning.sparse", "stacked")


@dataclass(frozen=True)
class Tolerance:
    """How far a variant may drift from the FP32 PyTorch reference on real inputs before the build refuses it.

    max_abs_logit: largest |Δlogit| allowed over all checked inputs (and token positions).
    min_top1_agreement: smallest fraction of inputs (tokens for NER) whose top-1 class must match.
    """

    max_abs_logit: float
    min_top1_agreement: float


@dataclass
class Variant:
    """What a technique produces: one servable graph plus how to run and describe it.

    Attributes:
        name: variant name in the repository ("fp32", "int8-dynamic", ...).
        technique: registered technique name.
        params: the technique's settings, as recorded in metadata.
        engine: runtime engine of build/dyngate_build/runtime.py ("onnxruntime" | "torchscript" | ...).
        artifact: path of the graph file (or folder of files) the technique wrote; copied into the version
            folder as `artifact_name`.
        tolerance: agreement the build demands against the FP32 reference.
        native_platform: Triton platform for the native flavour ("onnxruntime_onnx", "pytorch_libtorch"),
            or None when the variant only runs in the python backend.
        runtime: RuntimeSpec overrides (input_dtype, device, extra).
        notes: facts for the metadata (e.g. "targets GPUs").
        artifact_name: file or folder name in the version folder (default: model.onnx / model.pt by engine).
        check_options: request options for the agreement check (early exit checks at "never exit").
        report: technique-specific measurements for metadata["technique_report"] (outlier ratios, sparsity,
            exit curves, ...).
        num_parameters: parameters of the variant's model when the technique changed them (pruning).
    """

    name: str
    technique: str
    params: dict
    engine: str
    artifact: Path
    tolerance: Tolerance
    native_platform: str | None = None
    runtime: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    artifact_name: str | None = None
    check_options: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    num_parameters: int | None = None


@dataclass
class BuildContext:
    """What techniques get: the loaded source, a scratch folder, and shared exports made once.

    Attributes:
        source: dyngate_build.sources.Source (HF model in eval mode, family, tokenizer/image processor, labels).
        work_dir: scratch folder for this build (deleted afterwards).
        calibration: training-split examples (dyngate_build.data.Example) for techniques that calibrate or train.
        reference: dyngate_build.runtime.Predictor running the FP32 PyTorch model (its preprocessing is the served one).
        dev: the dev-split examples the build measures every variant on (techniques that pick a setting
            against dev accuracy, such as early exit's default threshold, use them).
    """

    source: Any
    work_dir: Path
    calibration: list = field(default_factory=list)
    reference: Any = None
    dev: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def feeds(self, raws: list[bytes], batch_size: int = 32) -> list[dict]:
        """Graph inputs for `raws`, preprocessed exactly as served, in batches of `batch_size`.

        Each batch is a dict of numpy arrays: input_ids/attention_mask int64 [B, L] (padded to the batch's
        longest) or pixel_values float32 [B, 3, H, W].
        """
        batches = []
        for start in range(0, len(raws), batch_size):
            feeds, _, _ = self.reference.features(raws[start:start + batch_size])
            if feeds is not None:
                batches.append(feeds)
        return batches

    def calibration_feeds(self, samples: int, batch_size: int = 1) -> list[dict]:
        """`feeds` of the first `samples` calibration examples; ConfigError when there are none."""
        if not self.calibration:
            raise ConfigError("calibration data is empty: the training split gave no examples; check --data")
        return self.feeds([ex.raw for ex in self.calibration[:samples]], batch_size)

    def fp32_onnx(self) -> Path:
        """The FP32 ONNX export of the source model, made once per build."""
        if "fp32_onnx" not in self.cache:
            from dyngate_build.export import export_onnx

            self.cache["fp32_onnx"] = export_onnx(
                self.source.model, self.source.family, self.work_dir / "fp32.onnx")
        return self.cache["fp32_onnx"]


@dataclass(frozen=True)
class Technique:
    name: str
    config_class: type
    apply: Callable[[BuildContext, Any], Variant]
    summary: str
    needs_calibration: bool = False
    check: Callable[[Any, Any], None] | None = None


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, config_class: type, needs_calibration: bool = False,
             check: Callable[[Any, Any], None] | None = None) -> Callable:
    """Decorator registering `apply` under `name`; a repeated name raises.

    needs_calibration: the build then loads training-split examples into `BuildContext.calibration`.
    check: optional `check(source, config)` raising ConfigError for settings that cannot work with this
        model (e.g. a group size that does not divide a layer); runs after loading, before any technique.
    """

    def decorate(apply: Callable) -> Callable:
        if name in TECHNIQUES:
            raise ValueError(f"technique {name!r} is registered twice")
        summary = (apply.__doc__ or "").strip().splitlines()[0] if apply.__doc__ else name
        TECHNIQUES[name] = Technique(name, config_class, apply, summary, needs_calibration, check)
        return apply

    return decorate


def _load_all() -> None:
    for module in TECHNIQUE_MODULES:
        importlib.import_module(f"dyngate_build.techniques.{module}")


def known_techniques() -> list[str]:
    _load_all()
    return list(TECHNIQUES)


def get_technique(name: str) -> Technique:
    """The registered technique `name`; ConfigError listing the known ones otherwise."""
    _load_all()
    if name not in TECHNIQUES:
        raise ConfigError(f"technique {name!r} is unknown; known techniques: {', '.join(TECHNIQUES)}")
    return TECHNIQUES[name]


def make_config(name: str, options: dict | None = None):
    """Build the checked config of technique `name` from `options` (unknown keys raise ConfigError).

    A config class with a `from_options(**options)` classmethod (a config composed of other configs, such as
    `stacked`) maps the flat option keys itself.
    """
    technique = get_technique(name)
    options = dict(options or {})
    if hasattr(technique.config_class, "from_options"):
        return technique.config_class.from_options(**options)
    fields = {f.name for f in dataclasses.fields(technique.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"technique {name!r} has no option(s) {', '.join(unknown)}; "
                          f"its options: {', '.join(sorted(fields)) or '(none)'}")
    return technique.config_class(**options)
