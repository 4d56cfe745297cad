"""`dyngate build`: source model -> every requested variant -> checked, measured, written to the repository.

For one model:
1. every technique config is checked before any work (unknown names and bad options raise ConfigError);
2. the source loads (presets train or are reused) and the dev split is read;
3. the FP32 PyTorch reference answers the dev inputs through the serving runtime (same preprocessing);
4. each technique makes its variant; the variant's version folder is written to a staging repository and
   loaded with the very runtime Triton will use; it must agree with the reference within its tolerance
   (else ExportError), then its dev metric, size and in-process p50 latency are measured;
5. metadata and config.pbtxt are written last, and the staging repository moves into place only when every
   variant succeeded: a new variant's folder moves in whole, a rebuilt one gets the next version folder
   (`<model>__<variant>/2/` beside `1/`; see build/dyngate_build/repository.py), never a replaced folder;
6. with `triton_url`, the running Triton loads every rebuilt variant it was serving (and every new
   python-backend variant): it moves traffic to the new version once that is ready, then the old version
   folders are deleted (`dyngate_serving.triton_server.roll_out`). A variant whose new version Triton refuses is put
   back as it was (Triton never stopped serving the old one) and the build fails with Triton's reason.
   Without `triton_url` the previous version folder stays beside the new one for a Triton that still serves
   it (`dyngate reload` switches it over and removes it); older ones are deleted.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dyngate_build import __version__
from dyngate_build.errors import ConfigError, ExportError, ServingError
from dyngate_build.evaluate import (Agreement, Latency, Metric, TorchReferenceEngine, agreement, latency,
                            run_predictor, task_metric, torch_threads_kept)
from dyngate_build.repository import (MODEL_PY_SOURCE, RUNTIME_SOURCE, Published, ServingOptions, directory_size,
                              finish_model, native_config, python_config, remove_versions, staged_repository,
                              triton_name, write_version)
from dyngate_build.runtime import TOKENIZER_FILE, Predictor, RuntimeSpec
from dyngate_build.techniques import BuildContext, Variant, get_technique, make_config

DEFAULT_TECHNIQUES = ("fp32", "torchscript")
VERSION = 1
CALIBRATION_EXAMPLES = 1024
ARTIFACT_NAMES = {"onnxruntime": "model.onnx", "torchscript": "model.pt"}


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
        check_limit: dev examples for the agreement check against the FP32 reference.
        latency_samples: batch-1 requests timed in process per variant.
        native: also write the native flavour (onnxruntime_onnx / pytorch_libtorch) where a variant has one.
        serving: how variants are served (batching, instances, threads per instance; one place for all
            of it, see ServingOptions); the build's in-process checks and latency use the same threads.
        triton_url: HTTP endpoint of a running Triton (explicit model control) to roll the new versions out
            to, e.g. "http://127.0.0.1:8000"; None: only write the repository.
    """

    model: str
    techniques: tuple[str, ...] = DEFAULT_TECHNIQUES
    technique_options: dict = field(default_factory=dict)
    repository: Path = Path("model_repository")
    cache_dir: Path = Path(".cache")
    data: str | None = None
    eval_limit: int | None = 1000
    check_limit: int = 64
    latency_samples: int = 100
    native: bool = True
    serving: ServingOptions = field(default_factory=ServingOptions)
    triton_url: str | None = None

    def __post_init__(self):
        if not self.techniques:
            raise ConfigError("techniques is empty; name at least one, e.g. fp32")
        for name, value in (("check_limit", self.check_limit), ("latency_samples", self.latency_samples)):
            if value < 1:
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
    metric: Metric
    agreement: Agreement
    latency: Latency
    native_name: str | None = None


def runtime_spec(source, engine: str, threads: int, overrides: dict | None = None,
                 artifact: str | None = None) -> RuntimeSpec:
    """The RuntimeSpec of a variant of `source` run by `engine` (what model.py and the build's checks load).

    overrides: the variant's RuntimeSpec changes (input_dtype, device, extra).
    artifact: graph file or folder name in the version folder (default: model.onnx / model.pt by engine).
    """
    family = source.family
    extra = {}
    if source.tokenizer is not None:
        extra["pad_token_id"] = int(source.tokenizer.pad_token_id or 0)
    spec = RuntimeSpec(
        task=family.task, client_input=family.client_input, engine=engine,
        artifact=artifact or ARTIFACT_NAMES[engine], graph_inputs=list(family.onnx_inputs), labels=source.labels,
        max_length=source.max_length, image=source.image_spec, threads=threads, extra=extra)
    for key, value in (overrides or {}).items():
        if key == "extra":
            spec.extra.update(value)
        else:
            setattr(spec, key, value)
    return spec


