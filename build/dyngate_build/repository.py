"""The Triton model repository: naming, config.pbtxt generation, atomic writes, and reading it back.

Layout of one variant (python-backend flavour, served by the embedded Triton and NVIDIA's container):

    <repository>/<model>__<variant>/config.pbtxt
    <repository>/<model>__<variant>/metadata.json        source, technique, params, size, accuracy, agreement,
                                                         version (the version folder it describes)
    <repository>/<model>__<variant>/<N>/model.py           build/dyngate_build/triton_model.py
    <repository>/<model>__<variant>/<N>/dyngate_runtime.py build/dyngate_build/runtime.py
    <repository>/<model>__<variant>/<N>/runtime.json       RuntimeSpec
    <repository>/<model>__<variant>/<N>/model.onnx|model.pt, tokenizer.json

Version folders are written by `dyngate_build.variant_folder.write_variant_folder`; metadata.json is a
`dyngate_build.metadata.VariantMetadata`.

<N> is 1 for a first build and one more for every rebuild (see below).

and, when the variant has one, the native flavour `<model>__<variant>__native` (platform onnxruntime_onnx or
pytorch_libtorch, token-id / pixel inputs, for NVIDIA's tritonserver container).

Configs are built as data, parsed into `model_config_pb2.ModelConfig` and written with protobuf's
text_format (as Model Navigator does), so a bad field fails at build time. Model files are written first and
config.pbtxt last. A whole build is staged beside the repository and moved in only when every variant
succeeded (`staged_repository`), so a failed build leaves the repository as it was.

Rebuilding a variant that already exists never replaces its folder under a running Triton: the new build
becomes the next version folder (`<model>__<variant>/2/` beside `1/`, one rename from the staging folder),
then metadata.json and config.pbtxt are replaced with `os.replace`. Every config says
`version_policy: { latest { num_versions: 1 } }`, so a Triton asked to load the model (explicit model control)
loads the new version, moves traffic to it once it is ready and unloads the old one; the old folder is removed
once Triton no longer serves it (a roll-out in dyngate_serving, `dyngate build --triton`), or, without a
Triton to ask, kept for `KEEP_PREVIOUS_VERSIONS` more builds (`keep_previous_version`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from dyngate_build.errors import ConfigError, RepositoryError
from dyngate_build.metadata import METADATA_FILE, VariantMetadata, rebuild_hint
from dyngate_build.runtime import RUNTIME_FILE, RuntimeSpec, request_parameters

SEPARATOR = "__"
NATIVE_SUFFIX = "native"
CONFIG_FILE = "config.pbtxt"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")

RUNTIME_SOURCE = Path(__file__).with_name("runtime.py")
MODEL_PY_SOURCE = Path(__file__).with_name("triton_model.py")
FLOOR_PY_SOURCE = Path(__file__).with_name("floor_model.py")
FLOOR_NAME = "dyngate-floor"


def check_name(field: str, value: str) -> str:
    """Return `value` if it is a safe model or variant name, else raise ConfigError.

    Allowed: letters, digits, '.', '-' (starting with a letter or digit); no '..', no '__', no path separators.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:  # fullmatch: "$" allows "\n"
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

