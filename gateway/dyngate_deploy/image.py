"""The derived Triton image: NVIDIA's tritonserver container of the embedded server's release, plus the python
packages a served variant's `model.py` imports, pinned to the versions installed here.

    server = embedded_server_version()            # "2.51.0", read from the embedded server's GET /v2
    container_tag(server)                         # "24.10" (nvcr.io/nvidia/tritonserver:24.10-py3)
    model_py_requirements()                       # {"numpy": "1.26.4", "onnxruntime": "1.32.0", ...}
    dockerfile(server)                            # the Dockerfile's text

The packages are found, not listed: the imports of `triton_model.py` (the `model.py` of every variant) and of
`runtime.py` (copied beside it) are read with `ast`; the standard library, Triton's own
`triton_python_backend_utils` and the local `dyngate_runtime` are left out; each remaining module is mapped to
its distribution with `importlib.metadata.packages_distributions()` and pinned to the installed version.
"""

from __future__ import annotations

import ast
import functools
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from dyngate_build.errors import ConfigError, ServingError
from dyngate_build.repository import MODEL_PY_SOURCE, RUNTIME_SOURCE

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"
# NVIDIA releases one tritonserver container a month; since server 2.40 (container 23.11) server 2.N ships in
# the container of month (N - 40) after November 2023; scripts/triton_container.sh: 24.10 = server 2.51.
_ANCHOR_SERVER_MINOR, _ANCHOR_YEAR, _ANCHOR_MONTH = 40, 2023, 11
_MODEL_PY_LOCAL = {"triton_python_backend_utils", "dyngate_runtime"}  # Triton's own module; the copied runtime
# The CUDA build of a distribution where it has another name; PyTorch's wheel index per device.
GPU_DISTRIBUTIONS = {"onnxruntime": "onnxruntime-gpu"}
TORCH_INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "gpu": "https://download.pytorch.org/whl/cu126"}


@functools.cache
def embedded_server_version() -> str:
    """The version of the Triton server in the nvidia-pytriton wheel ("2.51.0"), from its own server metadata.

    Starts the embedded server on an empty repository and free loopback ports for a few seconds.
    Raises ServingError when it cannot start or does not answer.
    """
    from dyngate_measure.machine import server_version
    from dyngate_serving.launcher import TritonServer, TritonServerConfig
    from dyngate_serving.net import free_ports

    http, grpc, metrics = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="dyngate-version-") as empty:
        config = TritonServerConfig(repository=Path(empty), http_port=http, grpc_port=grpc, metrics_port=metrics,
                                    models=[], log_file=Path(empty) / "triton.log")
        with TritonServer(config) as server:
            version = server_version(server.endpoints["http"])
    if not version:
        raise ServingError("the embedded Triton started but GET /v2 gave no version; pass --triton-version")
    return version


def container_tag(server_version: str) -> str:
    """NGC container release ("24.10") of Triton server `server_version` ("2.51.0"); ConfigError before 2.40."""
    try:
        major, minor = (int(p) for p in server_version.split(".")[:2])
    except ValueError:
        raise ConfigError(f"--triton-version={server_version!r} is not a Triton server version like 2.51.0") from None
    if major != 2 or minor < _ANCHOR_SERVER_MINOR:
        raise ConfigError(f"--triton-version={server_version!r}: only Triton server 2.{_ANCHOR_SERVER_MINOR} "
                          "(container 23.11) and newer are mapped to a container release")
    months = _ANCHOR_YEAR * 12 + _ANCHOR_MONTH - 1 + minor - _ANCHOR_SERVER_MINOR
    return f"{months // 12 % 100:02d}.{months % 12 + 1:02d}"


def model_py_modules() -> list[str]:
    """Top-level modules `model.py` and the runtime import that are neither standard library nor local."""
    found = set()
    for path in (MODEL_PY_SOURCE, RUNTIME_SOURCE):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return sorted(m for m in found if m not in sys.stdlib_module_names and m not in _MODEL_PY_LOCAL
                  and m != "__future__")


def model_py_requirements() -> dict[str, str]:
    """Distribution -> installed version (public part: "2.13.0" for "2.13.0+cpu") of every model.py import.

    Raises ConfigError naming the module when one is not installed here (the pin would be a guess).
    """
    owners = metadata.packages_distributions()
    pins: dict[str, str] = {}
    for module in model_py_modules():
        distributions = owners.get(module)
        if not distributions:
            raise ConfigError(f"model.py imports {module!r}, which is not installed in this environment "
                              f"({sys.prefix}); install it so its version can be pinned in the image")
        name = distributions[0]
        pins[name.lower()] = Version(metadata.version(name)).public
    return dict(sorted(pins.items()))


def dockerfile(server_version: str, device: str) -> str:
    """The derived image's Dockerfile for `device` ("cpu" or "gpu"): tritonserver of `server_version` plus
    model.py's packages, each pinned `name==version` (gpu: CUDA wheels of torch, onnxruntime-gpu of the same
    version as onnxruntime here)."""
    if device not in TORCH_INDEX:
        raise ConfigError(f"device={device!r} is not known; choose one of: {', '.join(TORCH_INDEX)}")
    tag = container_tag(server_version)
    pins = [f"{GPU_DISTRIBUTIONS.get(name, name) if device == 'gpu' else name}=={version}"
            for name, version in model_py_requirements().items()]
    return "\n".join([
        f"# Triton Inference Server {server_version} (NGC release {tag}), the version dyngate's embedded server runs,",
        "# plus the python packages every python-backend variant's model.py imports, pinned to the versions",
        f"# installed where `dyngate deploy kubernetes` ran ({device} builds).",
        f"FROM {TRITON_IMAGE}:{tag}-py3",
        f"RUN pip install --no-cache-dir --extra-index-url {TORCH_INDEX[device]} \\",
        "    " + " \\\n    ".join(pins),
    ]) + "\n"