def _preprocessing_files(source, work_dir: Path) -> dict[str, Path]:
    if source.tokenizer is None:
        return {}
    path = work_dir / TOKENIZER_FILE
    if not path.exists():
        source.tokenizer.backend_tokenizer.save(str(path))
    return {TOKENIZER_FILE: path}


def reference_predictor(source, work_dir: Path, threads: int = 0) -> Predictor:
    """A Predictor whose engine is the in-memory PyTorch model: preprocessing and answers as served."""
    folder = work_dir / "reference"
    folder.mkdir()
    for name, path in _preprocessing_files(source, work_dir).items():
        shutil.copyfile(path, folder / name)
    runtime_spec(source, "onnxruntime", threads).save(str(folder))
    return Predictor(str(folder), engine=TorchReferenceEngine(source.model, source.family.onnx_inputs))


def _metadata(source, variant: Variant, name: str, flavour: str, size: int, metric: Metric, reference: Metric,
              agree: Agreement, lat: Latency, serving: ServingOptions) -> dict:
    return {
        "model": source.name, "variant": variant.name, "triton_name": name, "flavour": flavour,
        "technique": variant.technique, "params": variant.params, "engine": variant.engine,
        "source": {"location": source.location, "checkpoint": source.checkpoint,
                   "model_type": source.family.model_type, "hf_class": source.family.hf_class,
                   "task": source.family.task},
        "labels": source.labels, "client_input": source.family.client_input,
        "size_bytes": size, "size_mb": round(size / 1e6, 3),
        "num_parameters": variant.num_parameters or int(sum(p.numel() for p in source.model.parameters())),
        "accuracy": metric.as_dict(), "reference_accuracy": reference.as_dict(),
        "agreement": agree.as_dict(),
        "tolerance": {"max_abs_logit": variant.tolerance.max_abs_logit,
                      "min_top1_agreement": variant.tolerance.min_top1_agreement},
        "latency_in_process": {**lat.as_dict(), "batch_size": 1, "threads": serving.threads},
        "serving": serving.as_dict(),
        "notes": variant.notes,
        "technique_report": variant.report,
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "dyngate_version": __version__,
    }


def _check(variant: Variant, agree: Agreement) -> None:
    tol = variant.tolerance
    if agree.max_abs_logit > tol.max_abs_logit or agree.top1 < tol.min_top1_agreement:
        raise ExportError(
            f"variant {variant.name!r} disagrees with the FP32 PyTorch reference on {agree.n} dev inputs: "
            f"max |Δlogit| {agree.max_abs_logit:.3g} (allowed ≤{tol.max_abs_logit:g}), top-1 agreement "
            f"{agree.top1:.2%} (required ≥{tol.min_top1_agreement:.0%}); nothing was written")


def build(options: BuildOptions, log=print) -> list[VariantReport]:
    """Run one build (see module docstring). Returns one report per variant.

    Raises ConfigError/SourceError before anything is written; ExportError when a variant fails its check or
    its exported file cannot be loaded (the repository is then left as it was); ServingError when
    `options.triton_url` is set and Triton cannot be reached (before any work) or refuses a new version (that
    variant is then put back as it was, Triton still serving its previous version).
    """
    from dyngate_build.data import DataSource, load_examples
    from dyngate_build.sources import load_source

    control = None
    if options.triton_url:
        from dyngate_serving.triton_server import ModelControl

        control = ModelControl(options.triton_url)
        control.index()  # unreachable: fail now, not after the work

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
            staged_repository(options.repository, _after_publish(control, log)) as staging:
        work_dir = Path(tmp)
        reference = reference_predictor(source, work_dir, options.serving.threads)
        context = BuildContext(source=source, work_dir=work_dir, calibration=calibration, reference=reference,
                               dev=examples)
        reference_predictions = run_predictor(reference, raws)
        reference_metric = task_metric(task, reference_predictions, examples, source.labels)
        log(f"  PyTorch FP32 reference: {reference_metric.name} {reference_metric.value:.4f}")
        measure = _Measure(examples, reference_predictions, reference_metric,
                           raws[: options.check_limit], raws[: options.latency_samples])
        preprocessing = _preprocessing_files(source, work_dir)
        for technique_name in options.techniques:
            variant = get_technique(technique_name).apply(context, configs[technique_name])
            with torch_threads_kept():
                report = _write_variant(staging, source, variant, preprocessing, options, measure)
            reports.append(report)
            log(f"  {report.triton_name}: {report.metric.name} {report.metric.value:.4f}, "
                f"max|Δlogit| {report.agreement.max_abs_logit:.2e}, top-1 {report.agreement.top1:.2%}, "
                f"{report.size_bytes / 1e6:.2f} MB, p50 {report.latency.p50_ms:.2f} ms")
    log(summary_table(source.name, reference_metric, reports))
    return reports


