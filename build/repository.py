"""The Triton model repository: naming, config.pbtxt generation, atomic writes, and reading it back.

Layout of one variant (python-backend flavour, served by the embedded Triton and NVIDIA's container):

    <repository>/<model>__<variant>/config.pbtxt
    <repository>/<model>__<variant>/metadata.json        source, technique, params, size, accuracy, agreement
    <repository>/<model>__<variant>/1/model.py           build/triton_model.py
    <repository>/<model>__<variant>/1/dyngate_runtime.py build/runtime.py
    <repository>/<model>__<variant>/1/runtime.json       RuntimeSpec
    <repository>/<model>__<variant>/1/model.onnx|model.pt, tokenizer.json

and, when the variant has one, the native flavour `<model>__<variant>__native` (platform onnxruntime_onnx or
pytorch_libtorch, token-id / pixel inputs, for NVIDIA's tritonserver container).

Configs are built as data, parsed into `model_config_pb2.ModelConfig` and written with protobuf's
text_format (as Model Navigator does), so a bad field fails at build time. Model files are written first and
config.pbtxt last. A whole build is staged beside the repository and moved in only when every variant
succeeded (`staged_repository`), so a failed build leaves the repository as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.errors import ConfigError, RepositoryError

SEPARATOR = "__"
NATIVE_SUFFIX = "native"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 2000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")

RUNTIME_SOURCE = Path(__file__).with_name("runtime.py")
MODEL_PY_SOURCE = Path(__file__).with_name("triton_model.py")


def check_name(field: str, value: str) -> str:
    """Return `value` if it is a safe model or variant name, else raise ConfigError.

    Allowed: letters, digits, '.', '-' (starting with a letter or digit); no '..', no '__', no path separators.
    """
    if not _NAME.match(value or "") or ".." in value:
        raise ConfigError(f"{field}={value!r} is not a valid name: use letters, digits, '.' and '-' only "
                          "(no '/', '..' or '__'), starting with a letter or digit")
    return value


def triton_name(model: str, variant: str, native: bool = False) -> str:
    """Triton model name of a variant: `<model>__<variant>` (+ `__native` for the native flavour)."""
    parts = [check_name("model", model), check_name("variant", variant)] + ([NATIVE_SUFFIX] if native else [])
    return SEPARATOR.join(parts)


def model_name_for(source: str) -> str:
    """A repository-safe model name from a preset name, hub id ("org/name") or local folder path."""
    base = source.rstrip("/").replace("\\", "/")
    if os.path.isdir(base):
        base = os.path.basename(base)
    base = base.replace("/", "--").replace("_", "-")
    base = re.sub(r"[^A-Za-z0-9.-]", "-", base).strip(".-")
    return check_name("model", re.sub(r"\.{2,}", ".", base) or "model")


# ---------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class ServingOptions:
    """Triton scheduling settings written into every config.

    max_batch_size: largest batch Triton forms (requests x items). queue_delay_us: dynamic batching window
    in microseconds. instances: model instances (processes for the python backend). kind: KIND_CPU/KIND_GPU.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = 1
    kind: str = "KIND_CPU"

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size} must be ≥1")
        if self.instances < 1:
            raise ConfigError(f"instances={self.instances} must be ≥1")
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise ConfigError(f"kind={self.kind!r}; choose KIND_CPU or KIND_GPU")


def _to_proto(config: dict) -> model_config_pb2.ModelConfig:
    try:
        from google.protobuf import json_format

        return json_format.ParseDict(config, model_config_pb2.ModelConfig())
    except Exception as e:  # protobuf raises ParseError with the bad field
        raise RepositoryError(f"invalid Triton model config for {config.get('name')!r}: {e}") from e


def _scheduling(options: ServingOptions) -> dict:
    return {
        "max_batch_size": options.max_batch_size,
        "dynamic_batching": {"max_queue_delay_microseconds": options.queue_delay_us},
        "instance_group": [{"count": options.instances, "kind": options.kind}],
        "version_policy": {"latest": {"num_versions": 1}},
    }


def python_config(name: str, client_input: str, logits_rank: int, options: ServingOptions) -> dict:
    """Config of the python-backend flavour: raw BYTES in, JSON RESULT and FP32 LOGITS out.

    logits_rank: 1 for [C] per item (classification), 2 for [L, C] (token classification).
    """
    return {
        "name": name, "backend": "python", **_scheduling(options),
        "input": [{"name": client_input, "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": "RESULT", "data_type": "TYPE_STRING", "dims": [1]},
                   {"name": "LOGITS", "data_type": "TYPE_FP32", "dims": [-1] * logits_rank}],
    }