def machine_cores() -> int:
    """CPU cores this process may run on (the affinity mask, so a container's limit counts), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for(cores: int) -> int:
    """Intra-op threads per model instance on a machine with `cores` cores: 1 up to 2 cores, then half the
    cores, at most 4. Small encoders at batch ≤32 gain little past 4 threads, and the other half of the cores
    is left to Triton's front end, tokenization in the stubs and the clients (see `instances_for`)."""
    return 1 if cores <= 2 else min(4, cores // 2)


def instances_for(cores: int) -> int:
    """Model instances (python-backend stub processes) per variant: one per 2 x `threads_for(cores)` cores, at
    least 1 (2 cores: 1 instance of 1 thread; 16 cores: 2 instances of 4 threads)."""
    return max(1, cores // (2 * threads_for(cores)))


@dataclass(frozen=True)
class ServingOptions:
    """How every variant is served; the one place these are set. Written into each config.pbtxt
    (max_batch_size, dynamic_batching, instance_group; native flavours also get their backend's thread
    parameters), into each runtime.json (`threads`: ONNX Runtime intra_op_num_threads /
    torch.set_num_threads in the stub, one inter-op thread, no spinning) and into metadata.json ("serving"),
    which the Models tab shows.

    max_batch_size: largest batch Triton forms (requests x items).
    queue_delay_us: dynamic batching window in microseconds. 0 (measured, see DESIGN.md): a lone request never
        waits, and Triton still merges whatever queued while the instance was busy, so concurrent clients are
        batched anyway.
    instances: model instances per variant (processes for the python backend); default `instances_for` the
        machine's cores.
    threads: intra-op threads per instance (≥1); default `threads_for` the machine's cores.
    kind: KIND_CPU / KIND_GPU.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    instances: int = field(default_factory=lambda: instances_for(machine_cores()))
    threads: int = field(default_factory=lambda: threads_for(machine_cores()))
    kind: str = "KIND_CPU"

    def __post_init__(self):
        for name in ("max_batch_size", "instances", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"serving {name}={value!r} must be an integer ≥1")
        if not isinstance(self.queue_delay_us, int) or self.queue_delay_us < 0:
            raise ConfigError(f"serving queue_delay_us={self.queue_delay_us!r} must be an integer ≥0 (microseconds)")
        if self.kind not in ("KIND_CPU", "KIND_GPU"):
            raise ConfigError(f"serving kind={self.kind!r}; choose KIND_CPU or KIND_GPU")

    def as_dict(self) -> dict:
        """The settings as metadata.json stores them (and the Models tab reads them)."""
        return {"max_batch_size": self.max_batch_size, "queue_delay_us": self.queue_delay_us,
                "instances": self.instances, "threads": self.threads, "kind": self.kind}


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
            "output": [{"name": output, "data_type": "TYPE_FP32", "dims": dims}],
            "parameters": native_thread_parameters(platform, options.threads)}


def native_thread_parameters(platform: str, threads: int) -> dict:
    """Config `parameters` giving a native backend `threads` intra-op threads and one inter-op thread
    (onnxruntime backend: intra_op_thread_count / inter_op_thread_count; pytorch backend:
    INTRA_OP_THREAD_COUNT / INTER_OP_THREAD_COUNT)."""
    keys = (("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT") if platform == "pytorch_libtorch"
            else ("intra_op_thread_count", "inter_op_thread_count"))
    return {keys[0]: {"string_value": str(threads)}, keys[1]: {"string_value": "1"}}


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

def write_floor_model(repository: Path, client_input: str = "TEXT", logits_shape: tuple[int, ...] = (2,),
                      options: ServingOptions | None = None, name: str = FLOOR_NAME) -> Path:
    """Write the empty python-backend model (build/dyngate_build/floor_model.py) into `repository`; returns its folder.

    It has a variant's inputs and outputs (`client_input` BYTES [batch, 1] in; RESULT and LOGITS FP32
    [batch, *logits_shape] out) and the same scheduling (`options`, default `ServingOptions()`), and answers a
    constant: its round trip is the floor a served variant cannot go below. Raises RepositoryError when the
    folder exists already.
    """
    options = options or ServingOptions()
    folder = Path(repository) / check_name("name", name)
    if folder.exists():
        raise RepositoryError(f"{folder} exists already; write the floor model into an empty repository")
    write_version(Path(repository), name, 1, {"model.py": FLOOR_PY_SOURCE})
    config = python_config(name, client_input, len(logits_shape), options)
    config["parameters"] = {"logits_shape": {"string_value": ",".join(str(int(d)) for d in logits_shape)}}
    write_config(folder, config)  # no metadata.json: it is no variant, and the gateway lists none for it
    return folder


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


def finish_model(folder: Path, config: dict, metadata: VariantMetadata | dict) -> model_config_pb2.ModelConfig:
    """Write folder/metadata.json, then folder/config.pbtxt (last: a folder with a config is complete).

    metadata: what the build measured (VariantMetadata); a plain dict is written as given (hand-made models).
    """
    if isinstance(metadata, VariantMetadata):
        metadata.save(folder)
    else:
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return write_config(folder, config)


def version_numbers(folder: Path) -> list[int]:
    """The version folders (positive integer names) of one model folder, ascending; [] when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def newest_version_dir(folder: Path) -> Path:
    """The newest version folder of a model folder (what `latest { num_versions: 1 }` makes Triton serve).

    Raises RepositoryError when the model folder has no version folder.
    """
    versions = version_numbers(folder)
    if not versions:
        raise RepositoryError(f"{folder} has no version folder (1/, 2/, ...): rebuild it with `dyngate build`")
    return Path(folder) / str(versions[-1])


def remove_versions(folder: Path, versions) -> list[int]:
    """Delete the given version folders of a model folder (each renamed away first, then removed).

    Returns the versions removed. Refuses (RepositoryError) to remove the newest version: a model folder
    always keeps one version Triton can load.
    """
    folder = Path(folder)
    existing = version_numbers(folder)
    doomed = sorted(v for v in set(versions) if v in existing)
    if existing and existing[-1] in doomed:
        raise RepositoryError(f"refusing to remove version {existing[-1]} of {folder.name}: it is the newest; "
                              "a model folder keeps at least one version")
    for version in doomed:
        away = folder / f".removing-{version}-{os.getpid()}"
        (folder / str(version)).rename(away)  # gone from Triton's view at once, deleted below
        shutil.rmtree(away, ignore_errors=True)
    return doomed


@dataclass
class Published:
    """One model folder that a build moved into the repository.

    name: Triton model name. folder: its folder in the repository. version: the version folder the build
    added. previous: the versions that were there before (empty for a new model). backend: "python" or the
    native platform. `undo()` puts the repository back as it was for this model.
    """

    name: str
    folder: Path
    version: int
    previous: list[int]
    backend: str
    _backup: Path | None = field(default=None, repr=False)
    _trash: Path | None = field(default=None, repr=False)

    @property
    def is_new(self) -> bool:
        return not self.previous

    def undo(self) -> None:
        """Remove what the build added for this model and restore its previous config and metadata."""
        if self.is_new:
            if self.folder.exists():
                self.folder.rename(self._trash / f"{self.name}.undo")
            return
        for file in (METADATA_FILE, CONFIG_FILE):
            if (self._backup / file).exists():
                os.replace(self._backup / file, self.folder / file)
        new = self.folder / str(self.version)
        if new.exists():
            new.rename(self._trash / f"{self.name}.v{self.version}.undo")


def publish_model(staged: Path, repository: Path, trash: Path) -> Published:
    """Move one fully written staged model folder (`staged/1/`, metadata.json, config.pbtxt) into `repository`.

    A new model's folder moves in by one rename. For a model that is already there, the staged version folder
    becomes the next version (one rename), then metadata.json (with "version") and config.pbtxt (last) are
    replaced with os.replace; the old files are kept in `trash` so `Published.undo()` can restore them.
    `staging`, `trash` and `repository` must be on one filesystem. Raises RepositoryError when the staged folder
    is incomplete.
    """
    staged_versions = version_numbers(staged)
    if len(staged_versions) != 1 or not (staged / CONFIG_FILE).exists():
        raise RepositoryError(f"staged model {staged} must hold exactly one version folder and a config.pbtxt")
    target = Path(repository) / staged.name
    previous = version_numbers(target) if (target / CONFIG_FILE).exists() else []
    version = (previous[-1] + 1) if previous else staged_versions[0]
    meta_path = staged / METADATA_FILE
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    metadata["version"] = version
    meta_path.write_text(json.dumps(metadata, indent=2, default=str))
    backend = read_config(staged)
    published = Published(staged.name, target, version, previous, backend.backend or backend.platform,
                          _trash=trash)
    if not previous:
        if target.exists():  # a folder without config.pbtxt is not a model: set it aside, as before
            target.rename(trash / f"{staged.name}.incomplete")
        if version != staged_versions[0]:
            (staged / str(staged_versions[0])).rename(staged / str(version))
        staged.rename(target)
        return published
    backup = trash / f"{staged.name}.previous"
    backup.mkdir()
    published._backup = backup
    for file in (METADATA_FILE, CONFIG_FILE):
        if (target / file).exists():
            shutil.copy2(target / file, backup / file)
    (staged / str(staged_versions[0])).rename(target / str(version))
    os.replace(meta_path, target / METADATA_FILE)
    os.replace(staged / CONFIG_FILE, target / CONFIG_FILE)  # last: the folder is complete again
    return published


KEEP_PREVIOUS_VERSIONS = 2
"""How many version folders before the newest a build without a Triton to ask keeps (`keep_previous_version`).

A build without `--triton` cannot know which version a running Triton loaded (explicit model control keeps
serving what it loaded until it is told to reload), and each such build adds a version: with 2, the version a
Triton serves survives two builds without `--triton` and the third deletes it (found in a trial: keeping one, the
second build deleted the served folder). The newest version is never deleted whatever this count is."""


def keep_previous_version(published: Published, log=print) -> list[int]:
    """What a build does after publishing when no Triton is asked to roll out (`dyngate build` without
    `--triton`): delete old version folders, but keep those a Triton may still be serving.

    The rule counts versions: the newest one (the one just written, `published.version`) and the
    `KEEP_PREVIOUS_VERSIONS` versions before it (of `published.previous`) are never deleted; only older ones
    are. It cannot ask Triton, so a version a running Triton still serves is deleted once that many builds
    without `--triton` have followed it. `dyngate reload` or `dyngate build --triton HOST:PORT` switch Triton
    over and then delete every version it no longer holds (dyngate_serving.rollout.roll_out).

    Returns the versions removed; logs one line when previous versions are kept.
    """
    kept = published.previous[max(0, len(published.previous) - KEEP_PREVIOUS_VERSIONS):]
    removed = remove_versions(published.folder, [v for v in published.previous if v not in kept])
    if kept:
        log(f"  {published.name}: version {published.version} written; version(s) {', '.join(map(str, kept))} kept "
            f"for a Triton that may still serve them (`dyngate reload` or `dyngate build --triton` switches over and "
            f"removes them)" + (f"; removed older version(s) {removed}" if removed else ""))
    return removed


@contextlib.contextmanager
def staged_repository(repository: Path, after_publish=None):
    """Yield a staging folder beside `repository`; on success move every model folder in it into place.

    New models move in whole; models already in the repository get a new version folder (see
    `publish_model`), so nothing Triton is serving is replaced in place. On any exception before or while
    moving, the repository is put back as it was and the staging folder is deleted.

    after_publish: called with the list of `Published` models once all are in place (e.g. to make a running
    Triton load them: a roll-out in dyngate_serving); it may call `Published.undo()` for a model it gives
    up on. An exception it raises propagates after the staging folder is cleaned up.
    """
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.staging-", dir=repository.parent))
    trash = staging.with_name(staging.name.replace("staging", "trash"))
    try:
        yield staging
        trash.mkdir()
        published: list[Published] = []
        try:
            for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
                published.append(publish_model(folder, repository, trash))
        except BaseException:
            for done in reversed(published):
                done.undo()
            raise
        if after_publish is not None:
            after_publish(published)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class RepositoryEntry:
    """One Triton model of the repository, as the gateway and clients see it.

    metadata: its metadata.json, or None for a model folder without one (not written by dyngate build).
    """

    name: str
    folder: Path
    backend: str
    metadata: VariantMetadata | None

    @property
    def model(self) -> str:
        return self.metadata.model if self.metadata else self.name.split(SEPARATOR)[0]

    @property
    def variant(self) -> str:
        return self.metadata.variant if self.metadata else self.name.split(SEPARATOR)[-1]

    @property
    def native(self) -> bool:
        return self.name.endswith(SEPARATOR + NATIVE_SUFFIX)

    @property
    def versions(self) -> list[int]:
        """Its version folders on disk, ascending (the newest is what Triton loads)."""
        return version_numbers(self.folder)

    @functools.cached_property
    def request_parameters(self) -> tuple[str, ...] | None:
        """The request parameters its newest version reads (`dyngate_build.runtime.request_parameters` of that
        folder's runtime.json, e.g. ("exit_threshold",) for early exit); None when there is no runtime.json (a
        model folder dyngate build did not write: unknown). Read once per entry (`list_models` makes new ones).
        Raises RepositoryError when the runtime.json cannot be read (stale or broken)."""
        versions = self.versions
        folder = self.folder / str(versions[-1]) if versions else None
        if folder is None or not (folder / RUNTIME_FILE).exists():
            return None
        try:
            return request_parameters(RuntimeSpec.load(str(folder)))
        except (OSError, ValueError, TypeError) as e:  # RuntimeSpecVersionError and JSON errors are ValueErrors
            raise RepositoryError(f"cannot read {folder / RUNTIME_FILE}: {e}; {rebuild_hint(self.model)}") from None


def list_models(repository: Path) -> list[RepositoryEntry]:
    """Every model folder with a readable config.pbtxt, sorted by name (staging folders are never inside).

    Raises StaleRepositoryError (a RepositoryError) when a metadata.json was written by an older dyngate.
    """
    entries = []
    repository = Path(repository)
    if not repository.is_dir():
        return entries
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / CONFIG_FILE).exists():
            continue
        config = read_config(folder)
        metadata = VariantMetadata.load(folder) if (folder / METADATA_FILE).exists() else None
        entries.append(RepositoryEntry(folder.name, folder, config.backend or config.platform, metadata))
    return entries


