"""`dyngate build`: source model -> every requested variant -> checked, measured, written to the repository.

For one model:
1. every technique config is checked before any work (unknown names and bad options raise ConfigError);
2. the source loads (presets train or are reused) and the dev split is read;
3. the FP32 PyTorch reference answers the dev inputs through the serving runtime (same preprocessing);
4. each technique makes its variant; the variant's version folder is written to a staging repository and
   loaded with the very runtime Triton will use; it must agree with the reference within its tolerance
   (else ExportError), then its dev metric, size and in-process p50 latency are measured, and its answer on
   every dev example (confidence, correct or not) is kept in the version folder (`dev_scores.json`);
5. metadata and config.pbtxt are written last, and the staging repository moves into place only when every
   variant succeeded: a new variant's folder moves in whole, a rebuilt one gets the next version folder
   (`<model>__<variant>/2/` beside `1/`; see build/dyngate_build/repository.py), never a replaced folder;
6. `after_publish(published)` runs once every model folder is in place: the CLI passes a roll-out to a running
   Triton (dyngate_serving) there. Without one, `repository.keep_previous_version` runs for every model: the
   `repository.KEEP_PREVIOUS_VERSIONS` previous version folders stay beside the new one for a Triton that may
   still serve one of them (`dyngate reload` switches it over and removes them); older ones are deleted.
The build step never talks to Triton itself (dyngate_build imports no serving code).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dyngate_build import __version__
from dyngate_build.errors import ConfigError, ExportError
from dyngate_build.evaluate import agreement, dev_scores, latency, run_predictor, task_metric, torch_threads_kept
from dyngate_build.metadata import (AgreementRecord, LatencyRecord, MachineRecord, MetricRecord, ServingRecord,
                                    SourceRecord, ToleranceRecord, VariantMetadata)
from dyngate_build.repository import (Published, ServingOptions, directory_size, finish_model, keep_previous_version,
                                      list_models, model_name_for, native_config, python_config, staged_repository,
                                      triton_name)
from dyngate_build.runtime import Predictor
from dyngate_build.techniques import BuildContext, Variant, get_technique, make_config
from dyngate_build.variant_folder import artifact_name_for, reference_predictor, write_variant_folder

DEFAULT_TECHNIQUES = ("fp32", "torchscript")
VERSION = 1
CALIBRATION_EXAMPLES = 1024


@dataclass
class BuildOptions:
    """Settings of one `dyngate build` run.

    Attributes:
        model: preset name, local checkpoint folder or hub id.
        techniques: technique names in build order (see `dyngate build --list`).
        technique_options: per technique, option name -> value (checked by its config dataclass).
        repository: Triton model repository to write.
        cache_dir: where presets and other reusable artefacts live.
        data: data setting (folder or "hf:<datasets id>"); None = $DYNGATE_DATA or ../shared/data.
        eval_limit: dev examples for the task metric (None = the whole split).
        check_limit: dev examples for the agreement check against the FP32 reference (None = every dev example
            the build evaluates, so top-1 agreement and max |Δlogit| describe the same split as the metric).
        latency_samples: batch-1 requests timed in process per variant.
        native: also write the native flavour (onnxruntime_onnx / pytorch_libtorch) where a variant has one.
        serving: how variants are served (batching, instances, threads per instance; one place for all
            of it, see ServingOptions); the build's in-process checks and latency use the same threads.
    """

    model: str
    techniques: tuple[str, ...] = DEFAULT_TECHNIQUES
    technique_options: dict = field(default_factory=dict)
    repository: Path = Path("model_repository")
    cache_dir: Path = Path(".cache")
    data: str | None = None
    eval_limit: int | None = 1000
    check_limit: int | None = None
    latency_samples: int = 100
    native: bool = True
    serving: ServingOptions = field(default_factory=ServingOptions)

    def __post_init__(self):
        from dyngate_build.sources import check_location

        check_location(self.model)  # a misspelt preset is refused here, before any work or network
        if not self.techniques:
            raise ConfigError("techniques is empty; name at least one, e.g. fp32")
        for name, value in (("check_limit", self.check_limit), ("latency_samples", self.latency_samples)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be ≥1")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit={self.eval_limit} must be ≥1 (or None for the whole split)")
        unknown = set(self.technique_options) - set(self.techniques)
        if unknown:
            raise ConfigError(f"options given for technique(s) not being built: {', '.join(sorted(unknown))}")


@dataclass
class VariantReport:
    """What the build measured for one variant (also written to its metadata.json)."""

    triton_name: str
    variant: str
    technique: str
    size_bytes: int
    metric: MetricRecord
    agreement: AgreementRecord
    latency: LatencyRecord
    native_name: str | None = None


def _metadata(source, variant: Variant, name: str, flavour: str, size: int, metric: MetricRecord,
              reference: MetricRecord, agree: AgreementRecord, lat: LatencyRecord,
              serving: ServingOptions) -> VariantMetadata:
    family = source.family
    return VariantMetadata(
        model=source.name, variant=variant.name, triton_name=name, flavour=flavour,
        technique=variant.technique, params=variant.params, engine=variant.engine,
        source=SourceRecord(location=source.location, checkpoint=source.checkpoint, model_type=family.model_type,
                            hf_class=family.hf_class, task=family.task),
        labels=source.labels, client_input=family.client_input,
        size_bytes=size, size_mb=round(size / 1e6, 3),
        num_parameters=variant.num_parameters or int(sum(p.numel() for p in source.model.parameters())),
        accuracy=metric, reference_accuracy=reference, agreement=agree,
        tolerance=ToleranceRecord(max_abs_logit=variant.tolerance.max_abs_logit,
                                  min_top1_agreement=variant.tolerance.min_top1_agreement),
        latency_in_process=dataclasses.replace(lat, batch_size=1, threads=serving.threads),
        serving=ServingRecord(**serving.as_dict()),
        notes=variant.notes,
        technique_report=variant.report,
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=MachineRecord(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
        dyngate_version=__version__,
    )


def check_agreement(variant: Variant, agree: AgreementRecord) -> None:
    """ExportError when `agree` is outside the variant's tolerance (nothing is written then)."""
    tol = variant.tolerance
    if agree.max_abs_logit > tol.max_abs_logit or agree.top1 < tol.min_top1_agreement:
        raise ExportError(
            f"variant {variant.name!r} disagrees with the FP32 PyTorch reference on {agree.n} dev inputs: "
            f"max |Δlogit| {agree.max_abs_logit:.3g} (allowed ≤{tol.max_abs_logit:g}), top-1 agreement "
            f"{agree.top1:.2%} (required ≥{tol.min_top1_agreement:.0%}); nothing was written")