def native_config(name: str, platform: str, family, num_labels: int, image_size: int | None,
                  options: ServingOptions) -> dict:
    """Config of the native flavour (onnxruntime_onnx / pytorch_libtorch): token ids or pixels in, logits out.

    libtorch names outputs `<name>__<index>`; inputs keep the forward() argument names.
    """
    if family.is_text:
        inputs = [{"name": n, "data_type": "TYPE_INT64", "dims": [-1]} for n in family.onnx_inputs]
    else:
        inputs = [{"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [3, image_size, image_size]}]
    dims = [-1, num_labels] if family.task == "token-classification" else [num_labels]
    output = "logits__0" if platform == "pytorch_libtorch" else "logits"
    return {"name": name, "platform": platform, **_scheduling(options), "input": inputs,
            "output": [{"name": output, "data_type": "TYPE_FP32", "dims": dims}]}


def write_config(folder: Path, config: dict) -> model_config_pb2.ModelConfig:
    """Validate `config` through ModelConfig and write folder/config.pbtxt (max_batch_size kept explicit)."""
    proto = _to_proto(config)
    text = text_format.MessageToString(proto)
    if "max_batch_size" not in text:  # protobuf drops zeros; Triton needs to see it
        text = f"max_batch_size: {proto.max_batch_size}\n" + text
    (folder / CONFIG_FILE).write_text(text)
    return proto


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    """Parse folder/config.pbtxt into ModelConfig; RepositoryError when missing or malformed."""
    path = folder / CONFIG_FILE
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise RepositoryError(f"cannot read {path}: {e}") from e


# ---------------------------------------------------------------------------------------------- writing

def directory_size(path: Path) -> int:
    """Bytes of all files under `path` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_version(root: Path, name: str, version: int, files: dict[str, Path]) -> Path:
    """Create `root/name/version/` holding `files` (name in the folder -> source path); returns that folder.

    The model files go first; `finish_model` writes metadata and config.pbtxt once the variant is checked.
    """
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=False)
    for target, source in files.items():
        shutil.copyfile(source, version_dir / target)
    return version_dir


def finish_model(folder: Path, config: dict, metadata: dict) -> model_config_pb2.ModelConfig:
    """Write folder/metadata.json, then folder/config.pbtxt (last: a folder with a config is complete)."""
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return write_config(folder, config)


@contextlib.contextmanager
def staged_repository(repository: Path):
    """Yield a staging folder beside `repository`; on success move every model folder in it into place.

    On any exception the staging folder is deleted and the repository is untouched. Existing model folders
    of the same names are replaced (each by two renames on the same filesystem).
    """
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.staging-", dir=repository.parent))
    trash = staging.with_name(staging.name.replace("staging", "trash"))
    try:
        yield staging
        trash.mkdir()
        for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
            target = repository / folder.name
            if target.exists():
                target.rename(trash / folder.name)
            folder.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class RepositoryEntry:
    """One Triton model of the repository, as the gateway and clients see it."""

    name: str
    folder: Path
    backend: str
    metadata: dict

    @property
    def model(self) -> str:
        return self.metadata.get("model", self.name.split(SEPARATOR)[0])

    @property
    def variant(self) -> str:
        return self.metadata.get("variant", self.name.split(SEPARATOR)[-1])

    @property
    def native(self) -> bool:
        return self.name.endswith(SEPARATOR + NATIVE_SUFFIX)


def list_models(repository: Path) -> list[RepositoryEntry]:
    """Every model folder with a readable config.pbtxt, sorted by name (staging folders are never inside)."""
    entries = []
    repository = Path(repository)
    if not repository.is_dir():
        return entries
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / CONFIG_FILE).exists():
            continue
        config = read_config(folder)
        meta_path = folder / METADATA_FILE
        metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        entries.append(RepositoryEntry(folder.name, folder, config.backend or config.platform, metadata))
    return entries


def python_backend_models(repository: Path) -> list[str]:
    """Names of the models the embedded Triton (python backend only) can load."""
    return [e.name for e in list_models(repository) if e.backend == "python"]