def python_variants_by_model(repository: Path, models: list[str] | None = None) -> dict[str, list[RepositoryEntry]]:
    """Python-backend entries of `repository` grouped per model (sorted by model name), only `models` when
    given. ConfigError naming what is there when a model in `models` is missing or nothing is built, and the
    folder when `repository` is not one."""
    if not Path(repository).is_dir():
        raise ConfigError(f"--repository {str(repository)!r} is not a folder: no model repository there. Build one "
                          f"with `dyngate build --model MODEL --techniques fp32,int8-dynamic --repository "
                          f"{repository}`, or pass the folder dyngate build wrote (default: $DYNGATE_REPOSITORY, "
                          "else model_repository)")
    entries = [e for e in list_models(repository) if e.backend == "python"]
    known = sorted({e.model for e in entries})
    missing = [m for m in models or [] if m not in known]
    if missing:
        raise ConfigError(f"--model {', '.join(missing)}: not in {repository}; models there: "
                          f"{', '.join(known) or 'none'} (build them with dyngate build)")
    groups = {m: [e for e in entries if e.model == m] for m in known if not models or m in models}
    if not groups:
        raise ConfigError(f"no python-backend variants in {repository}; build some with dyngate build")
    return groups


def python_backend_models(repository: Path) -> list[str]:
    """Names of the models the embedded Triton (python backend only) can load."""
    return [e.name for e in list_models(repository) if e.backend == "python"]
