"""The one writer of a servable version folder, and the runtime settings every variant folder carries.

A version folder holds what `model.py` (build/dyngate_build/triton_model.py) and the in-process checks load:

    <folder>/model.py              build/dyngate_build/triton_model.py
    <folder>/dyngate_runtime.py    build/dyngate_build/runtime.py
    <folder>/tokenizer.json        text families
    <folder>/model.onnx|model.pt|early_exit/   the graph (the artifact)
    <folder>/runtime.json          RuntimeSpec, written last: a folder with one is complete

The build (`dyngate_build.pipeline`), the early-exit technique (its threshold curve) and the benchmark write
their folders through `write_variant_folder`; metadata.json and config.pbtxt beside the version folders are the
repository's (`dyngate_build.repository.finish_model`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dyngate_build.repository import MODEL_PY_SOURCE, RUNTIME_SOURCE
from dyngate_build.runtime import TOKENIZER_FILE, Predictor, RuntimeSpec

ARTIFACT_NAMES = {"onnxruntime": "model.onnx", "torchscript": "model.pt"}


def runtime_spec(source, engine: str, threads: int, overrides: dict | None = None,
                 artifact: str | None = None) -> RuntimeSpec:
    """The RuntimeSpec of a variant of `source` run by `engine` (what model.py and the build's checks load).

    source: dyngate_build.sources.Source. threads: intra-op threads (0 = library default).
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


def artifact_name_for(engine: str, artifact_name: str | None = None) -> str:
    """The graph's name in the version folder: `artifact_name`, else model.onnx / model.pt by engine.

    Raises ValueError for an engine without a default name (a technique must then set Variant.artifact_name).
    """
    name = artifact_name or ARTIFACT_NAMES.get(engine)
    if name is None:
        raise ValueError(f"engine {engine!r} has no default artifact name: set Variant.artifact_name")
    return name


def copy_artifact(artifact: Path, target: Path) -> None:
    """Copy a graph file, or a folder of graph files, to `target`."""
    if Path(artifact).is_dir():
        shutil.copytree(artifact, target)
    else:
        shutil.copyfile(artifact, target)


def write_variant_folder(folder: Path, source, engine: str, artifact: Path | None, *,
                         artifact_name: str | None = None, runtime: dict | None = None, threads: int = 0,
                         native: bool = False) -> Path:
    """Create the version folder `folder` (it must not exist) for a variant of `source`; returns it.

    Order: serving code and tokenizer.json, then the artifact (copied in as `artifact_name`, default by
    engine), then runtime.json last. artifact None writes a folder without a graph (the PyTorch reference
    runs in memory). runtime: RuntimeSpec overrides (Variant.runtime). native: the native flavour's folder
    (onnxruntime_onnx / pytorch_libtorch), which holds the graph alone. Raises FileExistsError when `folder`
    exists, ValueError when the engine has no default artifact name and none is given.
    """
    folder = Path(folder)
    name = artifact_name_for(engine, artifact_name) if artifact is not None or not native else None
    folder.mkdir(parents=True, exist_ok=False)
    if not native:
        shutil.copyfile(MODEL_PY_SOURCE, folder / "model.py")
        shutil.copyfile(RUNTIME_SOURCE, folder / "dyngate_runtime.py")
        if source.tokenizer is not None:
            source.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
    if artifact is not None:
        copy_artifact(artifact, folder / name)
    if not native:
        runtime_spec(source, engine, threads, runtime, name).save(str(folder))
    return folder


def reference_predictor(source, work_dir: Path, threads: int = 0) -> Predictor:
    """A Predictor whose engine is the in-memory PyTorch model: preprocessing and answers as served.

    Writes `work_dir/reference/` (tokenizer, runtime.json, no graph). Output: runtime answers with float32
    logits [C] per item ([L, C] for token classification).
    """
    from dyngate_build.evaluate import TorchReferenceEngine

    folder = write_variant_folder(Path(work_dir) / "reference", source, "onnxruntime", None, threads=threads)
    return Predictor(str(folder), engine=TorchReferenceEngine(source.model, source.family.onnx_inputs))