def build(options: BuildOptions, log=print,
          after_publish: Callable[[list[Published]], None] | None = None) -> list[VariantReport]:
    """Run one build (see module docstring). Returns one report per variant.

    after_publish: called with every `Published` model once all are in the repository (e.g. a roll-out to a
    running Triton); it may `undo()` models it gives up on, and what it raises propagates. None: keep
    `repository.KEEP_PREVIOUS_VERSIONS` previous version folders per model (`repository.keep_previous_version`).
    Raises ConfigError/SourceError before anything is written; ExportError when a variant fails its check or
    its exported file cannot be loaded (the repository is then left as it was).
    """
    from dyngate_build.data import DataSource, load_examples
    from dyngate_build.sources import load_source

    repeated = sorted({t for t in options.techniques if options.techniques.count(t) > 1})
    if repeated:
        raise ConfigError(f"techniques {', '.join(repeated)} named more than once; give each technique once")
    if Path(options.repository).exists() and not Path(options.repository).is_dir():
        raise ConfigError(f"repository {options.repository} is a file; give a folder for the Triton model "
                          "repository (it is created when missing)")
    configs = {name: make_config(name, options.technique_options.get(name)) for name in options.techniques}
    data_source = DataSource.from_setting(options.data)
    source = load_source(options.model, options.cache_dir, data_source)
    for name, config in configs.items():
        check = get_technique(name).check
        if check is not None:
            check(source, config)
    task = source.family.task
    examples, _ = load_examples(task, "dev", data_source, limit=options.eval_limit)
    calibration = []
    if any(get_technique(n).needs_calibration for n in options.techniques):
        calibration, _ = load_examples(task, "train", data_source, limit=CALIBRATION_EXAMPLES)
        if not calibration:
            raise ConfigError(f"calibration data is empty: {data_source.describe()} gave no training examples")
    raws = [ex.raw for ex in examples]
    log(f"{source.name}: {source.family.hf_class}, {len(examples)} dev examples, "
        f"techniques: {', '.join(options.techniques)}")

    reports: list[VariantReport] = []
    with tempfile.TemporaryDirectory(prefix="dyngate-build-") as tmp, \
            staged_repository(options.repository, after_publish or _keep_previous_versions(log)) as staging:
        work_dir = Path(tmp)
        reference = reference_predictor(source, work_dir, options.serving.threads)
        context = BuildContext(source=source, work_dir=work_dir, calibration=calibration, reference=reference,
                               dev=examples)
        reference_predictions = run_predictor(reference, raws)
        reference_metric = task_metric(task, reference_predictions, examples, source.labels)
        log(f"  PyTorch FP32 reference: {reference_metric.name} {reference_metric.value:.4f}")
        measure = _Measure(examples, reference_predictions, reference_metric,
                           raws[: options.check_limit], raws[: options.latency_samples])
        for technique_name in options.techniques:
            variant = get_technique(technique_name).apply(context, configs[technique_name])
            with torch_threads_kept():
                report = _write_variant(staging, source, variant, options, measure)
            reports.append(report)
            log(f"  {report.triton_name}: {report.metric.name} {report.metric.value:.4f}, "
                f"max|Δlogit| {report.agreement.max_abs_logit:.2e}, top-1 {report.agreement.top1:.2%}, "
                f"{report.size_bytes / 1e6:.2f} MB, p50 {report.latency.p50_ms:.2f} ms")
    log(summary_table(source.name, reference_metric, reports))
    fastest = fastest_int8(reports)
    if fastest:
        log(fastest)
    return reports