def _after_publish(control, log):
    """What happens once the build's models are in the repository (see the module docstring, step 6)."""

    def keep_one_previous(p: Published) -> None:
        removed = remove_versions(p.folder, p.previous[:-1])
        if p.previous:
            log(f"  {p.name}: version {p.version} written; version {p.previous[-1]} kept for a Triton that may still "
                f"serve it (`dyngate reload` or `dyngate build --triton-url` switches over and removes it)"
                + (f"; removed older version(s) {removed}" if removed else ""))

    def after(published: list[Published]) -> None:
        if control is None:
            for p in published:
                keep_one_previous(p)
            return
        from dyngate_serving.triton_server import roll_out

        pending = list(published)
        try:
            loaded = control.ready_models()
            while pending:
                p = pending[0]
                if p.name in loaded or (p.is_new and p.backend == "python"):
                    roll_out(control, p.folder, log)
                else:  # not served by this Triton (e.g. a native flavour on the embedded server)
                    keep_one_previous(p)
                pending.pop(0)
        except ServingError as e:
            for p in pending:
                p.undo()
            names = ", ".join(p.name for p in pending)
            raise ServingError(f"{e}. The repository keeps {names} as before this build") from e

    return after


@dataclass
class _Measure:
    """Inputs and reference answers every variant of one build is checked and measured on."""

    examples: list
    reference_predictions: list
    reference_metric: Metric
    check_raws: list[bytes]
    latency_raws: list[bytes]


def summary_table(model: str, reference: Metric, reports: list[VariantReport]) -> str:
    """The end-of-build table: one row per variant with metric, agreement, size and p50 next to the first row's."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}: PyTorch FP32 {reference.name} {reference.value:.4f}")
    for column in ("variant", reference.name, "Δ pt", "max |Δlogit|", "top-1", "MB", "p50 ms", "× first"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    base = reports[0].latency.p50_ms if reports else 1.0
    for r in reports:
        table.add_row(r.variant, f"{r.metric.value:.4f}", f"{(r.metric.value - reference.value) * 100:+.2f}",
                      f"{r.agreement.max_abs_logit:.2e}", f"{r.agreement.top1:.2%}", f"{r.size_bytes / 1e6:.2f}",
                      f"{r.latency.p50_ms:.2f}", f"{r.latency.p50_ms / base:.2f}")
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def _write_variant(staging: Path, source, variant: Variant, preprocessing: dict, options: BuildOptions,
                   measure: _Measure) -> VariantReport:
    """Write, check and measure one variant (python flavour, then native), config.pbtxt last."""
    name = triton_name(source.name, variant.name)
    artifact_name = variant.artifact_name or ARTIFACT_NAMES.get(variant.engine)
    if artifact_name is None:
        raise ValueError(f"variant {variant.name!r} runs engine {variant.engine!r}: set Variant.artifact_name")
    files = {**preprocessing, "model.py": MODEL_PY_SOURCE, "dyngate_runtime.py": RUNTIME_SOURCE}
    version_dir = write_version(staging, name, VERSION, files)
    _copy_artifact(variant.artifact, version_dir / artifact_name)
    runtime_spec(source, variant.engine, options.serving.threads, variant.runtime, artifact_name).save(
        str(version_dir))

    predictor = _load_checked(version_dir, artifact_name, variant)
    checked = run_predictor(predictor, measure.check_raws, options=variant.check_options)
    agree = agreement(checked, measure.reference_predictions[: len(checked)])
    _check(variant, agree)
    examples = measure.examples
    metric = task_metric(source.family.task, run_predictor(predictor, [ex.raw for ex in examples]),
                         examples, source.labels)
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
        native_dir = write_version(staging, native_name, VERSION, {})
        _copy_artifact(variant.artifact, native_dir / artifact_name)
        image_size = source.image_spec.size[0] if source.image_spec else None
        serving = dataclasses.replace(options.serving, kind="KIND_GPU")
        config = native_config(native_name, variant.native_platform, family, len(source.labels), image_size,
                               serving)
        finish_model(native_dir.parent, config, {**metadata, "triton_name": native_name, "flavour": "native"})
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


def _copy_artifact(artifact: Path, target: Path) -> None:
    if Path(artifact).is_dir():
        shutil.copytree(artifact, target)
    else:
        shutil.copyfile(artifact, target)