def not_built_alike(options: BuildOptions) -> list[str]:
    """Why `build(options)` would write to its repository: one line per requested technique whose variant is
    missing there or was built otherwise; [] when every one is there, built alike (`dyngate build --skip-existing`).

    Built alike: metadata.json of its python-flavour model (`<model>__<technique>`) names the same source as
    given (`options.model`), the same serving settings (ServingOptions) and this dyngate version. Technique options
    are not recorded as given (metadata keeps the settings a technique derived from them), so a build with
    `technique_options` never counts as alike; the data setting and the evaluation counts are not compared.
    Raises StaleRepositoryError when a metadata.json was written by an older dyngate (rebuild then).
    """
    if options.technique_options:
        return [f"technique options given ({', '.join(sorted(options.technique_options))}): the build compares "
                "only builds without them"]
    model = model_name_for(options.model)
    built = {e.metadata.technique: e.metadata for e in list_models(options.repository)
             if e.metadata is not None and not e.native and e.metadata.model == model}
    serving = ServingRecord(**options.serving.as_dict())
    reasons = []
    for technique in options.techniques:
        metadata = built.get(technique)
        if metadata is None:
            reasons.append(f"{model}: {technique} is not in {options.repository}")
        elif metadata.source.location != options.model:
            reasons.append(f"{model}: {technique} was built from {metadata.source.location}, not {options.model}")
        elif metadata.serving != serving:
            reasons.append(f"{model}: {technique} was built with serving settings {metadata.serving}, not {serving}")
        elif metadata.dyngate_version != __version__:
            reasons.append(f"{model}: {technique} was built by dyngate {metadata.dyngate_version}, this is "
                           f"{__version__}")
    return reasons


INT8_TECHNIQUES = ("int8-dynamic", "int8-static", "smoothquant", "zeroquant-w8a8", "zeroquant-w4a8")


def fastest_int8(reports: list[VariantReport]) -> str | None:
    """One line naming the INT8 variant with the lowest in-process p50 of this build, on this machine (CPU
    name and core count), with the others' p50; None when fewer than two INT8 variants were built."""
    int8 = sorted((r for r in reports if r.technique in INT8_TECHNIQUES), key=lambda r: r.latency.p50_ms)
    if len(int8) < 2:
        return None
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    others = ", ".join(f"{r.variant} {r.latency.p50_ms:.2f} ms" for r in int8[1:])
    return (f"fastest INT8 variant on this machine ({machine}): {int8[0].variant} p50 {int8[0].latency.p50_ms:.2f} ms "
            f"(batch 1, in process; {others})")


def _keep_previous_versions(log) -> Callable[[list[Published]], None]:
    """The default after_publish: `keep_previous_version` for every published model."""

    def after(published: list[Published]) -> None:
        for p in published:
            keep_previous_version(p, log)

    return after


@dataclass
class _Measure:
    """Inputs and reference answers every variant of one build is checked and measured on."""

    examples: list
    reference_predictions: list
    reference_metric: MetricRecord
    check_raws: list[bytes]
    latency_raws: list[bytes]


def summary_table(model: str, reference: MetricRecord, reports: list[VariantReport]) -> str:
    """The end-of-build table: one row per variant with metric, agreement (top-1 and max |Δlogit| against the
    FP32 reference on `n` dev examples), size, p50 and its speed-up over the fp32 variant (fp32 p50 / row p50;
    "–" when fp32 was not built)."""
    from rich.console import Console
    from rich.table import Table

    n = max((r.agreement.n for r in reports), default=0)
    table = Table(title=f"{model}: PyTorch FP32 {reference.name} {reference.value:.4f}; agreement with it on {n} "
                        f"dev examples")
    for column in ("variant", reference.name, "Δ pt", "max |Δlogit|", "top-1", "MB", "p50 ms", "× fp32"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    fp32 = next((r.latency.p50_ms for r in reports if r.variant == "fp32"), None)
    for r in reports:
        table.add_row(r.variant, f"{r.metric.value:.4f}", f"{(r.metric.value - reference.value) * 100:+.2f}",
                      f"{r.agreement.max_abs_logit:.2e}", f"{r.agreement.top1:.2%}", f"{r.size_bytes / 1e6:.2f}",
                      f"{r.latency.p50_ms:.2f}", f"{fp32 / r.latency.p50_ms:.2f}" if fp32 else "–")
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def _write_variant(staging: Path, source, variant: Variant, options: BuildOptions,
                   measure: _Measure) -> VariantReport:
    """Write, check and measure one variant (python flavour, then native), config.pbtxt last."""
    name = triton_name(source.name, variant.name)
    artifact_name = artifact_name_for(variant.engine, variant.artifact_name)
    version_dir = write_variant_folder(staging / name / str(VERSION), source, variant.engine, variant.artifact,
                                       artifact_name=artifact_name, runtime=variant.runtime,
                                       threads=options.serving.threads)

    predictor = _load_checked(version_dir, artifact_name, variant)
    examples = measure.examples
    checked = run_predictor(predictor, measure.check_raws, options=variant.check_options)
    agree = agreement(checked, measure.reference_predictions[: len(checked)])
    check_agreement(variant, agree)
    if variant.check_options or len(checked) != len(examples):  # else the check already answered every example
        checked = run_predictor(predictor, [ex.raw for ex in examples])
    metric = task_metric(source.family.task, checked, examples, source.labels)
    # per-example answers in the version folder: the gateway chooses a cascade threshold from them
    dev_scores(source.family.task, checked, examples, source.labels).save(version_dir)
    lat = latency(predictor, measure.latency_raws)
    size = directory_size(version_dir / artifact_name)
    family = source.family
    metadata = _metadata(source, variant, name, "python", size, metric, measure.reference_metric, agree, lat,
                         options.serving)
    logits_rank = 2 if family.task == "token-classification" else 1
    finish_model(version_dir.parent, python_config(name, family.client_input, logits_rank, options.serving),
                 metadata)

    native_name = None
    if options.native and variant.native_platform:
        native_name = triton_name(source.name, variant.name, native=True)
        native_dir = write_variant_folder(staging / native_name / str(VERSION), source, variant.engine,
                                          variant.artifact, artifact_name=artifact_name, native=True)
        image_size = source.image_spec.size[0] if source.image_spec else None
        serving = dataclasses.replace(options.serving, kind="KIND_GPU")
        config = native_config(native_name, variant.native_platform, family, len(source.labels), image_size,
                               serving)
        finish_model(native_dir.parent, config,
                     dataclasses.replace(metadata, triton_name=native_name, flavour="native"))
    return VariantReport(name, variant.name, variant.technique, size, metric, agree, lat, native_name)


def _load_checked(version_dir: Path, artifact_name: str, variant: Variant) -> Predictor:
    """Load the written version folder with the serving runtime; ExportError when its graph cannot be loaded
    (a corrupt or truncated export), so it never reaches the repository."""
    path = version_dir / artifact_name
    size = directory_size(path) if path.exists() else 0
    if size == 0:
        raise ExportError(f"variant {variant.name!r}: the exported {artifact_name} is empty or missing "
                          f"(technique {variant.technique}); nothing was written")
    try:
        return Predictor(str(version_dir))
    except Exception as e:  # onnxruntime / torch.jit raise their own types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"variant {variant.name!r}: the exported {artifact_name} ({size} bytes) cannot be "
                          f"loaded by {variant.engine} ({type(e).__name__}: {first}); the export is corrupt or "
                          "truncated; nothing was written") from e
